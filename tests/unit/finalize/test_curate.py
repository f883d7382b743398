"""Curation in finalize: episode filters, dedup, at most k per prompt, length, validation split,
per-prompt and per-source report, in process. (`sft-ray filter` / `stats` re-cutting a run: tests/e2e/test_filter_stats_cli.py.)"""

from __future__ import annotations

import math

import pytest
from handmade import episodes, prompt_samples, read_rows, single_rollout, write_run

from sft_ray.finalize import passes as fin
from sft_ray.finalize.passes import finalize
from sft_ray.finalize.stats import format_report

TRAIN = {"rows_per_shard": 1000, "include_fields": ["id", "sample_index", "reward"]}


def keys(rows):
    return sorted((r["id"], r["sample_index"]) for r in rows)


def test_episode_filters_by_default_and_their_report(tmp_path):
    write_run(tmp_path, episodes())
    stats = finalize(str(tmp_path), {}, 0, TRAIN)
    assert keys(read_rows(tmp_path / "train")) == keys(
        [{"id": i, "sample_index": 0} for i in ("p0", "p1", "p6", "p7", "p8", "t0", "t1")])
    assert stats["drops_by_reason"] == {"termination_max_steps": 1, "termination_length": 1,
                                        "termination_error": 1, "malformed_tool_calls": 1}
    ep = stats["episodes"]
    assert ep["count"] == 9 and ep["termination"] == {"error": 1, "final": 6, "length": 1, "max_steps": 1}
    assert ep["model_calls_histogram"] == {"1": 1, "2": 6, "4": 1, "6": 1}
    assert ep["tool_calls_histogram"] == {"0": 1, "2": 7, "5": 1}
    assert ep["tool_calls"] == 19 and ep["tool_errors"] == 3
    assert ep["tool_error_rate"] == pytest.approx(3 / 19) and ep["malformed_tool_calls"] == 1
    report = format_report(stats)
    assert "termination_max_steps=1" in report and "tool errors 3 (15.8%)" in report
    assert "model calls per episode:" in report and "tool calls per episode:" in report


def test_episode_filter_options(tmp_path):
    write_run(tmp_path, episodes())
    stats = finalize(str(tmp_path), {"drop_tool_errors": True, "min_tool_calls": 1, "max_tool_calls": 4,
                                     "drop_unfinished": False, "drop_malformed_tool_calls": False,
                                     "drop_truncated": False}, 0, TRAIN)
    # tool-call bounds apply to single-turn rows too (they made no tool call)
    assert keys(read_rows(tmp_path / "train")) == keys(
        [{"id": i, "sample_index": 0} for i in ("p0", "p1", "p2", "p3", "p4", "p5")])
    assert stats["drops_by_reason"] == {"tool_errors": 2, "too_few_tool_calls": 3}


def test_length_filters(tmp_path):
    rows = [single_rollout(i, response=" ".join(["w"] * i)) for i in range(10)]
    rows[3]["finish_reason"] = "length"
    write_run(tmp_path, rows)
    stats = finalize(str(tmp_path), {"max_tokens": 8}, 0, TRAIN)  # output_tokens = 3 + words
    assert keys(read_rows(tmp_path / "train")) == keys([r for r in rows if r["usage"]["output_tokens"] <= 8
                                                        and r["finish_reason"] != "length"])
    assert stats["drops_by_reason"] == {"truncated": 1, "too_long": 4}
    lengths = stats["lengths"]["output_tokens"]
    assert lengths["p50"] == 7 and lengths["p90"] == 11 and lengths["max"] == 12 and lengths["mean"] == 7.5
    assert stats["lengths"]["kept_output_tokens"]["max"] == 8
    stats = finalize(str(tmp_path), {"drop_truncated": False}, 0, TRAIN)
    assert stats["kept"] == 10 and stats["drops_by_reason"] == {}


