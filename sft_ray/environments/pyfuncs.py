"""What a Python tool module offers, shared by the in-process episode
(:mod:`sft_ray.environments.python`) and its worker-process twin
(:mod:`sft_ray.environments.toolproc`): which names are tools, and how a result reads."""

from __future__ import annotations

import inspect
from typing import Any, Callable

import orjson


def public_callables(obj: Any, module_name: str | None) -> dict[str, Callable[..., Any]]:
    """The public functions (or bound methods) of ``obj`` that are tools; with ``module_name``, only
    those defined in that module."""
    out = {}
    for name, value in inspect.getmembers(obj):
        if name.startswith("_") or name == "close" or not callable(value) or inspect.isclass(value):
            continue
        if module_name is not None and getattr(value, "__module__", None) != module_name:
            continue  # imported helpers (e.g. `from math import sqrt`) are not tools
        out[name] = value
    return out


def output_text(value: Any) -> str:
    """A tool's return value as the text the model reads."""
    if isinstance(value, str):
        return value
    return orjson.dumps(value, default=str, option=orjson.OPT_SERIALIZE_NUMPY).decode()
