"""``environment.type: python``: a Python module's functions are the tools.

Each public function defined in the module (``environment.module``, an import name or
a ``.py`` path) is a tool, called by name with the parsed arguments; sync or async.
With ``environment.episode_class``, a class of that module is made per episode (with
the input row when its constructor takes an argument) and its public methods are the
tools instead; its ``close()`` (sync or async) runs when the episode ends, so state is
isolated per episode however many run at once.

Rows that bring no ``tools`` are offered the module's tools, with JSON schemas made
from the signatures (pydantic) and descriptions from the docstrings.

Sync tools run on the actor's event loop (no thread hop per call): keep them quick, or
write slow ones as ``async def``.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable

import orjson

from sft_ray.environments.base import Environment, Episode, ToolOutput
from sft_ray.plugins import load_module


def _public_callables(obj: Any, module_name: str | None) -> dict[str, Callable[..., Any]]:
    out = {}
    for name, value in inspect.getmembers(obj):
        if name.startswith("_") or name == "close" or not callable(value) or inspect.isclass(value):
            continue
        if module_name is not None and getattr(value, "__module__", None) != module_name:
            continue  # imported helpers (e.g. `from math import sqrt`) are not tools
        out[name] = value
    return out


def tool_schema(name: str, fn: Callable[..., Any]) -> dict[str, Any]:
    """A Chat-form tool made from a function's signature and docstring."""
    from pydantic import create_model

    fields: dict[str, Any] = {}
    for pname, p in inspect.signature(fn).parameters.items():
        if pname == "self" or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        ann = Any if p.annotation is inspect.Parameter.empty else p.annotation
        fields[pname] = (ann, ... if p.default is inspect.Parameter.empty else p.default)
    schema = create_model(f"{name}_arguments", **fields).model_json_schema()
    schema.pop("title", None)
    for prop in schema.get("properties", {}).values():
        prop.pop("title", None)
    doc = inspect.getdoc(fn) or ""
    return {"type": "function", "function": {"name": name, "description": doc.split("\n\n")[0],
                                             "parameters": schema}}


def output_text(value: Any) -> str:
    """A tool's return value as the text the model reads."""
    if isinstance(value, str):
        return value
    return orjson.dumps(value, default=str, option=orjson.OPT_SERIALIZE_NUMPY).decode()


class PythonEpisode(Episode):
    def __init__(self, tools: dict[str, Callable[..., Any]], state: Any = None) -> None:
        self.tools = tools
        self.state = state

    async def call(self, name: str, arguments: dict[str, Any]) -> ToolOutput:
        fn = self.tools.get(name)
        if fn is None:
            return ToolOutput(orjson.dumps({"error": f"Unknown tool: {name}"}).decode(), error=True)
        try:
            value = fn(**arguments)
            if inspect.isawaitable(value):
                value = await value
            return ToolOutput(output_text(value))
        except Exception as e:  # a tool's exception is the model's to see, never the batch's end
            return ToolOutput(orjson.dumps({"error": f"{type(e).__name__}: {e}"[:2000]}).decode(), error=True)

    async def close(self) -> None:
        close = getattr(self.state, "close", None)
        if callable(close):
            value = close()
            if inspect.isawaitable(value):
                await value


class PythonEnvironment(Environment):
    def __init__(self, cfg: dict[str, Any]) -> None:
        super().__init__(cfg)
        self.module = load_module(cfg["module"], "environment.module")
        self.cls = None
        if cfg.get("episode_class"):
            self.cls = getattr(self.module, cfg["episode_class"], None)
            if not inspect.isclass(self.cls):
                raise ValueError(f"environment.episode_class: {cfg['module']} has no class {cfg['episode_class']!r}")
            proto = _public_callables(self.cls, None)
            self._takes_row = len([p for p in inspect.signature(self.cls).parameters.values()
                                   if p.default is inspect.Parameter.empty
                                   and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]) >= 1
        else:
            proto = _public_callables(self.module, self.module.__name__)
        if not proto:
            raise ValueError(f"environment.module: {cfg['module']} defines no public function to use as a tool")
        self._schemas = [tool_schema(name, fn) for name, fn in sorted(proto.items())]
        self._module_tools = None if self.cls else proto

    def default_tools(self) -> list[dict[str, Any]]:
        return self._schemas

    async def open(self, row: dict[str, Any], episode_id: str) -> Episode:
        if self.cls is None:
            return PythonEpisode(self._module_tools or {})
        state = self.cls(row) if self._takes_row else self.cls()
        return PythonEpisode(_public_callables(state, None), state)