def test_max_per_prompt_keeps_the_best_rewards_ties_by_seed(tmp_path):
    rows = prompt_samples()
    write_run(tmp_path, rows)
    stats = finalize(str(tmp_path), {}, 1, {**TRAIN, "max_per_prompt": 2})
    got = read_rows(tmp_path / "train")
    by_prompt = {}
    for r in got:
        by_prompt.setdefault(r["id"], []).append(r["reward"])
    assert len(by_prompt) == 20 and all(len(v) == 2 for v in by_prompt.values())
    for pid, kept in by_prompt.items():
        best = sorted((r["reward"] for r in rows if r["id"] == pid), reverse=True)[:2]
        assert sorted(kept, reverse=True) == best
    assert stats["drops_by_reason"] == {"over_max_per_prompt": 80} and stats["kept"] == 40
    # ties are broken by the shuffle seed: same seed, same choice; another seed, another choice
    first = keys(got)
    finalize(str(tmp_path), {}, 1, {**TRAIN, "max_per_prompt": 2})
    assert keys(read_rows(tmp_path / "train")) == first
    finalize(str(tmp_path), {}, 2, {**TRAIN, "max_per_prompt": 2})
    assert keys(read_rows(tmp_path / "train")) != first


def test_exact_dedup_is_per_prompt_and_keeps_the_best(tmp_path):
    rows = prompt_samples()
    write_run(tmp_path, rows)
    stats = finalize(str(tmp_path), {"dedup": "exact"}, 0, TRAIN)
    got = read_rows(tmp_path / "train")
    # per prompt: "the same reply" 4 times once normalised, "shared text" once, one unique reply -> 3 kept of 6
    assert stats["drops_by_reason"] == {"duplicate_exact": 60} and len(got) == 60
    for p in range(20):
        mine = [r for r in got if r["id"] == f"s{p}"]
        texts = [r["messages"][-1]["content"].lower().replace("  ", " ") for r in mine]
        assert len(texts) == len(set(texts)) == 3
        same = [r for r in rows if r["id"] == f"s{p}" and r["response"].lower().replace("  ", " ") == "the same reply"]
        assert max(r["reward"] for r in same) in [r["reward"] for r in mine if "same" in r["messages"][-1]["content"]
                                                  .lower()]
    # the same text under different prompts is not a duplicate
    assert sum(r["messages"][-1]["content"] == "shared text" for r in got) == 20
    rep = stats["repetition"]
    assert rep["prompts"] == 20 and rep["identical_share"] == pytest.approx(3 / 6)
    assert any("raise responses_create_params.temperature" in a for a in stats["advice"])


def test_near_dedup_drops_near_copies_only(tmp_path):
    base = ("the quick brown fox jumps over the lazy dog while the farmer watches from the old wooden fence "
            "and thinks about the harvest that will come in the autumn after a long and dry summer season")
    words = base.split()
    near = " ".join(words[:-1] + ["autumn"])  # one word changed of 34
    other = "a completely different answer about prime numbers and their distribution among the integers"
    rows = [single_rollout(0, sample_index=k, response=t, reward=r)
            for k, (t, r) in enumerate([(base, 0.5), (near, 1.0), (other, 1.0)])]
    write_run(tmp_path, rows, files=1)
    stats = finalize(str(tmp_path), {"dedup": "near"}, 0, TRAIN)
    got = read_rows(tmp_path / "train")
    assert stats["drops_by_reason"] == {"duplicate_near": 1}
    assert sorted(r["sample_index"] for r in got) == [1, 2]  # the near copy with the higher reward stays
    assert finalize(str(tmp_path), {"dedup": "exact"}, 0, TRAIN)["kept"] == 3


