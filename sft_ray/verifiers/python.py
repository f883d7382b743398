"""A user's own Python function as the verifier."""

from __future__ import annotations

import importlib
import importlib.util
import math
from pathlib import Path
from typing import Any, Callable


def load_function(spec: str) -> Callable[..., Any]:
    """``package.module:function`` or ``path/to/file.py:function``."""
    target, _, name = spec.rpartition(":")
    if target.endswith(".py"):
        path = Path(target).resolve()
        if not path.is_file():
            raise ValueError(f"verifier.function: file not found: {path}")
        mod_spec = importlib.util.spec_from_file_location(f"sft_ray_user_{path.stem}", path)
        assert mod_spec and mod_spec.loader
        module = importlib.util.module_from_spec(mod_spec)
        mod_spec.loader.exec_module(module)
    else:
        try:
            module = importlib.import_module(target)
        except ImportError as e:
            raise ValueError(f"verifier.function: cannot import {target!r}: {e}") from None
    fn = getattr(module, name, None)
    if not callable(fn):
        raise ValueError(f"verifier.function: {target!r} has no function {name!r}")
    return fn


class PythonFunction:
    """Calls ``fn(row, response)``; it returns a number (the reward) or a dict with
    ``reward`` and any other numeric metrics. Rewards are clipped to [0, 1]."""

    def __init__(self, cfg: dict[str, Any]) -> None:
        self.cfg = cfg
        self.fn = load_function(cfg["function"])
        self.kwargs = cfg.get("options", {})

    def __call__(self, row: dict[str, Any], response: str) -> dict[str, Any]:
        out = self.fn(row, response, **self.kwargs)
        if isinstance(out, bool) or isinstance(out, (int, float)):
            out = {"reward": float(out)}
        if not isinstance(out, dict) or "reward" not in out:
            raise TypeError(f"{self.cfg['function']} must return a number or a dict with 'reward', got {out!r}")
        reward = float(out["reward"])
        if math.isnan(reward):
            raise ValueError(f"{self.cfg['function']} returned a NaN reward")
        out["reward"] = min(1.0, max(0.0, reward))
        return out
