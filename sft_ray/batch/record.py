"""What the batch loop records: answers scored and written as online answers are (the session's
tallies, the failure budget), and what it spent (the spending budget, checked before each file)."""

from __future__ import annotations

from typing import Any

import orjson

from sft_ray.config import RunConfig
from sft_ray.cost import CACHE_READ, CACHE_WRITE, batch_prices, cost_usd
from sft_ray.driver import Session, remote_scorer
from sft_ray.ratelimit import spent_before
from sft_ray.runfolder.completion import Budget
from sft_ray.runfolder.layout import Key
from sft_ray.runfolder.parts import Writers
from sft_ray.runfolder.state import FolderState
from sft_ray.scoring import verifier_payload
from sft_ray.stages.score import ScoreStage

SCORE_CHUNK = 1024  # rollouts scored and written at a time


class Spending:
    """What this session sent and spent, at batch prices, against the spending budget (budget.*)."""

    def __init__(self, cfg: RunConfig, manifest: dict[str, Any]) -> None:
        self.limits = cfg.budget
        self.pricing = batch_prices(cfg.pricing.model_dump())
        self.before = spent_before(manifest)
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
        b = self.limits
        req = self.before.get("requests", 0) + self.spend["requests"] + requests
        inp = self.before.get("input_tokens", 0) + self.spend["input_tokens"] + est_in
        out = self.before.get("output_tokens", 0) + self.spend["output_tokens"] + est_out
        return bool((b.max_requests is not None and req > b.max_requests)
                    or (b.max_output_tokens is not None and out > b.max_output_tokens)
                    or (b.max_cost_usd is not None and cost_usd(
                        inp, out, self.pricing, self.before.get(CACHE_WRITE, 0) + self.cached[CACHE_WRITE],
                        self.before.get(CACHE_READ, 0) + self.cached[CACHE_READ]) > b.max_cost_usd))

    def record(self) -> dict[str, Any]:
        """This session's spend, as its record holds it (what the budget and stats.json read)."""
        cached = {k: v for k, v in self.cached.items() if v}
        return {**self.spend, **cached, "cost_usd": cost_usd(self.spend["input_tokens"], self.spend["output_tokens"],
                                                             self.pricing, self.cached[CACHE_WRITE],
                                                             self.cached[CACHE_READ])}


class Recorder:
    """Scores rollouts (failed ones pass through), writes them, adds them to the session, and stops
    the session when the failure budget is exceeded."""

    def __init__(self, cfg: RunConfig, state: FolderState, session: Session, writers: Writers,
                 spending: Spending) -> None:
        self.state, self.session, self.writers, self.spending = state, session, writers, spending
        self.budget = Budget(cfg.max_error_fraction, cfg.min_rows_for_budget)
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
                keys = [(str(r), int(k)) for r, k in zip(out["id"], out["sample_index"])]
                rewards = list(out["reward"])
                ok, bad = self.writers.write(keys, list(out["rollout"]), [bool(f) for f in out["failed"]], rewards)
                tokens = sum(int((orjson.loads(t).get("usage") or {}).get("output_tokens") or 0)
                             for t in out["rollout"])
                self.session.add(ok, bad, tokens, rewards)
        if self.budget.exceeded(len(self.state.done), sum(1 for n in self.state.failed_runs.values())):
            self.session.record["stopped"] = "failure budget exceeded"

    async def close(self) -> None:
        if self.scorer is not None:
            await self.scorer.close()
