"""Run statistics: what `jq '.reward' | python statistics` gave NeMo Gym users, and more
(with rejection sampling, its section: :class:`Tally`).

Accumulated in one streaming pass over the rollouts; printed as a short report
plus one JSON line with the mean of every numeric metric, as NeMo Gym prints.
"""

from __future__ import annotations

import json
import math
from array import array
from collections import defaultdict
from typing import Any

import numpy as np

from sft_ray.cost import CACHE_READ, CACHE_WRITE
from sft_ray.decontaminate import report_lines as decontamination_lines
from sft_ray.finalize.curate import pass_at_k

HIST_BINS = 10
PERCENTILES = (50, 90, 99)
# Report advice (the seed workflow's troubleshooting): few rows pass, or replies repeat.
LOW_KEPT_FRACTION = 0.1
REPETITIVE_SHARE = 0.25


def _counts() -> defaultdict[Any, int]:
    # defaultdict(int), not Counter: ``c[k] += 1`` on a Counter costs four times as much, and
    # finalize does it about twenty times per rollout.
    return defaultdict(int)


SAMPLE_ROWS = 3  # rows the report shows of each kind: kept, and each drop reason
SAMPLE_FIELDS = ("id", "sample_index", "messages", "response", "reward", "finish_reason", "error")


def sample_row(row: dict[str, Any]) -> dict[str, Any]:
    """What the report shows of a row: prompt and reply (an episode's tool calls and results are in its
    messages), reward, the verifier's and the episode's numbers, the error."""
    out = {k: row[k] for k in SAMPLE_FIELDS if k in row}
    out.update((k, v) for k, v in row.items() if k not in out and isinstance(v, (int, float))
               and not isinstance(v, bool) and k not in ("latency_s", "attempts", "source_line"))
    return out


