"""Scoring: a verifier's verdict on rollouts, the one implementation that the score stage
(:mod:`sft_ray.stages.score`), rejection sampling in the generate stage and the driver's
journal recovery all call.

:func:`score_rollouts` scores up to ``verifier.concurrency`` rows at once with an async
verifier (a judge, code execution), or hands them to a verifier's ``score_batch``.
Whatever a verifier returns is cleaned into JSON-safe values (:func:`clean_result`). A verifier that raises,
times out or returns something that is not a reward gives the row no reward and
an ``error`` (``verifier_error``, or ``judge_error`` for a judge): the row is a
failed sample (``failed/``, retried by a rerun), never a reward of 0.
"""

from __future__ import annotations

import asyncio
import logging
import math
from typing import Any

import orjson

from sft_ray import errors
from sft_ray.rows import GENERATED_FIELDS, input_row
from sft_ray.verifiers import build_verifier, call_verifier, close_verifier, close_verifier_now, verifier_dead

log = logging.getLogger(__name__)

DEFAULT_CONCURRENCY = 32
_DROP = object()


class BadVerifierOutput(ValueError):
    """A verifier returned something that is not a reward."""


def _plain(value: Any) -> Any:
    """numpy scalars (np.float64, np.int64, np.bool_) as the Python values they hold."""
    if type(value).__module__ == "numpy" and hasattr(value, "item") and getattr(value, "ndim", None) == 0:
        return value.item()
    return value


def clean_metric(value: Any) -> Any:
    """A metric value as JSON-safe data, or ``_DROP``: numbers become finite floats (NaN and
    infinities are dropped), strings and None stay, lists, dicts and numpy arrays are kept when they
    serialise (numpy inside included; NaN inside becomes null); anything else is dropped."""
    value = _plain(value)
    if type(value).__module__ == "numpy" and hasattr(value, "tolist"):  # an array
        value = value.tolist()
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, (int, float)):
        value = float(value)
        return value if math.isfinite(value) else _DROP
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, (list, tuple, dict)):
        try:
            return orjson.loads(orjson.dumps(value, option=orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_NON_STR_KEYS))
        except (TypeError, orjson.JSONEncodeError):
            return _DROP
    return _DROP


def clean_result(result: Any, reward_range: tuple[float, float] | None = None) -> tuple[float, dict[str, Any]]:
    """(reward, metrics) from a verifier's return value, or :class:`BadVerifierOutput` (also for
    a reward outside ``reward_range``, ``verifier.reward_range``: never clipped)."""
    result = _plain(result)
    if isinstance(result, (bool, int, float)):
        result = {"reward": result}
    if not isinstance(result, dict):
        raise BadVerifierOutput(f"verifier returned {type(result).__name__}, not a number or a dict with 'reward'")
    if "reward" not in result:
        raise BadVerifierOutput(f"verifier result has no 'reward' (keys: {sorted(map(str, result))[:10]})")
    reward = _plain(result["reward"])
    if isinstance(reward, bool):
        reward = float(reward)
    if not isinstance(reward, (int, float)):
        raise BadVerifierOutput(f"reward is {type(reward).__name__} {reward!r:.100}, not a number")
    reward = float(reward)
    if not math.isfinite(reward):
        raise BadVerifierOutput(f"reward is {reward}")
    if reward_range is not None and not reward_range[0] <= reward <= reward_range[1]:
        raise BadVerifierOutput(f"reward {reward:g} is outside verifier.reward_range "
                                f"[{reward_range[0]:g}, {reward_range[1]:g}]")
    metrics = {}
    for k, v in result.items():
        if k == "reward":
            continue
        v = clean_metric(v)
        if v is not _DROP:
            metrics[str(k)] = v
    return reward, metrics


def apply_result(rollout: dict[str, Any], result: Any, reward_range: tuple[float, float] | None = None) -> None:
    """Put a verifier's result on the rollout (or its failure, when the result is unusable)."""
    try:
        reward, metrics = clean_result(result, reward_range)
    except BadVerifierOutput as e:
        apply_failure(rollout, e)
        return
    # Metrics go to the top level too, as NeMo Gym rollouts carry them (`jq .accuracy`), unless
    # the name is a rollout field or an input field: those are never overwritten.
    rollout.update({k: v for k, v in metrics.items() if k not in GENERATED_FIELDS and k not in rollout})
    rollout["reward"] = reward
    rollout["metrics"] = metrics


def apply_failure(rollout: dict[str, Any], exc: BaseException) -> None:
    """No verdict: no reward, an infrastructure error class (the row is retried by a rerun)."""
    kind = getattr(exc, "error_type", errors.VERIFIER_ERROR)
    text = str(exc) if isinstance(exc, BadVerifierOutput) else f"{type(exc).__name__}: {exc}"
    rollout["reward"] = None
    rollout["error"] = errors.error(kind, text)