def test_validation_split_is_by_prompt_and_deterministic(tmp_path):
    write_run(tmp_path, prompt_samples(n_prompts=200, n=3))
    stats = finalize(str(tmp_path), {}, 5, {**TRAIN, "validation_fraction": 0.25, "rows_per_shard": 100})
    train, val = read_rows(tmp_path / "train"), read_rows(tmp_path / "validation")
    assert {r["id"] for r in train}.isdisjoint({r["id"] for r in val})
    assert len(train) + len(val) == 600 and stats["validation"] == len(val) and stats["train_rows"] == len(train)
    n_val_prompts = len({r["id"] for r in val})
    assert 30 <= n_val_prompts <= 70 and len(val) == 3 * n_val_prompts  # all samples of a prompt together
    assert sum(stats["validation_shards"]) == len(val) and sum(stats["shards"]) == len(train)
    again = finalize(str(tmp_path), {}, 5, {**TRAIN, "validation_fraction": 0.25, "rows_per_shard": 100})
    assert again["validation"] == stats["validation"] and keys(read_rows(tmp_path / "validation")) == keys(val)
    card = (tmp_path / "README.md").read_text()
    assert "split: validation" in card and "validation/part-*.jsonl" in card
    finalize(str(tmp_path), {}, 5, TRAIN)  # no split any more: validation/ goes
    assert not (tmp_path / "validation").exists() and "validation" not in (tmp_path / "README.md").read_text()


def test_pass_at_k_and_sources(tmp_path):
    rows = prompt_samples(n_prompts=30, n=4, seed=3)
    write_run(tmp_path, rows, failed=[{"id": "f", "sample_index": 0, "reward": None, "task_source": "code",
                                       "error": {"type": "timeout", "message": "m"}}])
    stats = finalize(str(tmp_path), {"min_reward": 0.5}, 0, TRAIN)
    pr = stats["prompts"]
    assert pr["count"] == 30 and pr["samples_per_prompt"] == {"4": 30}
    per_prompt = {}
    for r in rows:
        per_prompt.setdefault(r["id"], []).append(r["reward"])
    c = {p: sum(x >= 0.5 for x in v) for p, v in per_prompt.items()}
    assert pr["pass_at_k"]["1"] == pytest.approx(sum(n / 4 for n in c.values()) / 30)
    assert pr["pass_at_k"]["4"] == pytest.approx(sum(n > 0 for n in c.values()) / 30)
    assert pr["pass_at_k"]["2"] == pytest.approx(sum(1 - math.comb(4 - n, 2) / 6 for n in c.values()) / 30)
    assert pr["none_pass"] == sum(n == 0 for n in c.values()) and pr["all_pass"] == sum(n == 4 for n in c.values())
    assert pr["mean_reward_per_prompt"]["mean"] == pytest.approx(sum(sum(v) / 4 for v in per_prompt.values()) / 30)
    src = stats["sources"]
    for name in ("math", "code"):
        mine = [r for r in rows if r["task_source"] == name]
        assert src[name]["kept"] == sum(r["reward"] >= 0.5 for r in mine)
        assert src[name]["pass_rate"] == pytest.approx(src[name]["kept"] / len(mine))
        assert src[name]["mean_reward"] == pytest.approx(sum(r["reward"] for r in mine) / len(mine))
    assert src["code"]["failed"] == 1 and src["code"]["samples"] == 61
    report = format_report(stats)
    assert "source math:" in report and "pass@k: @1" in report


def test_grouping_survives_many_spilled_buckets(tmp_path, monkeypatch):
    rows = prompt_samples(n_prompts=300, n=5)
    write_run(tmp_path, rows, files=4)
    cut = {**TRAIN, "max_per_prompt": 2, "validation_fraction": 0.2}
    in_memory = finalize(str(tmp_path), {"dedup": "exact"}, 3, cut)
    order = [(r["id"], r["sample_index"]) for r in read_rows(tmp_path / "train")]
    monkeypatch.setattr(fin, "BUCKET_BYTES", 10_000)  # many on-disk prompt and shuffle buckets
    monkeypatch.setattr(fin, "GROUP_BUCKET_BYTES", 7_000)
    spilled = finalize(str(tmp_path), {"dedup": "exact"}, 3, cut)
    assert [(r["id"], r["sample_index"]) for r in read_rows(tmp_path / "train")] == order
    assert spilled["drops_by_reason"] == in_memory["drops_by_reason"] and spilled["validation"] == in_memory["validation"]
    a, b = spilled["prompts"], in_memory["prompts"]  # sums in another order: equal up to rounding
    assert a["none_pass"] == b["none_pass"] and a["pass_at_k"] == pytest.approx(b["pass_at_k"])