class StatsAccumulator:
    """Feed it every rollout (successful or failed) once; ``result()`` gives stats.json."""

    def __init__(self) -> None:
        # Per-sample and per-prompt values kept whole (exact medians): 8 bytes each, not a list's 32.
        self.rewards = array("d")
        self.metric_sums: dict[str, float] = {}
        self.metric_counts: defaultdict[str, int] = _counts()
        self.errors: defaultdict[str, int] = _counts()
        self.failed = 0
        self.tokens = _counts()
        self.judge_tokens = _counts()  # input_tokens, output_tokens of judge calls (apart from generation)
        self.judge_cost = 0.0  # USD of judge calls at verifier.judge.pricing (their judge_cost_usd metrics)
        self.judge_priced = False
        self.finish = _counts()
        self.kept = 0
        self.validation = 0
        self.drops: defaultdict[str, int] = _counts()
        self.sample_rows: dict[str, list[dict[str, Any]]] = {}  # a few rows per kind (kept, drop reason)
        # Agent episodes (rollouts with a `termination`).
        self.episodes = 0
        self.termination: defaultdict[str, int] = _counts()
        self.model_calls: defaultdict[int, int] = _counts()
        self.tool_calls: defaultdict[int, int] = _counts()
        self.tool_totals: defaultdict[str, int] = _counts()
        # Per task source: samples, failed, kept, reward sum.
        self.sources: dict[str, defaultdict[str, Any]] = {}
        # Output tokens per sample, as value -> count (exact percentiles in bounded memory).
        self.lengths: defaultdict[int, int] = _counts()
        self.kept_lengths: defaultdict[int, int] = _counts()
        # Per prompt (num_repeats > 1).
        # Prompts by (samples, passing samples): pass@k, sizes and none/all pass follow from these.
        self.pass_counts: defaultdict[tuple[int, int], int] = _counts()
        self.prompt_means = array("d")
        self.identical = 0.0
        self.distinct2 = array("d")
        self.repeat_prompts = 0
        # Preference pairs (train.format has preference): pairs made, prompts with one, the reason of
        # each prompt without one, and each pair's reward gap.
        self.pairs = 0
        self.pair_validation = 0
        self.pair_prompts = 0
        self.no_pair: defaultdict[str, int] = _counts()
        self.pair_margins = array("d")

    def add(self, rollout: dict[str, Any], failed: bool, source: str | None = None) -> None:
        # Called once per rollout (a million times on a large run): kept lean, fields read once.
        get = rollout.get
        err = get("error")
        if err:
            self.errors[err.get("type", "unknown")] += 1
        usage = get("usage") or {}
        out_tokens = int(usage.get("output_tokens") or 0)
        tokens = self.tokens
        tokens["input_tokens"] += int(usage.get("input_tokens") or 0)
        tokens["output_tokens"] += out_tokens
        tokens["total_tokens"] += int(usage.get("total_tokens") or 0)
        if len(usage) > 3:  # prompt caching (Anthropic): counted only when the API reports it
            for k in (CACHE_WRITE, CACHE_READ):
                if usage.get(k):
                    tokens[k] += int(usage[k])
        metrics = get("metrics")
        if metrics:
            self._add_metrics(metrics, failed)
        src = None
        if source is not None:
            src = self.sources.get(source)
            if src is None:
                src = self.sources[source] = _counts()
            src["samples"] += 1
        if get("termination") is not None:
            self.episodes += 1
            self.termination[str(rollout["termination"])] += 1
            self.model_calls[int(get("num_model_calls") or 0)] += 1
            self.tool_calls[int(get("num_tool_calls") or 0)] += 1
            for k in ("num_tool_calls", "num_tool_errors", "num_malformed_tool_calls", "num_invalid_tool_arguments"):
                self.tool_totals[k] += int(get(k) or 0)
        if failed:
            self.failed += 1
            if src is not None:
                src["failed"] += 1
            return
        self.lengths[out_tokens] += 1
        reward = get("reward")
        if reward is not None:
            reward = float(reward)
            self.rewards.append(reward)
            if src is not None:
                src["rewarded"] += 1
                src["reward_sum"] += reward
        self.finish[str(get("finish_reason"))] += 1

    def _add_metrics(self, metrics: dict[str, Any], failed: bool) -> None:
        for name, value in metrics.items():  # an LLM judge's, counted apart
            if name.endswith(("judge_input_tokens", "judge_output_tokens")) and isinstance(value, (int, float)):
                self.judge_tokens[name.rsplit("judge_", 1)[1]] += int(value)
            elif name.endswith("judge_cost_usd") and isinstance(value, (int, float)):
                self.judge_cost += float(value)
                self.judge_priced = True
        if failed:
            return
        for k, v in metrics.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                self.metric_sums[k] = self.metric_sums.get(k, 0.0) + float(v)
                self.metric_counts[k] += 1

    def add_kept(self, source: str | None, output_tokens: int, validation: bool = False) -> None:
        """A sample that passed every filter, bound for train/ or (``validation``) validation/."""
        self.kept += 1
        self.validation += validation
        if source is not None:
            src = self.sources.get(source)
            if src is None:  # a partial accumulator (one worker's share) may not have seen the source
                src = self.sources[source] = _counts()
            src["kept"] += 1
        self.kept_lengths[output_tokens] += 1

    def merge(self, other: "StatsAccumulator") -> None:
        """Add another accumulator's counts (one finalize worker's share) to this one. Every
        attribute is an accumulator: counts and sums add up, lists extend, flags combine."""
        for name, theirs in vars(other).items():
            mine = getattr(self, name)
            if isinstance(mine, bool):
                setattr(self, name, mine or theirs)
            elif isinstance(mine, (int, float)):
                setattr(self, name, mine + theirs)
            elif isinstance(mine, array):
                mine.extend(theirs)
            else:  # counts or sums by key, or (sources) such dicts by key
                for key, value in theirs.items():
                    if isinstance(value, list):  # sample rows: the first ones, in task order
                        mine[key] = (mine.get(key) or []) + value[:SAMPLE_ROWS - len(mine.get(key) or [])]
                    elif isinstance(value, dict):
                        into = mine.setdefault(key, _counts())
                        for k, v in value.items():
                            into[k] += v
                    else:
                        mine[key] = mine.get(key, 0) + value

    def add_sample(self, kind: str, row: dict[str, Any]) -> None:
        """Keep ``row`` as a sample of ``kind`` (``kept``, or a drop reason) while there are few."""
        rows = self.sample_rows.setdefault(kind, [])
        if len(rows) < SAMPLE_ROWS:
            rows.append(sample_row(row))

    def add_prompt(self, rewards: list[float], pass_threshold: float, identical_share: float | None,
                   distinct2: float | None) -> None:
        """One prompt's successful samples: pass@k and repetition."""
        n = len(rewards)
        if not n:
            return
        self.pass_counts[n, sum(r >= pass_threshold for r in rewards)] += 1
        self.prompt_means.append(sum(rewards) / n)
        if identical_share is not None:
            self.repeat_prompts += 1
            self.identical += identical_share
            if distinct2 is not None:
                self.distinct2.append(distinct2)

    def curation(self) -> dict[str, Any]:
        """The curation part of stats.json: drops, episodes, sources, lengths, prompts, repetition."""
        out: dict[str, Any] = {"drops_by_reason": dict(sorted(self.drops.items())), "validation": self.validation}
        if self.episodes:
            calls = self.tool_totals["num_tool_calls"]
            out["episodes"] = {
                "count": self.episodes,
                "termination": dict(sorted(self.termination.items())),
                "model_calls_histogram": {str(k): v for k, v in sorted(self.model_calls.items())},
                "tool_calls_histogram": {str(k): v for k, v in sorted(self.tool_calls.items())},
                "tool_calls": calls,
                "tool_errors": self.tool_totals["num_tool_errors"],
                "malformed_tool_calls": self.tool_totals["num_malformed_tool_calls"],
                "invalid_tool_arguments": self.tool_totals["num_invalid_tool_arguments"],
                "tool_error_rate": self.tool_totals["num_tool_errors"] / calls if calls else 0.0,
            }
        out["sources"] = {
            name: {"samples": c["samples"], "failed": c["failed"], "kept": c["kept"],
                   "pass_rate": c["kept"] / (c["samples"] - c["failed"]) if c["samples"] > c["failed"] else 0.0,
                   "mean_reward": c["reward_sum"] / c["rewarded"] if c["rewarded"] else None}
            for name, c in sorted(self.sources.items())
        }
        out["lengths"] = {"output_tokens": _percentiles(self.lengths),
                          "kept_output_tokens": _percentiles(self.kept_lengths),
                          "output_tokens_histogram": _histogram(self.lengths)}
        sizes: defaultdict[int, int] = _counts()
        pass_at: dict[int, float] = {}  # k -> sum over prompts with at least k samples
        pass_at_n: defaultdict[int, int] = _counts()
        for (n, c), count in self.pass_counts.items():
            sizes[n] += count
            ks = [2**i for i in range(n.bit_length())]  # 1, 2, 4, ... up to n, and n itself
            for k in ks + ([n] if n not in ks else []):
                pass_at[k] = pass_at.get(k, 0.0) + count * pass_at_k(n, c, k)
                pass_at_n[k] += count
        prompts = sum(sizes.values())
        if prompts and max(sizes) > 1:
            means = np.frombuffer(self.prompt_means, dtype=np.float64)
            counts, edges = np.histogram(np.clip(means, 0.0, 1.0), bins=HIST_BINS, range=(0.0, 1.0))
            out["prompts"] = {
                "count": prompts,
                "samples_per_prompt": {str(k): v for k, v in sorted(sizes.items())},
                "pass_at_k": {str(k): pass_at[k] / pass_at_n[k] for k in sorted(pass_at)},
                "none_pass": sum(count for (_, c), count in self.pass_counts.items() if c == 0),
                "all_pass": sum(count for (n, c), count in self.pass_counts.items() if c == n),
                "mean_reward_per_prompt": {
                    "mean": float(means.mean()), "median": float(np.median(means)),
                    "histogram": {"edges": [round(float(e), 4) for e in edges], "counts": [int(c) for c in counts]},
                },
            }
        if self.repeat_prompts:
            out["repetition"] = {
                "prompts": self.repeat_prompts,
                "identical_share": self.identical / self.repeat_prompts,
                "distinct_2": float(np.mean(self.distinct2)) if self.distinct2 else None,
            }
        return out

    def result(self) -> dict[str, Any]:
        r = np.frombuffer(self.rewards, dtype=np.float64)
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
            "sample_rows": {k: v for k, v in sorted(self.sample_rows.items(), key=lambda kv: kv[0] != "kept")},
            "finish_reasons": dict(sorted(self.finish.items())),
            "tokens": dict(self.tokens),
            "judge_tokens": dict(self.judge_tokens),
            **({"judge_cost_usd": round(self.judge_cost, 6)} if self.judge_priced else {}),
            **self.curation(),
        }

    def pair_stats(self, min_margin: float, chosen_min_reward: float, max_pairs: int) -> dict[str, Any]:
        """stats.json's ``preference`` section: pairs made, prompts with a pair, and prompts without
        one by reason (every reason listed, 0 included)."""
        from sft_ray.finalize.curate import NO_PAIR_REASONS

        margins = np.frombuffer(self.pair_margins, dtype=np.float64)
        return {"pairs": self.pairs, "validation_pairs": self.pair_validation,
                "prompts_with_pairs": self.pair_prompts,
                "prompts_without_pair": sum(self.no_pair.values()),
                "no_pair_by_reason": {r: self.no_pair.get(r, 0) for r in NO_PAIR_REASONS},
                "mean_margin": float(margins.mean()) if len(margins) else None,
                "min_margin": min_margin, "chosen_min_reward": chosen_min_reward, "max_pairs_per_prompt": max_pairs}

    def metric_means(self) -> dict[str, float]:
        """Mean reward and mean of every verifier metric (NeMo Gym's summary line)."""
        means = {"reward": float(np.mean(self.rewards))} if self.rewards else {}
        means.update({k: self.metric_sums[k] / self.metric_counts[k] for k in sorted(self.metric_sums)})
        return means


