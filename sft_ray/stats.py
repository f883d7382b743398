"""Run statistics: what `jq '.reward' | python statistics` gave NeMo Gym users, and more.

Accumulated in one streaming pass over the rollouts; printed as a short report
plus one JSON line with the mean of every numeric metric, as NeMo Gym prints.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Any

import numpy as np

HIST_BINS = 10


class StatsAccumulator:
    """Feed it every rollout (successful or failed) once; ``result()`` gives stats.json."""

    def __init__(self) -> None:
        self.rewards: list[float] = []
        self.metric_sums: dict[str, float] = {}
        self.metric_counts: Counter[str] = Counter()
        self.errors: Counter[str] = Counter()
        self.failed = 0
        self.tokens = Counter()
        self.finish = Counter()
        self.kept = 0

    def add(self, rollout: dict[str, Any], failed: bool) -> None:
        err = rollout.get("error")
        if err:
            self.errors[err.get("type", "unknown")] += 1
        usage = rollout.get("usage") or {}
        for k in ("input_tokens", "output_tokens", "total_tokens"):
            self.tokens[k] += int(usage.get(k) or 0)
        if failed:
            self.failed += 1
            return
        self.finish[str(rollout.get("finish_reason"))] += 1
        reward = rollout.get("reward")
        if reward is not None:
            self.rewards.append(float(reward))
        for k, v in (rollout.get("metrics") or {}).items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                self.metric_sums[k] = self.metric_sums.get(k, 0.0) + float(v)
                self.metric_counts[k] += 1

    def result(self) -> dict[str, Any]:
        r = np.asarray(self.rewards, dtype=np.float64)
        n_ok = len(self.rewards)
        total = n_ok + self.failed
        reward: dict[str, Any] = {"count": n_ok}
        if n_ok:
            counts, edges = np.histogram(np.clip(r, 0.0, 1.0), bins=HIST_BINS, range=(0.0, 1.0))
            reward.update(
                mean=float(r.mean()), median=float(np.median(r)),
                stdev=float(r.std(ddof=1)) if n_ok > 1 else 0.0,
                min=float(r.min()), max=float(r.max()),
                histogram={"edges": [round(float(e), 4) for e in edges], "counts": [int(c) for c in counts]},
            )
        return {
            "samples": total,
            "succeeded": n_ok,
            "failed": self.failed,
            "reward": reward,
            "metrics": self.metric_means(),
            "kept": self.kept,
            "kept_fraction": (self.kept / n_ok) if n_ok else 0.0,
            "errors_by_type": dict(sorted(self.errors.items())),
            "finish_reasons": dict(sorted(self.finish.items())),
            "tokens": dict(self.tokens),
        }

    def metric_means(self) -> dict[str, float]:
        """Mean reward and mean of every verifier metric (NeMo Gym's summary line)."""
        means = {"reward": float(np.mean(self.rewards))} if self.rewards else {}
        means.update({k: self.metric_sums[k] / self.metric_counts[k] for k in sorted(self.metric_sums)})
        return means


def format_report(stats: dict[str, Any]) -> str:
    """The human-readable report printed at the end of a run and by `sft-ray stats`."""
    lines = []
    rw = stats["reward"]
    lines.append(f"samples: {stats['samples']}  succeeded: {stats['succeeded']}  failed: {stats['failed']}")
    if rw.get("count"):
        lines.append(
            "reward: mean {mean:.4f}  median {median:.4f}  stdev {stdev:.4f}  min {min:.4f}  max {max:.4f}".format(**rw)
        )
        hist = rw["histogram"]
        peak = max(hist["counts"]) or 1
        for lo, hi, c in zip(hist["edges"], hist["edges"][1:], hist["counts"]):
            bar = "#" * math.ceil(30 * c / peak) if c else ""
            lines.append(f"  [{lo:.1f}, {hi:.1f}{']' if hi >= 1.0 else ')'} {c:>9} {bar}")
    if "kept" in stats and stats.get("filter"):
        lines.append(f"kept: {stats['kept']}/{stats['succeeded']} ({100 * stats['kept_fraction']:.1f}%) "
                     f"with {stats['filter']}")
    if stats["errors_by_type"]:
        lines.append("errors: " + ", ".join(f"{k}={v}" for k, v in stats["errors_by_type"].items()))
    tok = stats.get("tokens") or {}
    if tok:
        lines.append(f"tokens: input {tok.get('input_tokens', 0)}  output {tok.get('output_tokens', 0)}")
    sp = stats.get("spend") or {}  # [config] cost and requests (sft_ray/cost.py)
    if sp.get("cost_usd") or sp.get("requests"):
        line = f"spend: ${sp['cost_usd']:.4f}"
        if "projected_cost_usd" in sp:
            line += f" (projected for the whole input ${sp['projected_cost_usd']:.2f})"
        if sp.get("requests"):
            line += f"; {sp['requests']} requests, {sp.get('rate_limited', 0)} answered 429"
        lines.append(line)
    thr = stats.get("throughput")
    if thr:
        lines.append(f"throughput: {thr['samples_per_s']:.1f} samples/s, {thr['output_tokens_per_s']:.1f} "
                     f"output tokens/s over {thr['generate_wall_s']:.1f} s")
    return "\n".join(lines)
