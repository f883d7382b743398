"""What the batch loop records: answers scored and written as online answers are (the session's
tallies, the failure budget), and what it spent (the spending budget, checked before each file)."""

from __future__ import annotations

import time
from typing import Any

import orjson

from sft_ray.config import RunConfig
from sft_ray.cost import CACHE_READ, CACHE_WRITE, batch_prices, cost_usd
from sft_ray.driver import Recorder, Session, remote_scorer
from sft_ray.live import LiveView
from sft_ray.metrics import RunMetrics, request_status
from sft_ray.ratelimit import over_spending_budget
from sft_ray.runfolder.layout import Key, keys_of
from sft_ray.runfolder.manifest import Manifest
from sft_ray.runfolder.parts import Writers
from sft_ray.runfolder.state import FolderState
from sft_ray.scoring import verifier_payload
from sft_ray.stages.score import ScoreStage

SCORE_CHUNK = 1024  # rollouts scored and written at a time


class Spending:
    """What this session sent and spent, at batch prices, against the spending budget (budget.*)."""

    def __init__(self, cfg: RunConfig, manifest: Manifest) -> None:
        self.limits = cfg.budget.model_dump()
        self.pricing = batch_prices(cfg.pricing.model_dump())
        self.before = manifest.spent_before()
        self.spend = {"requests": 0, "input_tokens": 0, "output_tokens": 0, "batches": 0}
        self.cached = {CACHE_WRITE: 0, CACHE_READ: 0}  # prompt caching (Anthropic), in the record when used

    def sent(self, requests: int) -> None:
        self.spend["requests"] += requests
        self.spend["batches"] += 1

    def used(self, rollout: dict[str, Any]) -> None:
        usage = rollout.get("usage") or {}
        self.spend["input_tokens"] += int(usage.get("input_tokens") or 0)
        self.spend["output_tokens"] += int(usage.get("output_tokens") or 0)
        for k in self.cached:
            self.cached[k] += int(usage.get(k) or 0)

    def over(self, requests: int, est_in: float, est_out: float) -> bool:
        """Whether submitting these requests could pass a spending budget, all sessions together."""
        spent = {k: self.before.get(k, 0) + self.spend[k] for k in ("requests", "input_tokens", "output_tokens")}
        return over_spending_budget(self.limits, self.pricing, spent["requests"] + requests,
                                    spent["input_tokens"] + est_in, spent["output_tokens"] + est_out,
                                    self.before.get(CACHE_WRITE, 0) + self.cached[CACHE_WRITE],
                                    self.before.get(CACHE_READ, 0) + self.cached[CACHE_READ])

    def record(self) -> dict[str, Any]:
        """This session's spend, as its record holds it (what the budget and stats.json read)."""
        cached = {k: v for k, v in self.cached.items() if v}
        return {**self.spend, **cached, "cost_usd": cost_usd(self.spend["input_tokens"], self.spend["output_tokens"],
                                                             self.pricing, self.cached[CACHE_WRITE],
                                                             self.cached[CACHE_READ])}


def batch_telemetry(rollout: dict[str, Any]) -> str:
    """A batch line's telemetry, as an actor reports an online sample's (:class:`sft_ray.metrics.Telemetry`):
    one request, its status from the line's error, and the usage the API reported, billed as reported."""
    usage = rollout.get("usage") or {}
    error = rollout.get("error") or {}
    inp, out = int(usage.get("input_tokens") or 0), int(usage.get("output_tokens") or 0)
    t: dict[str, Any] = {"req": {request_status(error.get("type")) if error else "ok": 1},
                         "inp": inp, "out": out, "bin": inp, "bout": out}
    cw, cr = int(usage.get(CACHE_WRITE) or 0), int(usage.get(CACHE_READ) or 0)
    if cw or cr:
        t.update(cw=cw, cr=cr)
    return orjson.dumps(t).decode()


class BatchWatch:
    """The run's metrics and live view (:mod:`sft_ray.live`) for the batch loop: what it writes is
    counted as the online stream counts its written batches (``per_prompt``: progress counts prompts)."""

    def __init__(self, metrics: RunMetrics, live: LiveView, per_prompt: bool) -> None:
        self.metrics, self.live, self.per_prompt = metrics, live, per_prompt

    def written(self, keys: list[Key], rollouts: list[str], failed: list[bool], rewards: list[float | None],
                ok: int, bad: int, write_s: float) -> None:
        n = len({rid for rid, _ in keys}) if self.per_prompt else ok + bad
        classes = self.live.written(n, ok, bad, rollouts, failed, rewards)
        self.metrics.written(ok, bad, rewards, [batch_telemetry(orjson.loads(r)) for r in rollouts], write_s,
                             classes)


class BatchRecorder:
    """Scores what the batches bring back (failed rollouts pass through) and records it with the
    session's :class:`~sft_ray.driver.Recorder`, as the online stream does; counts its spend."""

    def __init__(self, cfg: RunConfig, state: FolderState, session: Session, writers: Writers,
                 spending: Spending, watch: BatchWatch | None = None) -> None:
        self.state, self.session, self.spending, self.watch = state, session, spending, watch
        # Failures are sent again within the session: every failure record counts until its sample is done.
        self.recorder = Recorder(cfg, writers, session, len(state.done), 0, state.failed_sessions)
        self.remote = remote_scorer(cfg)
        self.scorer = ScoreStage(verifier_payload(cfg.verifier)) if self.remote is None else None

    async def write(self, pairs: list[tuple[Key, dict[str, Any]]]) -> None:
        for i in range(0, len(pairs), SCORE_CHUNK):
            chunk = pairs[i:i + SCORE_CHUNK]
            rollouts = [r for _, r in chunk]
            for r in rollouts:
                self.spending.used(r)
            batch = {"id": [k[0] for k, _ in chunk], "sample_index": [k[1] for k, _ in chunk],
                     "rollout": [orjson.dumps(r).decode() for r in rollouts],
                     "failed": [r["error"] is not None for r in rollouts], "ready_at": [0.0] * len(chunk)}
            if self.remote is not None:
                outs = list(self.remote([batch]))
            else:
                assert self.scorer is not None
                outs = [await self.scorer(batch)]
            for out in outs:
                keys = keys_of(out)
                tokens = sum(int((orjson.loads(t).get("usage") or {}).get("output_tokens") or 0)
                             for t in out["rollout"])
                texts, flags, rewards = list(out["rollout"]), [bool(f) for f in out["failed"]], list(out["reward"])
                t_write = time.perf_counter()
                ok, bad = self.recorder.write(keys, texts, flags, rewards, tokens)
                if self.watch is not None:
                    self.watch.written(keys, texts, flags, rewards, ok, bad, time.perf_counter() - t_write)
        self.recorder.over_failure_budget()

    async def close(self) -> None:
        if self.scorer is not None:
            await self.scorer.close()