UNEXPECTED_EXAMPLES = 10  # rows and files an unexpected_rows section names


def _short(value: Any, limit: int = 100) -> Any:
    """A value of an untrusted row as the report shows it: an int as is, anything else as text cut short."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    text = value if isinstance(value, str) else repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


class Unexpected:
    """Rollouts finalize does not train on because they are none of the run's: in a file no
    recorded session wrote (``unknown_part_file``) or with a key that is not an expected sample
    (``unexpected_key``). Counted by reason; the first few rows and files are named."""

    def __init__(self) -> None:
        self.by_reason: defaultdict[str, int] = _counts()
        self.examples: list[dict[str, Any]] = []
        self.files: dict[str, int] = {}

    def add(self, reason: str, uri: str, row: Any) -> None:
        self.by_reason[reason] += 1
        name = "/".join(uri.rsplit("/", 2)[-2:])  # rollouts/part-..., failed/part-...
        if name in self.files:
            self.files[name] += 1
        elif len(self.files) < UNEXPECTED_EXAMPLES:
            self.files[name] = 1
        if len(self.examples) < UNEXPECTED_EXAMPLES:
            get = row.get if isinstance(row, dict) else (lambda _: None)
            self.examples.append({"reason": reason, "file": name, "id": _short(get("id")),
                                  "sample_index": _short(get("sample_index"))})

    def merge(self, other: "Unexpected") -> None:
        for reason, n in other.by_reason.items():
            self.by_reason[reason] += n
        for name, n in other.files.items():
            if name in self.files or len(self.files) < UNEXPECTED_EXAMPLES:
                self.files[name] = self.files.get(name, 0) + n
        self.examples.extend(other.examples[:UNEXPECTED_EXAMPLES - len(self.examples)])

    def result(self) -> dict[str, Any]:
        return {"count": sum(self.by_reason.values()), "by_reason": dict(sorted(self.by_reason.items())),
                "examples": self.examples, "files": self.files}


def unexpected_lines(stats: dict[str, Any]) -> list[str]:
    """The report's lines on rows not trained on because they are none of the run's (none when there are none)."""
    odd = stats.get("unexpected_rows") or {}
    if not odd.get("count"):
        return []
    lines = [f"UNEXPECTED ROWS, not trained on: {odd['count']} ("
             + ", ".join(f"{k}={v}" for k, v in odd["by_reason"].items()) + "): rows no session of this run "
             "wrote (a file of no recorded session, or a key that is none of the run's samples)"]
    # JSON-quoted: ids and file names come from the rows and the folder, and may hold control characters.
    for ex in odd.get("examples") or []:
        lines.append(f"  {ex['reason']}: {json.dumps(ex['file'])} id {json.dumps(ex['id'])} "
                     f"sample_index {json.dumps(ex['sample_index'])}")
    if odd.get("files"):
        lines.append("  in files: " + ", ".join(f"{json.dumps(f)} ({n})" for f, n in odd["files"].items()))
    return lines


def _percentiles(counts: dict[int, int]) -> dict[str, float]:
    """p50/p90/p99/max/mean of values given as value -> count."""
    n = sum(counts.values())
    if not n:
        return {}
    out: dict[str, float] = {}
    ranks = {p: math.ceil(p / 100 * n) for p in PERCENTILES}  # nearest-rank percentiles
    seen, total = 0, 0
    for value in sorted(counts):
        seen += counts[value]
        total += value * counts[value]
        for p, rank in ranks.items():
            if f"p{p}" not in out and seen >= rank:
                out[f"p{p}"] = value
    out["max"] = max(counts)
    out["mean"] = total / n
    return out


def _histogram(counts: dict[int, int]) -> dict[str, list[float]]:
    """HIST_BINS equal bins from 0 to the largest value, of values given as value -> count."""
    if not counts:
        return {"edges": [], "counts": []}
    values = np.fromiter(counts.keys(), dtype=np.float64)
    weights = np.fromiter(counts.values(), dtype=np.float64)
    hist, edges = np.histogram(values, bins=HIST_BINS, range=(0.0, max(1.0, float(values.max()))), weights=weights)
    return {"edges": [round(float(e), 1) for e in edges], "counts": [int(c) for c in hist]}


def advice(stats: dict[str, Any], temperature: float | None = None) -> list[str]:
    """What to change, in the words of the seed workflow's troubleshooting."""
    tips = []
    temp = f" (now {temperature})" if temperature is not None else ""
    if stats.get("succeeded") and stats.get("kept_fraction", 1.0) < LOW_KEPT_FRACTION:
        tips.append(f"few samples pass ({100 * stats['kept_fraction']:.1f}% kept): lower filter.min_reward or "
                    f"raise responses_create_params.temperature{temp}")
    rep = stats.get("repetition") or {}
    if rep.get("identical_share", 0.0) > REPETITIVE_SHARE:
        tips.append(f"replies are repetitive ({100 * rep['identical_share']:.0f}% identical within a prompt): raise "
                    f"responses_create_params.temperature{temp}, or set filter.dedup: exact")
    return tips


