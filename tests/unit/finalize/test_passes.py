"""Phase 2 on hand-made run folders: filter, deterministic global shuffle, balanced shards, stats."""

from __future__ import annotations

import random
import statistics

import pyarrow.parquet as pq
import pytest
from handmade import make_run, train_rows

from sft_ray import io
from sft_ray.finalize import passes as fin
from sft_ray.finalize.passes import finalize, shard_sizes

TRAIN = {"rows_per_shard": 100, "format": "jsonl", "include_fields": ["id", "sample_index", "reward"]}


def test_stats_match_a_direct_computation(tmp_path):
    rows = make_run(tmp_path)
    stats = finalize(str(tmp_path), {"min_reward": 0.5}, 1, TRAIN)
    rewards = [r["reward"] for r in rows]
    assert stats["succeeded"] == len(rows) and stats["failed"] == 7 and stats["samples"] == len(rows) + 7
    rw = stats["reward"]
    assert rw["mean"] == pytest.approx(statistics.mean(rewards))
    assert rw["median"] == pytest.approx(statistics.median(rewards))
    assert rw["stdev"] == pytest.approx(statistics.stdev(rewards))
    assert rw["min"] == min(rewards) and rw["max"] == max(rewards)
    assert sum(rw["histogram"]["counts"]) == len(rows)
    assert rw["histogram"]["counts"][-1] == sum(1 for r in rewards if r >= 0.9)
    assert stats["kept"] == sum(1 for r in rewards if r >= 0.5)
    assert stats["kept_fraction"] == pytest.approx(stats["kept"] / len(rows))
    assert stats["errors_by_type"] == {"rate_limit": 3, "timeout": 4}
    assert stats["metrics"]["accuracy"] == pytest.approx(statistics.mean(float(r == 1.0) for r in rewards))
    assert stats["tokens"]["output_tokens"] == 5 * len(rows)


def test_filter_keeps_exactly_the_rows_jq_would(tmp_path):
    rows = make_run(tmp_path)
    finalize(str(tmp_path), {"min_reward": 0.5}, 1, TRAIN)
    got = sorted((r["id"], r["sample_index"]) for r in train_rows(tmp_path))
    want = sorted((r["id"], r["sample_index"]) for r in rows if r["reward"] >= 0.5)
    assert got == want
    assert all(set(r) == {"messages", "id", "sample_index", "reward"} for r in train_rows(tmp_path))


def test_shuffle_is_deterministic_global_and_independent_of_file_order(tmp_path):
    make_run(tmp_path / "a", files=3)
    make_run(tmp_path / "b", files=5)  # same rows, spread differently over files
    finalize(str(tmp_path / "a"), {"min_reward": 0.0}, 7, TRAIN)
    first = [r["id"] + str(r["sample_index"]) for r in train_rows(tmp_path / "a")]
    finalize(str(tmp_path / "b"), {"min_reward": 0.0}, 7, TRAIN)
    assert [r["id"] + str(r["sample_index"]) for r in train_rows(tmp_path / "b")] == first
    finalize(str(tmp_path / "a"), {"min_reward": 0.0}, 8, TRAIN)
    other = [r["id"] + str(r["sample_index"]) for r in train_rows(tmp_path / "a")]
    assert sorted(other) == sorted(first) and other != first
    # globally shuffled, not just per file: the first shard mixes rows of every input file
    ids = [int(x[1:-1]) for x in first[:100]]
    assert len({(2 * i) % 3 for i in ids}) == 3
    assert ids != sorted(ids)


def test_spilled_buckets_give_the_same_order(tmp_path, monkeypatch):
    make_run(tmp_path)
    finalize(str(tmp_path), {"min_reward": 0.0}, 3, TRAIN)
    in_memory = train_rows(tmp_path)
    monkeypatch.setattr(fin, "BUCKET_BYTES", 20_000)  # forces many on-disk buckets
    finalize(str(tmp_path), {"min_reward": 0.0}, 3, TRAIN)
    assert train_rows(tmp_path) == in_memory


@pytest.mark.parametrize("n, per, sizes", [(0, 10, []), (10, 10, [10]), (11, 10, [6, 5]),
                                           (1000, 300, [250, 250, 250, 250]), (7, 3, [3, 2, 2])])
