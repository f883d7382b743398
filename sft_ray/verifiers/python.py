"""A user's own Python function as the verifier."""

from __future__ import annotations

import inspect
import math
from typing import Any, Callable

from sft_ray.plugins import load_module


def load_function(spec: str) -> Callable[..., Any]:
    """``package.module:function`` or ``path/to/file.py:function``."""
    target, _, name = spec.rpartition(":")
    module = load_module(target, "verifier.function")
    fn = getattr(module, name, None)
    if not callable(fn) and not callable(getattr(fn, "score_batch", None)):
        raise ValueError(f"verifier.function: {target!r} has no function {name!r}")
    return fn


class PythonFunction:
    """Calls ``fn(row, response, **options)``; it returns a number (the reward) or a dict with
    ``reward`` and other metrics (a bool counts as 0 or 1). ``fn`` may be ``async``. A reward
    outside ``verifier.reward_range`` is a verifier error (the scoring stage checks), not clipped.

    The whole episode is passed too when ``fn`` names the parameter: ``rollout`` (the rollout
    row: ``messages`` with tool calls and results, ``termination``, ``usage``...) and/or
    ``messages`` (the transcript).

    ``function`` may also name an object with ``score_batch(items, **options)`` (items:
    ``(row, response, rollout)`` tuples; one result or exception per item, or an awaitable of
    that list): the scoring stage then hands it whole batches.
    """

    wants_rollout = True

    def __init__(self, cfg: dict[str, Any]) -> None:
        self.cfg = cfg
        self.fn = load_function(cfg["function"])
        self.kwargs = cfg.get("options", {})
        if callable(getattr(self.fn, "score_batch", None)):  # an object scoring whole batches at once
            self.score_batch = self._score_batch
        try:
            params = inspect.signature(self.fn).parameters
        except (TypeError, ValueError):  # a builtin without a signature: the plain call
            params = {}
        self.pass_rollout = "rollout" in params
        self.pass_messages = "messages" in params

    def __call__(self, row: dict[str, Any], response: str, rollout: dict[str, Any] | None = None) -> Any:
        kwargs = dict(self.kwargs)
        if self.pass_rollout:
            kwargs["rollout"] = rollout
        if self.pass_messages:
            kwargs["messages"] = (rollout or {}).get("messages")
        out = self.fn(row, response, **kwargs)
        if inspect.isawaitable(out):
            return self._finish_later(out)
        return self._finish(out)

    async def _score_batch(self, items: list[tuple[dict[str, Any], str, dict[str, Any]]]) -> list[Any]:
        results = self.fn.score_batch(items, **self.kwargs)
        if inspect.isawaitable(results):
            results = await results
        return [r if isinstance(r, BaseException) else self._finish(r) for r in results]

    async def _finish_later(self, out: Any) -> dict[str, Any]:
        return self._finish(await out)

    def _finish(self, out: Any) -> dict[str, Any]:
        if type(out).__module__ == "numpy" and getattr(out, "ndim", None) == 0:
            out = out.item()
        if isinstance(out, (bool, int, float)):
            out = {"reward": out}
        if not isinstance(out, dict) or "reward" not in out:
            raise TypeError(f"{self.cfg['function']} must return a number or a dict with 'reward', got {out!r:.200}")
        out = dict(out)
        reward = out["reward"]
        if isinstance(reward, (int, float)) or type(reward).__module__ == "numpy":
            try:
                reward = float(reward)
            except (TypeError, ValueError):
                pass  # the scoring stage reports it as a reward that is not a number
            else:
                if not math.isfinite(reward):
                    raise ValueError(f"{self.cfg['function']} returned a "
                                     f"{'NaN reward' if math.isnan(reward) else f'reward of {reward}'}")
                out["reward"] = reward
        return out