def _hist_lines(hist: dict[str, int], width: int = 30) -> list[str]:
    peak = max(hist.values()) or 1
    return [f"  {k:>4} {v:>9} {'#' * math.ceil(width * v / peak) if v else ''}" for k, v in hist.items()]


def format_report(stats: dict[str, Any]) -> str:
    """The human-readable report printed at the end of a run and by `sft-ray stats`: each of
    :data:`REPORT_SECTIONS` in turn."""
    return "\n".join(line for section in REPORT_SECTIONS for line in section(stats))


def _counts_lines(stats: dict[str, Any]) -> list[str]:
    """Samples, the run's completion, rows that are none of its samples."""
    lines: list[str] = []
    lines.append(f"samples: {stats['samples']}  succeeded: {stats['succeeded']}  failed: {stats['failed']}")
    if "expected" in stats:
        lines.append(f"expected: {stats['expected']}  done: {stats['done']}  pending: {stats['pending']}  "
                     f"failed for good: {stats['failed_final']}  complete: {'yes' if stats['complete'] else 'no'}"
                     + (f"  bad lines skipped: {stats['bad_lines']}" if stats.get("bad_lines") else ""))
    lines += unexpected_lines(stats)
    lines += decontamination_lines(stats)
    return lines


def _reward_lines(stats: dict[str, Any]) -> list[str]:
    """The reward's summary and histogram."""
    lines: list[str] = []
    rw = stats["reward"]
    if rw.get("count"):
        lines.append(
            "reward: mean {mean:.4f}  median {median:.4f}  stdev {stdev:.4f}  min {min:.4f}  max {max:.4f}".format(**rw)
        )
        hist = rw["histogram"]
        peak = max(hist["counts"]) or 1
        for lo, hi, c in zip(hist["edges"], hist["edges"][1:], hist["counts"]):
            bar = "#" * math.ceil(30 * c / peak) if c else ""
            lines.append(f"  [{lo:.1f}, {hi:.1f}{']' if hi >= 1.0 else ')'} {c:>9} {bar}")
    return lines


