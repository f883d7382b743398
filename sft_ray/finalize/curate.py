"""Curation rules of phase 2 (finalize): per-row quality filters, then per-prompt choices.

Row rules look at one rollout (reward, truncation, length, how an agent episode ended).
Prompt rules look at all samples of one prompt together (duplicates, at most k per prompt,
the validation split, pass@k, repetition); finalize groups the samples of a prompt by
bucketing on a hash of the prompt id, so one group is in memory at a time.
A prompt is identified by the rollout ``id``: the samples of a prompt share it and differ
in ``sample_index``.
"""

from __future__ import annotations

import functools
import hashlib
import math
from typing import Any, NamedTuple

from sft_ray.finalize.formats import generated_start

# Row drop reasons, in the order they are checked (a row is counted under the first that applies).
ROW_REASONS = (
    "error", "no_reward", "termination_max_steps", "termination_length", "termination_error",
    "malformed_tool_calls", "invalid_tool_arguments", "tool_errors", "too_few_tool_calls", "too_many_tool_calls",
    "truncated", "too_long", "below_min_reward", "above_max_reward",
)
# Why a prompt gave no preference pair, in the order they are decided (stats.json's preference section).
NO_PAIR_REASONS = ("one_sample", "none_passed", "all_passed", "margin_too_small")
NUM_PERM = 64  # MinHash permutations: error of the Jaccard estimate about 1/sqrt(64) = 0.125
TEXT_CAP = 8192  # characters of a reply kept for near-dedup and distinct-n (whole reply hashed for exact)


class RowRules:
    """The row rules of a filter config: ``rules(row)`` says why a successful rollout does not reach
    train/, or None when it passes every one. The settings are read once, not per row (finalize
    calls this a million times on a large run)."""

    def __init__(self, filter_cfg: dict[str, Any]) -> None:
        self.drop_unfinished = filter_cfg.get("drop_unfinished", True)
        self.drop_malformed = filter_cfg.get("drop_malformed_tool_calls", True)
        self.keep_invalid_args = filter_cfg.get("keep_invalid_tool_arguments", False)
        self.drop_tool_errors = filter_cfg.get("drop_tool_errors")
        self.min_calls, self.max_calls = filter_cfg.get("min_tool_calls"), filter_cfg.get("max_tool_calls")
        self.drop_truncated = filter_cfg.get("drop_truncated", True)
        self.max_tokens = filter_cfg.get("max_tokens")
        self.min_reward, self.max_reward = filter_cfg.get("min_reward", 0.0), filter_cfg.get("max_reward")

    def __call__(self, row: dict[str, Any]) -> str | None:
        get = row.get
        if get("error"):
            return "error"
        reward = get("reward")
        if reward is None:
            return "no_reward"
        term = get("termination")  # only agent episodes have it
        if term is not None and term != "final" and self.drop_unfinished:
            return f"termination_{term}" if f"termination_{term}" in ROW_REASONS else "termination_error"
        if self.drop_malformed and (get("num_malformed_tool_calls") or 0) > 0:
            return "malformed_tool_calls"
        if not self.keep_invalid_args and (get("num_invalid_tool_arguments") or 0) > 0:
            return "invalid_tool_arguments"
        if self.drop_tool_errors and (get("num_tool_errors") or 0) > 0:
            return "tool_errors"
        if self.min_calls is not None or self.max_calls is not None:
            calls = get("num_tool_calls") or 0
            if self.min_calls is not None and calls < self.min_calls:
                return "too_few_tool_calls"
            if self.max_calls is not None and calls > self.max_calls:
                return "too_many_tool_calls"
        if self.drop_truncated and get("finish_reason") == "length":
            return "truncated"
        if self.max_tokens is not None and output_tokens(row) > self.max_tokens:
            return "too_long"
        r = float(reward)
        if r < self.min_reward:
            return "below_min_reward"
        if self.max_reward is not None and r > self.max_reward:
            return "above_max_reward"
        return None


def output_tokens(row: dict[str, Any]) -> int:
    return int((row.get("usage") or {}).get("output_tokens") or 0)


def source_of(row: dict[str, Any]) -> str:
    """The task source a rollout is reported under: its ``task_source`` field, else its input file
    (``source_file``, where the pipeline records it), else ``all``."""
    src = row.get("task_source") or row.get("source_file")
    return str(src) if src is not None and src != "" else "all"


def reply_text(row: dict[str, Any]) -> str:
    """What the model generated (every generated turn, tool calls and tool results included),
    normalised for comparison: lower case, runs of whitespace as one space."""
    if row.get("num_model_calls") is None and isinstance(row.get("response"), str):
        return " ".join(row["response"].split()).lower()  # single-turn: the reply is the response
    parts = []
    for m in (row.get("messages") or [])[generated_start(row):]:
        if m.get("content"):
            parts.append(m["content"] if isinstance(m["content"], str) else str(m["content"]))
        for c in m.get("tool_calls") or []:
            f = c.get("function") or {}
            parts.append(f"{f.get('name')}({f.get('arguments')})")
    return " ".join("\n".join(parts).split()).lower()


@functools.lru_cache(maxsize=8)
def _keyer(seed: int) -> Any:
    # Keying a blake2b costs as much as hashing a short string: key once per seed, copy per use.
    return hashlib.blake2b(digest_size=8, key=str(seed).encode()[:64])


def shuffle_key(seed: int, rid: str, sample_index: int) -> str:
    """A sample's place in the global shuffle: 16 hex digits (so sorting the text sorts the keys)."""
    h = _keyer(seed).copy()
    h.update(f"{rid}\x00{sample_index}".encode())
    return h.hexdigest()


