"""``environment.type: python``: a Python module's functions are the tools.

Each public function defined in the module (``environment.module``, an import name or
a ``.py`` path) is a tool, called by name with the parsed arguments; sync or async.
With ``environment.episode_class``, a class of that module is made per episode (with
the input row when its constructor takes an argument) and its public methods are the
tools instead; its ``close()`` (sync or async) runs when the episode ends, so state is
isolated per episode however many run at once.

Rows that bring no ``tools`` are offered the module's tools, with JSON schemas made
from the signatures (pydantic) and descriptions from the docstrings.

Whatever a tool raises (``BaseException`` included: ``sys.exit``, ``KeyboardInterrupt``, a
``CancelledError`` of its own) is a tool error the model reads; the episode goes on. Sync
tools (and a state class's constructor and ``close()``) run in a thread of their own, off
the actor's event loop, so a tool that blocks holds up only its own episode, which
``agent.timeout_s`` ends; a thread that never returns is abandoned (Python cannot stop a
thread). Async tools run on the actor's loop: one that blocks the loop (a sync sleep in an
``async def``) still stalls the actor. With ``environment.isolation: process`` every episode
gets a worker process of its own (:mod:`sft_ray.environments.toolproc`) that runs its tools,
sync and async; it is killed when the episode ends, times out or abandons a call, and a tool
that kills its process (``os._exit``, a crash) is a tool error.
"""

from __future__ import annotations

import asyncio
import inspect
import threading
import weakref
from typing import Any, Callable

import orjson

from sft_ray.environments.base import Environment, Episode, ToolOutput, cancelled_from_outside, exception_text
from sft_ray.environments.pyfuncs import output_text, public_callables
from sft_ray.plugins import load_module


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


async def in_thread(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """``fn(*args, **kwargs)`` in a new daemon thread; its result or exception (any
    ``BaseException``) comes back here.

    Not ``asyncio.to_thread``: the loop's default executor has a few threads (cores + 4), so
    a handful of blocked tools would queue every other episode's calls behind them, and an
    executor's threads are joined at exit, so an abandoned call would hold the process. A
    thread per call costs tens of microseconds and may be abandoned."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future = loop.create_future()

    def settle(ok: bool, value: Any) -> None:
        if not future.done():  # cancelled: the caller gave up on this call
            (future.set_result if ok else future.set_exception)(value)

    def target() -> None:
        try:
            outcome = (True, fn(*args, **kwargs))
        except BaseException as e:  # handed to the caller, whatever it is
            outcome = (False, e)
        try:
            loop.call_soon_threadsafe(settle, *outcome)
        except RuntimeError:  # the loop is closed: nobody waits for this call any more
            pass

    threading.Thread(target=target, name="sft-ray-tool", daemon=True).start()
    return await future


async def _call_tool(fn: Callable[..., Any], arguments: dict[str, Any]) -> Any:
    if inspect.iscoroutinefunction(fn):
        value = await fn(**arguments)
    else:
        value = await in_thread(fn, **arguments)
    if inspect.isawaitable(value):  # a sync function that returned a coroutine
        value = await value
    return value


class PythonEpisode(Episode):
    def __init__(self, tools: dict[str, Callable[..., Any]], state: Any = None) -> None:
        self.tools = tools
        self.state = state

    async def call(self, name: str, arguments: dict[str, Any]) -> ToolOutput:
        fn = self.tools.get(name)
        if fn is None:
            return ToolOutput(orjson.dumps({"error": f"Unknown tool: {name}"}).decode(), error=True)
        try:
            output = ToolOutput(output_text(await _call_tool(fn, arguments)))
        except BaseException as e:  # a tool's exception is the model's to see, never the batch's end
            if cancelled_from_outside():
                raise  # the episode's timeout (or the batch's end) cancelled this call: not the tool's doing
            return ToolOutput(exception_text(e), error=True)
        if cancelled_from_outside():
            # An async tool caught the cancellation and returned: the episode was still asked to stop.
            raise asyncio.CancelledError
        return output

    async def close(self) -> None:
        close = getattr(self.state, "close", None)
        if callable(close):
            await _call_tool(close, {})


class PythonEnvironment(Environment):
    def __init__(self, cfg: dict[str, Any]) -> None:
        super().__init__(cfg)
        self.module = load_module(cfg["module"], "environment.module")
        self.cls = None
        if cfg.get("episode_class"):
            self.cls = getattr(self.module, cfg["episode_class"], None)
            if not inspect.isclass(self.cls):
                raise ValueError(f"environment.episode_class: {cfg['module']} has no class {cfg['episode_class']!r}")
            proto = public_callables(self.cls, None)
            self._takes_row = len([p for p in inspect.signature(self.cls).parameters.values()
                                   if p.default is inspect.Parameter.empty
                                   and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]) >= 1
        else:
            proto = public_callables(self.module, self.module.__name__)
        if not proto:
            raise ValueError(f"environment.module: {cfg['module']} defines no public function to use as a tool")
        self._schemas = [tool_schema(name, fn) for name, fn in sorted(proto.items())]
        self._module_tools = None if self.cls else proto
        self.isolation = cfg.get("isolation") or "thread"
        self._workers: weakref.WeakSet = weakref.WeakSet()  # live ProcessEpisodes, killed by close_now

    def default_tools(self) -> list[dict[str, Any]]:
        return self._schemas

    async def open(self, row: dict[str, Any], episode_id: str) -> Episode:
        if self.isolation == "process":
            from sft_ray.environments.toolproc import ProcessEpisode

            episode = ProcessEpisode(self.cfg["module"], self.cfg.get("episode_class"), row)
            self._workers.add(episode)
            await episode.start()
            return episode
        if self.cls is None:
            return PythonEpisode(self._module_tools or {})
        state = await in_thread(self.cls, row) if self._takes_row else await in_thread(self.cls)
        return PythonEpisode(public_callables(state, None), state)

    def close_now(self) -> None:
        for episode in list(self._workers):
            episode.kill()

    async def close(self) -> None:
        self.close_now()