def _kept_lines(stats: dict[str, Any]) -> list[str]:
    """What the filter kept, errors by type, drops by reason, the validation split."""
    lines: list[str] = []
    if "kept" in stats and stats.get("filter"):
        lines.append(f"kept: {stats['kept']}/{stats['succeeded']} ({100 * stats['kept_fraction']:.1f}%) "
                     f"with {stats['filter']}")
    if stats["errors_by_type"]:
        lines.append("errors: " + ", ".join(f"{k}={v}" for k, v in stats["errors_by_type"].items()))
    drops = stats.get("drops_by_reason") or {}
    if drops:
        lines.append("dropped: " + ", ".join(f"{k}={v}" for k, v in sorted(drops.items(), key=lambda kv: -kv[1])))
    fraction = (stats.get("train") or {}).get("validation_fraction")
    if stats.get("validation"):
        lines.append(f"validation: {stats['validation']} samples (split by prompt)")
    elif fraction:
        lines.append(f"validation: 0 samples: validation_fraction {fraction:g} picked none of the prompts (each "
                     "falls there with that chance); no validation split is written, raise the fraction for one")
    return lines


def _episodes_lines(stats: dict[str, Any]) -> list[str]:
    """Agent episodes: terminations, tool calls, calls per episode."""
    lines: list[str] = []
    ep = stats.get("episodes")
    if ep:
        lines.append(f"episodes: {ep['count']}  termination: "
                     + ", ".join(f"{k}={v}" for k, v in ep["termination"].items())
                     + f"  tool calls {ep['tool_calls']}, tool errors {ep['tool_errors']} "
                     f"({100 * ep['tool_error_rate']:.1f}%), malformed {ep['malformed_tool_calls']}, "
                     f"invalid arguments {ep.get('invalid_tool_arguments', 0)}")
        lines.append("model calls per episode:")
        lines += _hist_lines(ep["model_calls_histogram"])
        lines.append("tool calls per episode:")
        lines += _hist_lines(ep["tool_calls_histogram"])
    return lines