def test_shard_sizes_are_balanced(n, per, sizes):
    assert shard_sizes(n, per) == sizes


def test_shards_on_disk_are_balanced_and_named(tmp_path):
    make_run(tmp_path)
    stats = finalize(str(tmp_path), {"min_reward": 0.0}, 0, {**TRAIN, "rows_per_shard": 333})
    files = sorted((tmp_path / "train").glob("*.jsonl"))
    assert [f.name for f in files] == [f"part-{i:05d}.jsonl" for i in range(4)]
    counts = [len(f.read_text().splitlines()) for f in files]
    assert counts == stats["shards"] and max(counts) - min(counts) <= 1 and sum(counts) == 1000


def test_parquet_shards(tmp_path):
    make_run(tmp_path)
    finalize(str(tmp_path), {"min_reward": 1.0}, 0, {**TRAIN, "format": "parquet"})
    tables = [pq.read_table(f) for f in sorted((tmp_path / "train").glob("*.parquet"))]
    assert tables and sum(t.num_rows for t in tables) > 0
    first = tables[0].to_pylist()[0]
    assert first["messages"][-1]["role"] == "assistant" and first["reward"] == 1.0


def test_torn_last_line_is_counted_not_fatal(tmp_path):
    make_run(tmp_path)
    with open(tmp_path / "rollouts" / "part-000-00000.jsonl", "a") as f:
        f.write('{"id": "half", "rew')
    stats = finalize(str(tmp_path), {"min_reward": 0.0}, 0, TRAIN)
    assert stats["torn_lines"] == 1 and stats["succeeded"] == 1000


def test_judge_tokens_are_counted_apart_from_generation_tokens():
    from sft_ray.finalize.stats import StatsAccumulator

    acc = StatsAccumulator()
    for i in range(3):
        acc.add({"id": str(i), "sample_index": 0, "reward": 1.0, "usage": {"input_tokens": 10, "output_tokens": 5},
                 "metrics": {"judge_input_tokens": 100.0, "judge_output_tokens": 7.0, "accuracy": 1.0}}, failed=False)
    acc.add({"id": "c", "sample_index": 0, "reward": 1.0, "usage": {"input_tokens": 1, "output_tokens": 1},
             "metrics": {"equiv.judge_input_tokens": 50.0, "equiv.judge_output_tokens": 2.0}}, failed=False)
    stats = acc.result()
    assert stats["tokens"]["input_tokens"] == 31 and stats["tokens"]["output_tokens"] == 16
    assert stats["judge_tokens"] == {"input_tokens": 350, "output_tokens": 23}


def _ranges_read_every_line_once(uri, data, rng):
    want = data.split(b"\n")
    if want[-1] == b"":
        want.pop()
    for _ in range(30):
        cuts = sorted(rng.sample(range(1, len(data)), rng.randint(1, 12)))
        bounds = [0, *cuts, None]
        got = [line for a, b in zip(bounds, bounds[1:]) for line in io.iter_range(uri, a, b)]
        assert got == want, cuts


def test_byte_ranges_cut_at_any_offset_read_every_line_once(tmp_path):
    rng = random.Random(5)
    for tail in (b"", b"last line without an end", b"\n\n"):
        data = b"".join(f"line {i} {'x' * rng.randint(0, 40)}\r\n".encode() for i in range(300)) + tail
        path = tmp_path / "f.jsonl"
        path.write_bytes(data)
        _ranges_read_every_line_once(str(path), data.replace(b"\r\n", b"\n"), rng)


def test_workers_one_per_cpu_at_most_eight_none_for_a_small_run(monkeypatch):
    monkeypatch.setattr(fin.os, "sched_getaffinity", lambda pid: set(range(64)))
    assert fin._workers(None, fin.PARALLEL_BYTES, 100) == fin.MAX_WORKERS == 8
    assert fin._workers(None, fin.PARALLEL_BYTES, 3) == 3  # no more than there are tasks
    assert fin._workers(None, fin.PARALLEL_BYTES - 1, 100) == 1  # small: in this process
    assert fin._workers(16, 1, 100) == 16  # asked for explicitly
