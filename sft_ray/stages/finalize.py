"""Finalize stage (phase 2): filter, curate per prompt, shuffle globally, write balanced shards, report.

It runs after the rollouts are durably written, reads only the run folder and
calls no model, so ``sft-ray filter`` can re-run it with other settings.

Two passes, each with bounded memory at 1M+ rows:

1. Every rollout is counted in the statistics and checked by the row rules
   (reward, truncation, length, how an agent episode ended; :mod:`sft_ray.curate`).
   Each successful one goes into a *prompt bucket* chosen by a hash of its prompt
   id, so all samples of a prompt land in the same bucket.
2. One prompt bucket at a time is loaded and grouped by prompt: pass@k and
   repetition are measured, the prompt rules (dedup, at most k per prompt) pick
   the samples to keep, and the validation split is decided by prompt. Kept
   rows go to the train (or validation) *shuffle buckets*.

The global shuffle sorts kept rows by a keyed hash of ``(shuffle.seed, id,
sample_index)``: the order depends only on the seed and the rows, never on
the order in which rollouts happened to be written, so the same seed gives the
same order on every run. The shuffle buckets are hash ranges of that key, so
only one bucket is sorted in memory at a time.
"""

from __future__ import annotations

import hashlib
import io as _io
import math
import os
import tempfile
from collections import Counter, defaultdict
from typing import Any, Iterator

import orjson

from sft_ray import io
from sft_ray.config import FilterConfig, TrainConfig
from sft_ray.curate import (
    TEXT_CAP,
    choose,
    distinct_n,
    drop_reason,
    in_validation,
    output_tokens,
    reply_text,
    source_of,
)
from sft_ray.formats import ShardFormat, dataset_card, parquet_schema, parquet_table, train_row
from sft_ray.rejection import Tally
from sft_ray.stats import StatsAccumulator, advice

ROLLOUTS, FAILED, TRAIN, VALIDATION = "rollouts", "failed", "train", "validation"
NEVER_PASSED = "never_passed.jsonl"  # rejection sampling: prompts that used every sample and never passed
BUCKET_BYTES = 256 << 20  # rollout bytes per shuffle bucket: caps the memory of the sort
# Rollout bytes per prompt bucket: a record held as Python objects in the per-prompt pass takes
# several times its bytes, so these buckets are smaller than the shuffle buckets.
GROUP_BUCKET_BYTES = 64 << 20
_MASK64 = (1 << 64) - 1


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


def shard_sizes(n: int, rows_per_shard: int) -> list[int]:
    """Balanced shard sizes: ceil(n / rows_per_shard) shards whose sizes differ by at most 1."""
    if n == 0:
        return []
    k = math.ceil(n / rows_per_shard)
    base, extra = divmod(n, k)
    return [base + (1 if i < extra else 0) for i in range(k)]


class _Buckets:
    """Records spread by key range; in memory when small, spilled to temp files when large."""

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

    def chunks(self) -> Iterator[list[tuple[int, bytes]]]:
        """Each bucket's (key, line) records, one bucket in memory at a time, in key-range order."""
        if not self.tmp:
            yield self.mem
            self.mem = []
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
            os.unlink(f.name)
            yield recs
        self.tmp.cleanup()

    def ordered(self) -> Iterator[bytes]:
        """All lines, sorted by key."""
        for recs in self.chunks():
            recs.sort()
            yield from (line for _, line in recs)


def _where(row: dict[str, Any]) -> str | None:
    """The input line a rollout's prompt came from, as ``file:line``."""
    if not row.get("source_file"):
        return None
    return f"{row['source_file']}:{row['source_line']}" if row.get("source_line") else row["source_file"]


def _write_shard(uri: str, lines: list[bytes], fmt: str) -> None:
    if fmt == "jsonl":
        io.write_bytes(uri, b"\n".join(lines) + b"\n")
        return
    import pyarrow.parquet as pq

    # Every shard gets the schema declared for the format (never one inferred from this shard's rows).
    schema = getattr(fmt, "schema", None) or parquet_schema("messages")
    table = parquet_table([orjson.loads(line) for line in lines], schema)
    buf = _io.BytesIO()
    pq.write_table(table, buf)
    io.write_bytes(uri, buf.getvalue())