def _sources_lines(stats: dict[str, Any]) -> list[str]:
    """Per input file, when there are several."""
    lines: list[str] = []
    sources = stats.get("sources") or {}
    if len(sources) > 1:
        for name, src in sources.items():
            mean = f"{src['mean_reward']:.4f}" if src.get("mean_reward") is not None else "-"
            lines.append(f"source {name}: samples {src['samples']}  kept {src['kept']} "
                         f"({100 * src['pass_rate']:.1f}%)  mean reward {mean}")
    return lines


def _prompts_lines(stats: dict[str, Any]) -> list[str]:
    """Per prompt: pass@k (not with rejection sampling), prompts none of whose samples pass."""
    lines: list[str] = []
    pr = stats.get("prompts")
    if pr and "pass_at_k" in pr:
        lines.append(f"prompts: {pr['count']}  pass@k: "
                     + ", ".join(f"@{k} {v:.3f}" for k, v in pr["pass_at_k"].items())
                     + f"  none pass {pr['none_pass']}  all pass {pr['all_pass']}  "
                     f"mean reward per prompt {pr['mean_reward_per_prompt']['mean']:.4f}")
    elif pr:  # rejection sampling: pass@k would be biased (see the rejection lines)
        lines.append(f"prompts: {pr['count']}  none pass {pr['none_pass']}  "
                     f"mean reward per prompt {pr['mean_reward_per_prompt']['mean']:.4f}")
    return lines