async def _score(verifier, rollout: dict[str, Any], sem: asyncio.Semaphore,
                 reward_range: tuple[float, float] | None) -> None:
    async with sem:
        try:
            result = await call_verifier(verifier, input_row(rollout), rollout.get("response") or "", rollout)
        except (Exception, SystemExit) as e:  # a verifier bug or a row it cannot score is data, not a crash
            apply_failure(rollout, e)
            return
    apply_result(rollout, result, reward_range)


async def score_rollouts(verifier, rollouts: list[dict[str, Any]], sem: asyncio.Semaphore | None = None,
                         reward_range: tuple[float, float] | None = None) -> None:
    """Score successful rollouts in place: one batch call, or one call per row, at most
    ``sem`` at once; a reward outside ``reward_range`` is a verifier error."""
    if not rollouts:
        return
    if hasattr(verifier, "score_batch"):
        items = [(input_row(r), r.get("response") or "", r) for r in rollouts]
        try:
            results = verifier.score_batch(items)
            if asyncio.iscoroutine(results) or isinstance(results, asyncio.Future):
                results = await results
            results = list(results)
            if len(results) != len(rollouts):
                raise BadVerifierOutput(f"score_batch returned {len(results)} results for {len(rollouts)} rows")
        except (Exception, SystemExit) as e:
            for r in rollouts:
                apply_failure(r, e)
            return
        for r, res in zip(rollouts, results):
            if isinstance(res, BaseException):
                apply_failure(r, res)
            else:
                apply_result(r, res, reward_range)
        return
    sem = sem or asyncio.Semaphore(DEFAULT_CONCURRENCY)
    await asyncio.gather(*(_score(verifier, r, sem, reward_range) for r in rollouts))


def score_now(verifier, rollouts: list[dict[str, Any]]) -> None:
    """Score successful rollouts in place with a verifier that computes its reward in this thread
    (no I/O: exact_match, math, mcq, regex, json_schema), without an event loop: for many rows of
    a cheap verifier, a coroutine per row would cost more than the verdict. Same results, and
    the same failures, as :func:`score_rollouts`."""
    for r in rollouts:
        try:
            result = verifier(input_row(r), r.get("response") or "")
        except (Exception, SystemExit) as e:  # a verifier bug or a row it cannot score is data, not a crash
            apply_failure(r, e)
            continue
        if asyncio.iscoroutine(result):  # not a local verifier after all: its verdict is awaited
            result.close()
            apply_failure(r, BadVerifierOutput("verifier returned a coroutine where a reward was expected"))
            continue
        apply_result(r, result)


def verifier_payload(verifier) -> dict[str, Any]:
    """The ``verifier`` config section as the plain dict ScoreStage takes, with each judge's API
    key read on the driver (as the generation model's is) and carried as a Secret."""
    from sft_ray.backends.base import Secret
    from sft_ray.config import flat_dump

    def walk(section, data: dict[str, Any], path: str) -> None:
        if getattr(section, "judge", None) is not None:  # the types with a judge (judge, math)
            data["judge"]["model"]["api_key"] = Secret(section.judge.model.api_key())
            data["judge"]["model"]["secret_headers"] = Secret(section.judge.model.secret_headers())
            data["judge"]["model"]["config_key"] = f"{path}.judge.model"  # for error advice
        for i, (sub, sub_data) in enumerate(zip(getattr(section, "components", []), data["components"])):
            walk(sub, sub_data, f"{path}.components.{i}")

    data = flat_dump(verifier)  # every type's keys, as the verifiers read them
    walk(verifier, data, "verifier")
    return data


class Scorer:
    """A verifier built from its config section, scoring rollouts at most ``verifier.concurrency``
    at a time: what the score stage, rejection sampling (in a generation actor) and journal
    recovery (on the driver) each hold."""

    def __init__(self, verifier: dict[str, Any]) -> None:
        self.verifier = build_verifier(verifier)
        self.concurrency = int(verifier.get("concurrency") or DEFAULT_CONCURRENCY)
        lo, hi = verifier.get("reward_range") or (0.0, 1.0)
        self.reward_range = (float(lo), float(hi))
        self._sem: asyncio.Semaphore | None = None

    def _semaphore(self) -> asyncio.Semaphore:
        if self._sem is None:  # asyncio objects are made inside the loop Ray Data runs us in
            self._sem = asyncio.Semaphore(self.concurrency)
        return self._sem

    async def score(self, rollouts: list[dict[str, Any]]) -> None:
        """Score successful rollouts in place."""
        await score_rollouts(self.verifier, rollouts, self._semaphore(), self.reward_range)

    @property
    def dead(self) -> bool:
        """A judge's vLLM engine died (its rows carry judge_errors)."""
        return verifier_dead(self.verifier)

    async def close(self) -> None:
        """Release the verifier's connections and engine in the running loop."""
        await close_verifier(self.verifier)

    def __del__(self) -> None:
        # Ray Data has no teardown hook for map_batches classes: release sockets here. A vLLM
        # judge's engine core stops with this process.
        try:
            close_verifier_now(self.verifier)
        except Exception:
            pass
