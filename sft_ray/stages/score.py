"""Score stage: a CPU ``map_batches`` actor that adds ``reward`` and metrics to rollouts.

Kept apart from generation so it scales on its own (verifiers such as
math-verify are CPU-bound, a judge waits on the network, code runs in
subprocesses; generation actors mostly wait on the network or sit on a GPU).
The scoring itself is :mod:`sft_ray.scoring`'s.

A judge with ``backend: vllm`` runs its engine here, one per scoring actor (started on the
first batch, on ``resources.score_num_gpus`` GPUs, or a placement group when its
tensor_parallel_size is above 1); it goes with the actor, as a generation actor's does.

``__call__`` is async: an async verifier (a judge, code execution) scores up to
``verifier.concurrency`` rows of the actor at once. A row that failed in generation
passes through untouched; one that comes scored (rejection sampling scores in the
generation actor) keeps its verdict.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

import orjson

from sft_ray import metrics
from sft_ray.activity import Tracker
from sft_ray.models import say_through
from sft_ray.placement import acquire_replica_group, release_own_placement_group, replica_args
from sft_ray.scoring import Scorer, verifier_payload
from sft_ray.stages import Stage, actor_range
from sft_ray.verifiers import local_engines

log = logging.getLogger(__name__)


class ScoreStage:
    """Callable class for ``Dataset.map_batches``: rollouts in, scored rollouts out."""

    def __init__(self, verifier: dict[str, Any], activity: str | None = None) -> None:
        for judge in _judge_sections(verifier):  # a tensor-parallel vLLM judge's GPUs (sft_ray/placement.py)
            group = acquire_replica_group(judge["model"])
            if group is not None:
                judge["model"] = {**judge["model"], "placement_group": group}
        self.scorer = Scorer(verifier)
        # A vLLM judge's engine loading, reported to the driver's stall warning (sft_ray/activity.py).
        self.tracker = Tracker(activity, "scoring actor")
        say_through(self.tracker.say)  # a judge's first-use lines (the embedded model's build) go out through the driver
        self._started = False

    async def _start_engines(self) -> None:
        """Load a vLLM judge's engine before the first batch, in a phase the stall warning shows (as a
        generation actor's engine); one that fails to load fails its rows as judge_errors."""
        if self._started:
            return
        self._started = True
        self.tracker.start()
        for judge in local_engines(self.scorer.verifier):
            name = judge.model.get("name") or "the embedded default model"
            with self.tracker.in_phase(f"loading the vLLM engine of the judge ({name})"):
                try:
                    await judge.start()
                except Exception as e:  # said again in each row's judge_error
                    log.warning("the judge's engine did not start: %s: %s", type(e).__name__, e)

    async def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        await self._start_engines()
        texts, failed_in = list(batch["rollout"]), [bool(f) for f in batch["failed"]]
        rows = [None if f else orjson.loads(t) for t, f in zip(texts, failed_in)]
        # Rows that come scored (rejection sampling scores in the generation actor) keep their verdict.
        todo = [r for r in rows if r is not None and r.get("reward") is None]
        t0 = time.perf_counter()
        await self.scorer.score(todo)
        # Each scored row's share of the batch's verifier time (rows are scored concurrently).
        verifier_s = (time.perf_counter() - t0) / len(todo) if todo else 0.0
        scored = {id(r) for r in todo}
        if self.scorer.dead:
            # A judge's vLLM engine died: its rows carry judge_errors. Nothing of this batch has
            # been handed back yet, so exiting loses no row: Ray restarts the actor with a new
            # engine and retries its batches (as the generation stage does).
            log.error("the judge's engine died; restarting this scoring actor so its rows are scored again")
            os._exit(1)
        rollouts, rewards, tokens, failed = [], [], [], []
        telemetry = list(batch["telemetry"]) if "telemetry" in batch else [None] * len(texts)
        for i, (text, row) in enumerate(zip(texts, rows)):
            if row is not None and id(row) in scored:
                telemetry[i] = metrics.merge(telemetry[i], verifier_s=verifier_s)
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
                "ready_at": list(batch["ready_at"]), "telemetry": telemetry}

    async def close(self) -> None:
        """Release the verifier's connections and engine in the running loop (outside Ray Data:
        the driver's journal recovery, tests)."""
        self.tracker.close()
        await self.scorer.close()

    def __del__(self) -> None:
        # Ray Data has no teardown hook for map_batches classes (the scorer closes its verifier
        # when collected): a tensor-parallel judge's GPUs go with its placement group (as
        # GenerateStage.__del__ does).
        self.tracker.close()
        release_own_placement_group()


def _judge_sections(data: dict[str, Any]):
    """The judge sections of a verifier payload, components included."""
    if data.get("judge"):
        yield data["judge"]
    for comp in data.get("components") or []:
        yield from _judge_sections(comp)


def wiring(cfg: Any, plan: dict[str, Any], activity: str | None = None) -> dict[str, Any]:
    """An actor pool of its own size, whole blocks per call; with a vLLM judge, each actor holds
    its engine (``resources.score_num_gpus`` GPUs, or a placement group for tensor parallelism).
    ``activity``: the run's activity board (its engine loading shows in the stall warning)."""
    import ray.data

    lo, hi = actor_range(cfg.resources.score_actors)
    payload = verifier_payload(cfg.verifier)
    num_gpus = cfg.resources.score_num_gpus or None
    for judge in _judge_sections(payload):  # config allows one vLLM judge per run
        if judge["model"]["backend"] == "vllm":
            judge["model"], num_gpus = replica_args(judge["model"], num_gpus)
    return dict(fn_constructor_kwargs={"verifier": payload, "activity": activity}, batch_size=None,
                compute=ray.data.ActorPoolStrategy(min_size=lo, max_size=hi, max_concurrent_calls_per_actor=4),
                num_cpus=cfg.resources.score_num_cpus, num_gpus=num_gpus)


STAGE = Stage("score", ScoreStage, reads=("id", "sample_index", "rollout", "failed", "ready_at", "telemetry"),
              writes=("id", "sample_index", "rollout", "failed", "reward", "output_tokens", "ready_at", "telemetry"),
              wiring=wiring)