def _rejection_lines(stats: dict[str, Any]) -> list[str]:
    """Rejection sampling: prompts that reached the target, samples drawn and saved."""
    lines: list[str] = []
    rej = stats.get("rejection")
    if rej:
        lines.append(f"rejection sampling: {rej['reached_target']}/{rej['prompts']} prompts reached "
                     f"{rej['target_passing']} passing (reward >= {rej['min_reward']:g}), "
                     f"{rej['finished_below_target']} used all {rej['max_samples']} samples "
                     f"({rej['never_passed']} never passed"
                     + (f", listed in {rej['never_passed_file']}" if rej.get("never_passed_file") and
                        rej["never_passed"] else "") + ")"
                     + (f", {rej['unfinished']} unfinished" if rej["unfinished"] else ""))
        lines.append(f"  samples drawn: {rej['samples_drawn']} of {rej['samples_at_max']} at max_samples: "
                     f"{rej['samples_saved']} saved ({100 * rej['saved_fraction']:.1f}%)")
        first = rej.get("samples_to_first_pass") or {}
        if first.get("prompts"):
            lines.append(f"  samples to the first pass: mean {first['mean']:.2f} over {first['prompts']} prompt(s) ("
                         + ", ".join(f"{k}: {v}" for k, v in first["histogram"].items()) + ")")
        if rej.get("passing_share_per_prompt") is not None:
            lines.append(f"  passing share per prompt: mean {rej['passing_share_per_prompt']:.3f}  (pass@k is not "
                         "reported: prompts stop drawing once they pass, which biases it)")
    return lines


def _preference_lines(stats: dict[str, Any]) -> list[str]:
    """Preference pairs."""
    lines: list[str] = []
    pref = stats.get("preference")
    if pref:
        margin = f", mean reward gap {pref['mean_margin']:.3f}" if pref.get("mean_margin") is not None else ""
        lines.append(f"preference pairs: {pref['pairs']} from {pref['prompts_with_pairs']} prompts{margin}; "
                     f"{pref['prompts_without_pair']} prompts without a pair ("
                     + ", ".join(f"{k}={v}" for k, v in pref["no_pair_by_reason"].items()) + ")")
    return lines


def _quality_lines(stats: dict[str, Any]) -> list[str]:
    """Repetition, output lengths, advice."""
    lines: list[str] = []
    rep = stats.get("repetition")
    if rep:
        d2 = f"{rep['distinct_2']:.3f}" if rep.get("distinct_2") is not None else "-"
        lines.append(f"repetition: {100 * rep['identical_share']:.1f}% identical replies per prompt, distinct-2 {d2}")
    ln = (stats.get("lengths") or {}).get("output_tokens")
    if ln:
        lines.append("output tokens: " + "  ".join(f"{k} {v:.0f}" for k, v in ln.items()))
    for tip in stats.get("advice") or []:
        lines.append(f"advice: {tip}")
    return lines


def _usage_lines(stats: dict[str, Any]) -> list[str]:
    """Tokens, spend, throughput."""
    lines: list[str] = []
    tok = stats.get("tokens") or {}
    if tok:
        line = f"tokens: input {tok.get('input_tokens', 0)}  output {tok.get('output_tokens', 0)}"
        if tok.get(CACHE_WRITE) or tok.get(CACHE_READ):
            line += f"  cache write {tok.get(CACHE_WRITE, 0)}  cache read {tok.get(CACHE_READ, 0)}"
        lines.append(line)
    judge = stats.get("judge_tokens") or {}
    if judge:
        lines.append(f"judge tokens: input {judge.get('input_tokens', 0)}  output {judge.get('output_tokens', 0)}")
    sp = stats.get("spend") or {}  # cost and requests (sft_ray/cost.py)
    if sp.get("cost_usd") or sp.get("requests") or sp.get("judge_cost_usd"):
        line = f"spend: ${sp.get('total_cost_usd', sp['cost_usd']):.4f}"
        if sp.get("judge_cost_usd"):
            line += f" (generation ${sp['cost_usd']:.4f}, judge ${sp['judge_cost_usd']:.4f})"
        if "projected_cost_usd" in sp:
            line += f" (projected for the whole input ${sp['projected_cost_usd']:.2f})"
        if sp.get("requests"):
            line += f"; {sp['requests']} requests, {sp.get('rate_limited', 0)} answered 429"
        lines.append(line)
    if "cache_saved_usd" in sp:
        lines.append(f"prompt caching: {sp[CACHE_READ]} input tokens read from the cache, {sp[CACHE_WRITE]} written "
                     f"to it; saved ${sp['cache_saved_usd']:.4f} against sending them uncached")
    thr = stats.get("throughput")
    if thr:
        lines.append(f"throughput: {thr['samples_per_s']:.1f} samples/s, {thr['output_tokens_per_s']:.1f} "
                     f"output tokens/s over {thr['generate_wall_s']:.1f} s")
    return lines


