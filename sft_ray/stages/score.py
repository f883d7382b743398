"""Score stage: a CPU ``map_batches`` actor that adds ``reward`` and metrics to rollouts.

Kept apart from generation so it scales on its own (verifiers such as
math-verify are CPU-bound, a judge waits on the network, code runs in
subprocesses; generation actors mostly wait on the network or sit on a GPU).

A judge with ``backend: vllm`` runs its engine here, one per scoring actor (started on the
first batch, on ``resources.score_num_gpus`` GPUs, or a placement group when its
tensor_parallel_size is above 1); it goes with the actor, as a generation actor's does.

``__call__`` is async: an async verifier (a judge, code execution) scores up to
``verifier.concurrency`` rows of the actor at once. Whatever a verifier returns
is cleaned into JSON-safe values (:func:`clean_result`). A verifier that raises,
times out or returns something that is not a reward gives the row no reward and
an ``error`` (``verifier_error``, or ``judge_error`` for a judge): the row is a
failed sample (``failed/``, retried by a rerun), never a reward of 0.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
from typing import Any

import orjson

from sft_ray import errors
from sft_ray.placement import acquire_replica_group, release_own_placement_group, replica_args
from sft_ray.rows import GENERATED_FIELDS, input_row
from sft_ray.stages import Stage
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


def score_rollout(verifier, rollout: dict[str, Any], reward_range: tuple[float, float] | None = None) -> dict[str, Any]:
    """Score one successful rollout in place and return it (outside an event loop)."""
    asyncio.run(score_rollouts(verifier, [rollout], reward_range=reward_range))
    return rollout


def verifier_payload(verifier) -> dict[str, Any]:
    """The ``verifier`` config section as the plain dict ScoreStage takes, with each judge's API
    key read on the driver (as the generation model's is) and carried as a Secret."""
    from sft_ray.backends.base import Secret

    def walk(section, data: dict[str, Any], path: str) -> None:
        if section.judge is not None:
            data["judge"]["model"]["api_key"] = Secret(section.judge.model.api_key())
            data["judge"]["model"]["secret_headers"] = Secret(section.judge.model.secret_headers())
            data["judge"]["model"]["config_key"] = f"{path}.judge.model"  # for error advice
        for i, (sub, sub_data) in enumerate(zip(section.components, data["components"])):
            walk(sub, sub_data, f"{path}.components.{i}")

    data = verifier.model_dump()
    walk(verifier, data, "verifier")
    return data


class ScoreStage:
    """Callable class for ``Dataset.map_batches``: rollouts in, scored rollouts out."""

    def __init__(self, verifier: dict[str, Any]) -> None:
        for judge in _judge_sections(verifier):  # a tensor-parallel vLLM judge's GPUs (sft_ray/placement.py)
            group = acquire_replica_group(judge["model"])
            if group is not None:
                judge["model"] = {**judge["model"], "placement_group": group}
        self.verifier = build_verifier(verifier)
        self.concurrency = int(verifier.get("concurrency") or DEFAULT_CONCURRENCY)
        lo, hi = verifier.get("reward_range") or (0.0, 1.0)
        self.reward_range = (float(lo), float(hi))
        self._sem: asyncio.Semaphore | None = None

    def _semaphore(self) -> asyncio.Semaphore:
        if self._sem is None:  # asyncio objects are made inside the loop Ray Data runs us in
            self._sem = asyncio.Semaphore(self.concurrency)
        return self._sem

    async def score(self, rollout: dict[str, Any]) -> None:
        """Score one successful rollout in place (rejection sampling scores as samples come back)."""
        await score_rollouts(self.verifier, [rollout], self._semaphore(), self.reward_range)

    async def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        texts, failed_in = list(batch["rollout"]), [bool(f) for f in batch["failed"]]
        rows = [None if f else orjson.loads(t) for t, f in zip(texts, failed_in)]
        # Rows that come scored (rejection sampling scores in the generation actor) keep their verdict.
        await score_rollouts(self.verifier, [r for r in rows if r is not None and r.get("reward") is None],
                             self._semaphore(), self.reward_range)
        if verifier_dead(self.verifier):
            # A judge's vLLM engine died: its rows carry judge_errors. Nothing of this batch has
            # been handed back yet, so exiting loses no row: Ray restarts the actor with a new
            # engine and retries its batches (as the generation stage does).
            log.error("the judge's engine died; restarting this scoring actor so its rows are scored again")
            os._exit(1)
        rollouts, rewards, tokens, failed = [], [], [], []
        for text, row in zip(texts, rows):
            if row is None:  # failed in generation: passed through untouched
                rollouts.append(text)
                rewards.append(None)
                failed.append(True)
                tokens.append(int((orjson.loads(text).get("usage") or {}).get("output_tokens") or 0))
                continue
            rollouts.append(orjson.dumps(row).decode())
            rewards.append(row["reward"])
            failed.append(row["reward"] is None)
            tokens.append(int((row.get("usage") or {}).get("output_tokens") or 0))
        return {"id": list(batch["id"]), "sample_index": list(batch["sample_index"]), "rollout": rollouts,
                "failed": failed, "reward": rewards, "output_tokens": tokens,
                "ready_at": list(batch["ready_at"])}

    async def close(self) -> None:
        """Release the verifier's connections and engine in the running loop (outside Ray Data:
        the driver's journal recovery, tests)."""
        await close_verifier(self.verifier)

    def __del__(self) -> None:
        # Ray Data has no teardown hook for map_batches classes: release sockets here. A vLLM
        # judge's engine core stops with this process; a tensor-parallel judge's GPUs go with
        # its placement group (as GenerateStage.__del__ does).
        try:
            close_verifier_now(self.verifier)
        except Exception:
            pass
        release_own_placement_group()


def _judge_sections(data: dict[str, Any]):
    """The judge sections of a verifier payload, components included."""
    if data.get("judge"):
        yield data["judge"]
    for comp in data.get("components") or []:
        yield from _judge_sections(comp)


def wiring(cfg: Any, plan: dict[str, Any]) -> dict[str, Any]:
    """An actor pool of its own size, whole blocks per call; with a vLLM judge, each actor holds
    its engine (``resources.score_num_gpus`` GPUs, or a placement group for tensor parallelism)."""
    import ray.data

    from sft_ray.pipeline import actor_range

    lo, hi = actor_range(cfg.resources.score_actors)
    payload = verifier_payload(cfg.verifier)
    num_gpus = cfg.resources.score_num_gpus or None
    for judge in _judge_sections(payload):  # config allows one vLLM judge per run
        if judge["model"]["backend"] == "vllm":
            judge["model"], num_gpus, _ = replica_args(judge["model"], num_gpus)
    return dict(fn_constructor_kwargs={"verifier": payload}, batch_size=None,
                compute=ray.data.ActorPoolStrategy(min_size=lo, max_size=hi, max_concurrent_calls_per_actor=4),
                num_cpus=cfg.resources.score_num_cpus, num_gpus=num_gpus)


STAGE = Stage("score", ScoreStage, reads=("id", "sample_index", "rollout", "failed", "ready_at"),
              writes=("id", "sample_index", "rollout", "failed", "reward", "output_tokens", "ready_at"), wiring=wiring)
