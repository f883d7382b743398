"""Finalize stage (phase 2): filter by reward, shuffle globally, write balanced shards, report.

It runs after the rollouts are durably written, reads only the run folder and
calls no model, so ``sft-ray filter`` can re-run it with another threshold.

The global shuffle sorts kept rows by a keyed hash of ``(shuffle.seed, id,
sample_index)``: the order depends only on the seed and the rows, never on
the order in which rollouts happened to be written, so the same seed gives the
same order on every run. Rows are spread over hash-range buckets first, so
only one bucket is sorted in memory at a time (bounded memory at 1M+ rows).
"""

from __future__ import annotations

import hashlib
import io as _io
import math
import os
import tempfile
from typing import Any, Iterator

import orjson

from sft_ray import io
from sft_ray.stats import StatsAccumulator

ROLLOUTS, FAILED, TRAIN = "rollouts", "failed", "train"
BUCKET_BYTES = 256 << 20  # rollout bytes per shuffle bucket: caps the memory of the sort


def iter_jsonl(uri: str) -> Iterator[tuple[dict[str, Any] | None, bytes]]:
    """(row, line) for each line of a rollout file; row is None for a torn line."""
    for line in io.iter_lines(uri):
        if not line.strip():
            continue
        try:
            yield orjson.loads(line), line
        except orjson.JSONDecodeError:
            yield None, line


def shuffle_key(seed: int, rid: str, sample_index: int) -> int:
    h = hashlib.blake2b(f"{rid}\x00{sample_index}".encode(), digest_size=8, key=str(seed).encode()[:64])
    return int.from_bytes(h.digest(), "big")


def keep(row: dict[str, Any], flt: dict[str, Any]) -> bool:
    """The reward filter (the `jq 'select(.reward >= x)'` of the hand-written recipe)."""
    if row.get("error") or row.get("reward") is None:
        return False
    r = float(row["reward"])
    if r < flt.get("min_reward", 0.0):
        return False
    if flt.get("max_reward") is not None and r > flt["max_reward"]:
        return False
    if flt.get("drop_truncated") and row.get("finish_reason") == "length":
        return False
    return True


def train_row(row: dict[str, Any], include_fields: list[str]) -> dict[str, Any]:
    out = {"messages": row["messages"]}
    for f in include_fields:
        if f in row:
            out[f] = row[f]
    return out


def shard_sizes(n: int, rows_per_shard: int) -> list[int]:
    """Balanced shard sizes: ceil(n / rows_per_shard) shards whose sizes differ by at most 1."""
    if n == 0:
        return []
    k = math.ceil(n / rows_per_shard)
    base, extra = divmod(n, k)
    return [base + (1 if i < extra else 0) for i in range(k)]


class _Buckets:
    """Kept rows spread by key range; in memory when small, spilled to temp files when large."""

    def __init__(self, n_buckets: int) -> None:
        self.n = n_buckets
        self.mem: list[tuple[int, bytes]] = []  # the single bucket, when small enough to stay in memory
        self.tmp = tempfile.TemporaryDirectory(prefix="sft-ray-shuffle-") if n_buckets > 1 else None
        self.files = ([open(os.path.join(self.tmp.name, f"b{i}"), "wb") for i in range(n_buckets)]
                      if self.tmp else [])

    def add(self, key: int, line: bytes) -> None:
        if not self.tmp:
            self.mem.append((key, line))
            return
        b = (key * self.n) >> 64
        self.files[b].write(key.to_bytes(8, "big") + len(line).to_bytes(4, "big") + line)

    def ordered(self) -> Iterator[bytes]:
        """All lines, sorted by key."""
        if not self.tmp:
            self.mem.sort()
            yield from (line for _, line in self.mem)
            return
        for f in self.files:
            f.close()
            with open(f.name, "rb") as fh:
                data = fh.read()
            recs, pos = [], 0
            while pos < len(data):
                key = int.from_bytes(data[pos:pos + 8], "big")
                n = int.from_bytes(data[pos + 8:pos + 12], "big")
                recs.append((key, data[pos + 12:pos + 12 + n]))
                pos += 12 + n
            del data
            recs.sort()
            yield from (line for _, line in recs)
            os.unlink(f.name)
        self.tmp.cleanup()


def _write_shard(uri: str, lines: list[bytes], fmt: str) -> None:
    if fmt == "jsonl":
        io.write_bytes(uri, b"\n".join(lines) + b"\n")
        return
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pylist([orjson.loads(line) for line in lines])
    buf = _io.BytesIO()
    pq.write_table(table, buf)
    io.write_bytes(uri, buf.getvalue())


def finalize(run_dir: str, filter_cfg: dict[str, Any], shuffle_seed: int, train_cfg: dict[str, Any],
             write: bool = True) -> dict[str, Any]:
    """Scan the run folder, write train/ shards (unless ``write`` is False), return the stats."""
    acc = StatsAccumulator()
    torn = 0
    # Latest failure per sample (a sample retried by a rerun may have several records).
    failures: dict[tuple[str, int], dict[str, Any]] = {}
    for uri in io.list_files(io.join(run_dir, FAILED), ".jsonl"):
        for row, _ in iter_jsonl(uri):
            if row is None:
                torn += 1
            else:
                failures[(str(row["id"]), int(row["sample_index"]))] = row

    rollout_files = io.list_files(io.join(run_dir, ROLLOUTS), ".jsonl")
    total_bytes = sum(io.size(u) for u in rollout_files)
    buckets = _Buckets(max(1, math.ceil(total_bytes / BUCKET_BYTES))) if write else None
    include = list(train_cfg.get("include_fields") or [])
    for uri in rollout_files:
        for row, _ in iter_jsonl(uri):
            if row is None:
                torn += 1
                continue
            acc.add(row, failed=False)
            if failures:
                failures.pop((str(row["id"]), int(row["sample_index"])), None)  # it succeeded later
            if keep(row, filter_cfg):
                acc.kept += 1
                if buckets is not None:
                    buckets.add(shuffle_key(shuffle_seed, str(row["id"]), int(row["sample_index"])),
                                orjson.dumps(train_row(row, include)))

    for row in failures.values():
        acc.add(row, failed=True)
    stats = acc.result()
    stats["filter"] = {k: v for k, v in filter_cfg.items() if v not in (None, False)}
    stats["shuffle_seed"] = shuffle_seed
    if torn:
        stats["torn_lines"] = torn
    if buckets is not None:
        stats["shards"] = _write_train(run_dir, buckets, shard_sizes(acc.kept, train_cfg["rows_per_shard"]),
                                       train_cfg.get("format", "jsonl"))
    return stats


def _write_train(run_dir: str, buckets: _Buckets, sizes: list[int], fmt: str) -> list[int]:
    """Replace train/ with new shards part-00000.<fmt>, ... of the given sizes: written aside
    (train.new/), then swapped in, so a crash while writing leaves the old train/ whole."""
    train, new = io.join(run_dir, TRAIN), io.join(run_dir, TRAIN + ".new")
    io.delete(new)
    io.makedirs(new)
    rows = buckets.ordered()
    for i, size in enumerate(sizes):
        lines = [next(rows) for _ in range(size)]
        _write_shard(io.join(new, f"part-{i:05d}.{fmt}"), lines, fmt)
    io.replace_dir(new, train)
    return sizes