def in_validation(seed: int, rid: str, fraction: float) -> bool:
    """The split of a prompt: decided by its id alone, so all its samples fall on one side."""
    if fraction <= 0:
        return False
    h = _keyer(seed).copy()
    h.update(f"validation\x00{rid}".encode())
    return int.from_bytes(h.digest(), "big") < fraction * 2.0**64


def _shingles(text: str, n: int = 3) -> list[bytes]:
    words = text.split()
    if len(words) < n:
        return [w.encode() for w in words] or [b""]
    return [" ".join(words[i:i + n]).encode() for i in range(len(words) - n + 1)]


class Scored(NamedTuple):
    """A scored rollout in a prompt bucket, as the per-prompt pass needs it. The scan writes
    all fields but the last as a JSON array, a tab, then the training row's bytes."""

    prompt_id: str
    shuffle_key: str  # "" unless the rollout passed the row rules
    reward: float
    passed_rules: bool  # passed the row rules: a candidate for train/
    digest: str  # blake2b of the normalised reply when longer than ``text`` ("" otherwise)
    text: str  # the normalised reply, capped at TEXT_CAP
    source: str | None
    output_tokens: int
    input_line: str | None  # "file:line" of the prompt, when the job keeps it
    sample_index: int  # the draw order (rejection sampling's samples to the first pass)
    # The training row in its format (b"" unless the rollout passed the row rules); with several
    # sample formats, their rows joined by tabs (orjson escapes a tab inside a string, so none is raw).
    train_row: bytes
    # With preference pairs: the rollout's prompt/completion row when it is a candidate (it passed the
    # row rules but for the reward bounds), b"" otherwise.
    pair_row: bytes = b""

    @property
    def duplicate_key(self) -> str:
        """What exact duplicates compare: the digest of a long reply, else the reply itself."""
        return self.digest or self.text


SCORED_META = len(Scored._fields) - 2  # the fields the scan writes as a JSON array: all but the two rows


def choose(samples: list[Scored], filter_cfg: dict[str, Any], max_per_prompt: int | None) -> dict[int, str]:
    """Prompt rules over one prompt's samples that passed the row rules.

    Returns ``{index in samples: drop reason}``. Preference goes to the highest reward, ties
    broken by the shuffle key (so the shuffle seed decides them).
    """
    order = sorted(range(len(samples)), key=lambda i: (-samples[i].reward, samples[i].shuffle_key))
    dropped: dict[int, str] = {}
    dedup = filter_cfg.get("dedup", "none")
    if dedup in ("exact", "near"):
        seen: set[str] = set()
        for i in order:
            key = samples[i].duplicate_key
            if key in seen:
                dropped[i] = "duplicate_exact"
            seen.add(key)
    if dedup == "near":
        from datasketch import MinHash

        rest = [i for i in order if i not in dropped]
        hashes = MinHash.bulk([_shingles(samples[i].text) for i in rest], num_perm=NUM_PERM)
        kept: list[MinHash] = []
        threshold = filter_cfg.get("near_dedup_threshold", 0.8)
        # Pairwise within one prompt: groups are num_repeats samples, so an LSH index would not pay off.
        for i, mh in zip(rest, hashes):
            if any(mh.jaccard(other) >= threshold for other in kept):
                dropped[i] = "duplicate_near"
            else:
                kept.append(mh)
    if max_per_prompt is not None:
        left = [i for i in order if i not in dropped]
        for i in left[max_per_prompt:]:
            dropped[i] = "over_max_per_prompt"
    return dropped


def make_pairs(samples: list[Scored], min_margin: float, chosen_min_reward: float,
               max_pairs: int) -> tuple[list[tuple[int, int]], str | None]:
    """Preference pairs among one prompt's candidates: ``([(chosen, rejected) indices], None)``, or
    ``([], reason)`` with the reason from :data:`NO_PAIR_REASONS` when none can be made.

    The best sample is paired with the worst, the second best with the second worst, and so on
    (each sample in one pair at most), while the chosen one reaches ``chosen_min_reward`` and the
    gap is at least ``min_margin``; equal rewards are ordered by the shuffle key (the seed decides)."""
    n = len(samples)
    if n < 2:
        return [], "one_sample"
    best = sorted(range(n), key=lambda i: (-samples[i].reward, samples[i].shuffle_key))
    worst = sorted(range(n), key=lambda i: (samples[i].reward, samples[i].shuffle_key))
    pairs: list[tuple[int, int]] = []
    used: set[int] = set()
    for c, r in zip(best, worst):
        if len(pairs) >= max_pairs or c == r or c in used or r in used:
            break
        if samples[c].reward < chosen_min_reward or samples[c].reward - samples[r].reward < min_margin:
            break  # the next pair is no better: its chosen is lower and its rejected higher
        pairs.append((c, r))
        used.update((c, r))
    if pairs:
        return pairs, None
    rewards = [s.reward for s in samples]
    if max(rewards) < chosen_min_reward:
        return [], "none_passed"
    if min(rewards) >= chosen_min_reward:
        return [], "all_passed"
    return [], "margin_too_small"


@functools.lru_cache(maxsize=4096)  # few distinct (n, c, k), asked once per prompt
def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of one prompt with n samples, c of them passing (Chen et al., 2021)."""
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def distinct_n(texts: list[str], n: int = 2) -> float | None:
    """Distinct n-grams over all n-grams of a prompt's replies (1.0: no n-gram repeats)."""
    total, seen = 0, set()
    for t in texts:
        words = t.split()
        if len(words) >= n:
            total += len(words) - n + 1
            seen.update(zip(words, words[1:]) if n == 2 else zip(*(words[i:] for i in range(n))))
    return len(seen) / total if total else None