def _normalise(filter_cfg: dict[str, Any], train_cfg: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Fill in defaults (callers may pass partial dicts, e.g. from an older run.json)."""
    return FilterConfig.model_validate(filter_cfg).model_dump(), TrainConfig.model_validate(train_cfg).model_dump()


def finalize(run_dir: str, filter_cfg: dict[str, Any], shuffle_seed: int, train_cfg: dict[str, Any],
             write: bool = True, rejection: dict[str, Any] | None = None) -> dict[str, Any]:
    """Scan the run folder, write train/ (and validation/) shards unless ``write`` is False, return the stats.
    ``rejection``: the run's rejection-sampling settings, for the report's ``rejection`` section and
    ``never_passed.jsonl``."""
    flt, tc = _normalise(filter_cfg, train_cfg)
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
    n_buckets = max(1, math.ceil(total_bytes / BUCKET_BYTES))
    n_groups = max(1, math.ceil(total_bytes / GROUP_BUCKET_BYTES))
    # Records for the per-prompt pass: kept as objects when one bucket holds them all, else spilled.
    prompts = _Buckets(n_groups) if n_groups > 1 else None
    in_memory: list[tuple[list[Any], bytes]] = []
    fmt, include, reasoning = tc["format"], list(tc["include_fields"]), tc["reasoning"]
    temperature = None
    for uri in rollout_files:
        for row, _ in iter_jsonl(uri):
            if row is None:
                torn += 1
                continue
            rid, k = str(row["id"]), int(row["sample_index"])
            src = source_of(row)
            acc.add(row, failed=False, source=src)
            if failures:
                failures.pop((rid, k), None)  # it succeeded later
            if temperature is None:
                temperature = (row.get("sampling_params") or {}).get("temperature")
            reason = drop_reason(row, flt)
            if reason is not None:
                acc.drops[reason] += 1
            reward = row.get("reward")
            if reward is None or row.get("error"):
                continue  # nothing to choose from, nothing to measure per prompt
            text = reply_text(row)
            # hash() is salted per process, and these records never leave this process: it only has to
            # spread prompts over buckets and tell equal replies apart, and it is much cheaper than blake2b.
            meta = [rid, shuffle_key(shuffle_seed, rid, k), float(reward), reason is None, hash(text),
                    text[:TEXT_CAP], src, output_tokens(row), _where(row)]
            # the training row rides along, already in its format
            row_bytes = orjson.dumps(train_row(row, fmt, include, reasoning)) if reason is None else b""
            if prompts is None:
                in_memory.append((meta, row_bytes))
            else:
                prompts.add(hash(rid) & _MASK64, orjson.dumps(meta) + b"\t" + row_bytes)

    for row in failures.values():
        acc.add(row, failed=True, source=source_of(row))

    train = _Buckets(n_buckets) if write else None
    val = _Buckets(n_buckets) if write and tc["validation_fraction"] > 0 else None
    pass_threshold = flt["min_reward"] if flt["min_reward"] > 0 else 1.0
    tally = None
    if rejection and rejection.get("target_passing"):
        tally = Tally(rejection["target_passing"], rejection["max_samples"], flt["min_reward"])
        failed_per_prompt = Counter(rid for rid, _ in failures)
        failed_where = {rid: _where(row) for (rid, _), row in failures.items()}  # a prompt's input line
    for chunk in (prompts.chunks() if prompts is not None else [[]]):
        groups: dict[str, list[tuple[list[Any], bytes]]] = defaultdict(list)
        for _, line in chunk:
            meta_bytes, _, row_bytes = line.partition(b"\t")
            meta = orjson.loads(meta_bytes)
            groups[meta[0]].append((meta, row_bytes))
        for record in in_memory:
            groups[record[0][0]].append(record)
        del chunk
        in_memory = []
        for rid, samples in groups.items():
            several = len(samples) > 1
            if tally is not None:
                tally.add(rid, [m[2] for m, _ in samples], failed_per_prompt.pop(rid, 0), samples[0][0][8])
            acc.add_prompt([m[2] for m, _ in samples], pass_threshold,
                           1.0 - len({m[4] for m, _ in samples}) / len(samples) if several else None,
                           distinct_n([m[5] for m, _ in samples]) if several else None)
            ok = [i for i, (m, _) in enumerate(samples) if m[3]]
            dropped = (choose([{"k": samples[i][0][1], "r": samples[i][0][2], "h": samples[i][0][4],
                                "t": samples[i][0][5]} for i in ok], flt, tc["max_per_prompt"])
                       if several and ok and (flt["dedup"] != "none" or tc["max_per_prompt"]) else {})
            to_val = in_validation(shuffle_seed, rid, tc["validation_fraction"])
            target = val if to_val else train
            for j, i in enumerate(ok):
                if j in dropped:
                    acc.drops[dropped[j]] += 1
                    continue
                meta, row_bytes = samples[i]
                acc.add_kept(meta[6], meta[7], validation=to_val)
                if target is not None:
                    target.add(meta[1], row_bytes)
        del groups

    if tally is not None:
        for rid, n in failed_per_prompt.items():  # prompts without a single scored sample
            tally.add(rid, [], n, failed_where[rid])
    stats = acc.result()
    if tally is not None:
        stats["rejection"] = tally.result()
        if write:
            never = io.join(run_dir, NEVER_PASSED)
            io.write_bytes(never, b"".join(orjson.dumps(r) + b"\n" for r in tally.never))
            stats["rejection"]["never_passed_file"] = never
    stats["train_rows"] = acc.kept - acc.validation
    # The settings that differ from the defaults (what this cut of the run chose).
    stats["filter"] = {k: v for k, v in flt.items() if v != FilterConfig.model_fields[k].default}
    stats["train"] = {k: v for k, v in tc.items() if k != "include_fields" and v != TrainConfig.model_fields[k].default}
    stats["shuffle_seed"] = shuffle_seed
    stats["advice"] = advice(stats, temperature)
    if torn:
        stats["torn_lines"] = torn
    if train is not None:
        schema = parquet_schema(fmt, include)
        shard_fmt = ShardFormat(tc["file_format"], schema)
        stats["shards"] = _write_train(run_dir, train, shard_sizes(stats["train_rows"], tc["rows_per_shard"]),
                                       shard_fmt)
        if val is not None:
            stats["validation_shards"] = _write_train(run_dir, val, shard_sizes(acc.validation, tc["rows_per_shard"]),
                                                      shard_fmt, VALIDATION)
        else:
            io.delete(io.join(run_dir, VALIDATION))  # a split from an earlier `sft-ray filter` no longer applies
        splits = [TRAIN] + ([VALIDATION] if val is not None else [])
        io.write_bytes(io.join(run_dir, "README.md"), dataset_card(schema, tc["file_format"], splits).encode())
    return stats


def _write_train(run_dir: str, buckets: _Buckets, sizes: list[int], fmt: str, name: str = TRAIN) -> list[int]:
    """Replace ``name``/ (train/ or validation/) with new shards part-00000.<fmt>, ... of the given
    sizes: written aside (<name>.new/), then swapped in, so a crash while writing leaves the old
    folder whole."""
    train, new = io.join(run_dir, name), io.join(run_dir, name + ".new")
    io.delete(new)
    io.makedirs(new)
    rows = buckets.ordered()
    for i, size in enumerate(sizes):
        lines = [next(rows) for _ in range(size)]
        _write_shard(io.join(new, f"part-{i:05d}.{fmt}"), lines, fmt)
    io.replace_dir(new, train)
    return sizes