# The report's sections, in the order printed (a new stats section: a function here).
REPORT_SECTIONS = (_counts_lines, _reward_lines, _kept_lines, _episodes_lines, _sources_lines, _prompts_lines,
                   _rejection_lines, _preference_lines, _quality_lines, _usage_lines)


class Tally:
    """The report's rejection section, counted prompt by prompt in finalize (streamed: only the
    prompts that never passed are kept, for ``never_passed.jsonl``)."""

    def __init__(self, target: int, max_samples: int, threshold: float) -> None:
        self.target, self.max_samples, self.threshold = target, max_samples, threshold
        self.prompts = self.reached = self.below = self.unfinished = self.drawn = 0
        self.never: list[dict[str, Any]] = []
        # Sound under sequential sampling: scored samples up to the first pass (by sample index: the draw
        # order) per prompt that passed, and each prompt's passing share of its scored samples.
        self.to_first_pass: dict[int, int] = {}
        self.share_sum, self.scored_prompts = 0.0, 0

    def add(self, rid: str, rewards: list[float], failures: int, source: str | None,
            indices: list[int] | None = None) -> None:
        """One prompt: the rewards of its samples (``indices``: their sample indices, the draw
        order), and its failed samples (drawn, without a reward)."""
        n = len(rewards) + failures
        passing = sum(r >= self.threshold for r in rewards)
        self.prompts += 1
        self.drawn += n
        if rewards:
            self.scored_prompts += 1
            self.share_sum += passing / len(rewards)
            order = [r for _, r in sorted(zip(indices, rewards))] if indices is not None else rewards
            first = next((i for i, r in enumerate(order, start=1) if r >= self.threshold), None)
            if first is not None:
                self.to_first_pass[first] = self.to_first_pass.get(first, 0) + 1
        if passing >= self.target:
            self.reached += 1
        elif n >= self.max_samples:
            self.below += 1
            if not passing:
                self.never.append({"id": rid, "source": source, "samples": n,
                                   "best_reward": max(rewards) if rewards else None})
        else:
            self.unfinished += 1

    def merge(self, other: "Tally") -> None:
        """Add another tally's prompts (one finalize worker's share)."""
        self.prompts += other.prompts
        self.reached += other.reached
        self.below += other.below
        self.unfinished += other.unfinished
        self.drawn += other.drawn
        self.never.extend(other.never)
        for k, v in other.to_first_pass.items():
            self.to_first_pass[k] = self.to_first_pass.get(k, 0) + v
        self.share_sum += other.share_sum
        self.scored_prompts += other.scored_prompts

    def result(self) -> dict[str, Any]:
        most = self.prompts * self.max_samples
        return {"target_passing": self.target, "max_samples": self.max_samples, "min_reward": self.threshold,
                "prompts": self.prompts, "reached_target": self.reached, "finished_below_target": self.below,
                "never_passed": len(self.never), "unfinished": self.unfinished, "samples_drawn": self.drawn,
                "samples_at_max": most, "samples_saved": most - self.drawn,
                "saved_fraction": round((most - self.drawn) / most, 4) if most else 0.0,
                "samples_to_first_pass": self._first_pass(),
                "passing_share_per_prompt": round(self.share_sum / self.scored_prompts, 4)
                if self.scored_prompts else None}

    def _first_pass(self) -> dict[str, Any]:
        """Over the prompts that passed: scored samples drawn up to and including the first passing one."""
        passed = sum(self.to_first_pass.values())
        total = sum(k * v for k, v in self.to_first_pass.items())
        return {"prompts": passed, "mean": round(total / passed, 4) if passed else None,
                "histogram": {str(k): v for k, v in sorted(self.to_first_pass.items())}}
