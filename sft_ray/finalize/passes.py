"""Phase 2's passes: filter, curate per prompt, shuffle globally, write balanced shards, report.

It runs after the rollouts are durably written, reads only the run folder and
calls no model, so ``sft-ray filter`` can re-run it with other settings.

Two passes, each with bounded memory at 1M+ rows, each spread over worker processes
(one per CPU, at most 8; in this process when the run is small):

1. *Scan*: the rollout files, cut into byte ranges at line ends, are read one range per
   task. Every rollout is counted in the statistics and checked by the row rules (reward,
   truncation, length, how an agent episode ended; :mod:`sft_ray.finalize.curate`). Each successful
   one goes to a *prompt bucket* file chosen by a hash of its prompt id, so all samples of a
   prompt land in the same bucket, with its training row already in the chosen format. When
   no prompt rule applies (no dedup, no ``max_per_prompt``), kept rows go straight to their
   *shuffle bucket* file instead.
2. *Group*: one prompt bucket per task is loaded and grouped by prompt: pass@k and
   repetition are measured, the prompt rules (dedup, at most k per prompt) pick the samples
   to keep, and the validation split is decided by prompt. Kept rows go to the train (or
   validation) shuffle bucket files.

The workers' statistics are merged in a fixed order, so the result does not depend on how
many there were. The global shuffle sorts kept rows by a keyed hash of ``(shuffle.seed, id,
sample_index)``: the order depends only on the seed and the rows, never on the order in
which rollouts happened to be written, so the same seed gives the same order on every run.
The shuffle buckets are hash ranges of that key: each is sorted by one task (one bucket in
memory per worker) and cut into segments at the shard boundaries, then each shard is written
by one task from its segments.

Rows that are none of the run's are never trained on, and are counted by reason and named in
the report (``unexpected_rows``): every row of a file no session recorded in run.json wrote
(checked by the file's name: :func:`~sft_ray.runfolder.layout.written_by`), and rows whose key
is in the small set of unexpected keys the driver found (done samples that are not expected).
"""

from __future__ import annotations

import contextlib
import functools
import gc
import hashlib
import io as _io
import itertools
import math
import os
import tempfile
import zlib
from collections import defaultdict
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator

import orjson
from orjson import JSONDecodeError

from sft_ray import io
from sft_ray.decontaminate import (
    DROP_REASON,
    Index,
    Matches,
    RowCheck,
    decontamination_stats,
    prompt_text,
    prompts_checked,
    write_index,
)
from sft_ray.finalize.curate import (
    SCORED_META,
    TEXT_CAP,
    RowRules,
    Scored,
    choose,
    distinct_n,
    in_validation,
    make_pairs,
    output_tokens,
    reply_text,
    shuffle_key,
    source_of,
)
from sft_ray.finalize.formats import (
    CANDIDATE_FORMAT,
    PREFERENCE,
    dataset_card,
    generated_start,
    parquet_schema,
    parquet_table,
    preference_row,
    train_row,
)
from sft_ray.finalize.stats import StatsAccumulator, Tally, Unexpected, advice
from sft_ray.runfolder.layout import (
    DATASET_CARD,
    FAILED,
    NEVER_PASSED,
    ROLLOUTS,
    TRAIN,
    VALIDATION,
    iter_jsonl,
    key_of,
    shard_name,
    written_by,
)

BUCKET_BYTES = 256 << 20  # rollout bytes per shuffle bucket: caps the memory of the sort
# Rollout bytes per prompt bucket: a record held as Python objects in the per-prompt pass takes
# several times its bytes, so these buckets are smaller than the shuffle buckets.
GROUP_BUCKET_BYTES = 64 << 20
PIECE_BYTES = 32 << 20  # rollout bytes per scan task (a larger file is cut into ranges at line ends)
# Below this many rollout bytes (about 25,000 single-turn rows) finalize runs in this process:
# starting workers (each imports this module, ~0.5 s) would cost more than they save.
PARALLEL_BYTES = 16 << 20
# At most this many workers by default: each holds a bucket (a few hundred MB at most), and a
# cluster's head node, where `sft-ray run` finalizes, also hosts Ray's own services.
MAX_WORKERS = 8
WRITE_BUFFER = 256 << 10  # per temporary file: 8 KB buffers make a system call every ~25 rows
KEY_HEX = 16  # shuffle keys are 64-bit, written as 16 hex digits: sorting the text sorts the keys


def shard_sizes(n: int, rows_per_shard: int) -> list[int]:
    """Balanced shard sizes: ceil(n / rows_per_shard) shards whose sizes differ by at most 1."""
    if n == 0:
        return []
    k = math.ceil(n / rows_per_shard)
    base, extra = divmod(n, k)
    return [base + (1 if i < extra else 0) for i in range(k)]


def _pieces(files: list[str], sizes: list[int], piece_bytes: int) -> list[tuple[str, int, int | None]]:
    """The scan tasks: (file, start, end) byte ranges of about ``piece_bytes`` each."""
    out: list[tuple[str, int, int | None]] = []
    for uri, size in zip(files, sizes):
        n = 1 if uri.endswith(".gz") else max(1, math.ceil(size / piece_bytes))
        bounds = [size * i // n for i in range(n)] + [None]  # the last range reads to the end of the file
        out += [(uri, bounds[i], bounds[i + 1]) for i in range(n)]
    return out


def _workers(requested: int | None, total_bytes: int, tasks: int) -> int:
    if requested is None:
        if total_bytes < PARALLEL_BYTES:
            return 1
        try:
            requested = min(len(os.sched_getaffinity(0)), MAX_WORKERS)
        except AttributeError:  # not Linux
            requested = min(os.cpu_count() or 1, MAX_WORKERS)
    return max(1, min(requested, tasks))


class _Inline:
    """What a process pool offers finalize (``map``), run in this process."""

    def __enter__(self) -> "_Inline":
        return self

    def __exit__(self, *exc: Any) -> None:
        pass

    def map(self, fn: Any, *iterables: Iterable[Any]) -> Iterator[Any]:
        return map(fn, *iterables)


def _executor(workers: int) -> Any:
    if workers == 1:
        return _Inline()
    import multiprocessing

    # spawn, not fork: finalize may run in a Ray driver, whose threads a fork would copy half-way.
    return ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))


@dataclass(frozen=True)
class _Job:
    """What every finalize task needs (sent to each worker)."""

    tmp: str  # the folder of the bucket files
    filter: dict[str, Any]  # the filter section (row and prompt rules)
    train: dict[str, Any]  # the train section (format, split, shards)
    seed: int
    n_groups: int
    n_buckets: int  # shuffle buckets per split (0: nothing is written)
    succeeded_wanted: frozenset[tuple[str, int]]  # failed samples: report those that succeeded later
    keep_input_line: bool  # record each prompt's input line (rejection sampling's never_passed.jsonl)
    tally: tuple[int, int, float] | None  # rejection sampling: target, max samples, threshold
    # The formats written (train.format as a list) and, with `preference` among them, the pair rules:
    # (min_margin, chosen_min_reward, max_pairs_per_prompt).
    formats: tuple[str, ...] = ("messages",)
    pairs: tuple[float, float, int] | None = None

    @property
    def sample_formats(self) -> tuple[str, ...]:
        """The formats of one row per sample (all but ``preference``)."""
        return tuple(f for f in self.formats if f != PREFERENCE)

    def target(self, split: str, fmt: str) -> str:
        """The name of a split's rows of one format among the temporary files: the split itself for a
        single format (train, validation), ``<split>-<format index>-`` for several."""
        return split if len(self.formats) == 1 else f"{split}-{self.formats.index(fmt)}-"

    def format_of(self, target: str) -> str:
        """The format of a :meth:`target`."""
        return self.formats[0] if len(self.formats) == 1 else self.formats[int(target.split("-")[1])]
    # Keys that are none of the run's samples (usually none; found by the driver, which knows the input).
    unexpected: frozenset[tuple[str, int]] = frozenset()
    decontaminate: str | None = None  # the benchmark index's file (a row whose prompt or reply matches is dropped)
    check_prompts: bool = True  # False: the run's scan checked every prompt against this index already

    @property
    def direct(self) -> bool:
        """No prompt rule chooses among a prompt's samples: whatever passes the row rules is kept,
        and goes to its shuffle bucket from the scan (the split is decided by the prompt id alone)."""
        return self.filter["dedup"] == "none" and not self.train["max_per_prompt"]


def _input_line(row: dict[str, Any]) -> str | None:
    """The input line a rollout's prompt came from, as ``file:line``."""
    if not row.get("source_file"):
        return None
    return f"{row['source_file']}:{row['source_line']}" if row.get("source_line") else row["source_file"]


def _normalise(filter_cfg: dict[str, Any], train_cfg: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Fill in defaults (callers may pass partial dicts, e.g. from an older run.json)."""
    # Imported here, not at the top: the worker processes import this module and never need pydantic.
    from sft_ray.config import FilterConfig, TrainConfig

    return FilterConfig.model_validate(filter_cfg).model_dump(), TrainConfig.model_validate(train_cfg).model_dump()


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def finalize(run_dir: str, filter_cfg: dict[str, Any], shuffle_seed: int, train_cfg: dict[str, Any],
             write: bool = True, rejection: dict[str, Any] | None = None,
             workers: int | None = None, preference: dict[str, Any] | None = None,
             sessions: frozenset[int] | None = None,
             unexpected: frozenset[tuple[str, int]] | None = None, index: Index | None = None,
             held: dict[str, Any] | None = None) -> dict[str, Any]:
    """Scan the run folder, write train/ (and validation/) shards unless ``write`` is False, return the stats.
    ``rejection``: the run's rejection-sampling settings, for the report's ``rejection`` section and
    ``never_passed.jsonl``. ``workers``: processes to spread the work over (default: one per CPU, at most 8,
    for a large run, none beside this one for a small one). ``preference``: the pair rules (the
    ``preference`` section) when ``train.format`` has ``preference``. ``sessions``: the sessions run.json
    records (rows of files no one of them wrote are not trained on; None: every file is the run's).
    ``unexpected``: keys that are none of the run's samples, not trained on either. ``index``: benchmarks
    (decontaminate) a row's prompt and reply are checked against, shipped to the workers as a file of hashes
    (drop reason ``contaminated``); ``held``: what the run's scan held back (run.json), for the report.

    One format is written to train/ (and validation/) as it always was; several to
    train/<format>/ (and validation/<format>/), each with its own shards.

    The steps: the failure records (:func:`_read_failures`), the plan of pieces, groups and buckets
    (:class:`_Plan`), the scan of the rollouts (:func:`_scan_pass`), the per-prompt groups
    (:func:`_group_pass`), the report's sections (:func:`_sections`), the shards (:func:`_write_outputs`)."""
    filter_, train = _normalise(filter_cfg, train_cfg)
    from sft_ray.config import row_formats

    formats = tuple(row_formats(train["format"]))
    pairs = _pair_rules(preference, filter_) if PREFERENCE in formats else None
    odd = Unexpected()
    failures, torn = _read_failures(run_dir, sessions, odd)
    plan = _Plan.of(run_dir, sessions, workers, write)
    tally_on = bool(rejection and rejection.get("target_passing"))
    acc = StatsAccumulator()
    in_bucket: dict[str, list[int]] = {}  # rows per shuffle bucket, by split (and format)

    def count(counts: dict[str, list[int]]) -> None:
        for target, per_bucket in counts.items():
            have = in_bucket.setdefault(target, [0] * plan.n_buckets)
            in_bucket[target] = [a + b for a, b in zip(have, per_bucket)]

    with tempfile.TemporaryDirectory(prefix="sft-ray-finalize-") as tmp, _executor(plan.n_workers) as pool:
        job = _Job(tmp=tmp, filter=filter_, train=train, seed=shuffle_seed, n_groups=plan.n_groups,
                   n_buckets=plan.n_buckets, succeeded_wanted=frozenset(failures), keep_input_line=tally_on,
                   tally=(rejection["target_passing"], rejection["max_samples"], filter_["min_reward"])
                   if tally_on else None, formats=formats, pairs=pairs, unexpected=frozenset(unexpected or ()),
                   decontaminate=write_index(index, tmp) if index is not None else None,
                   check_prompts=index is None or not prompts_checked(index, held))
        decontaminated = Matches()
        scan_torn, temperature = _scan_pass(pool, job, plan, acc, odd, failures, count, decontaminated)
        torn += scan_torn
        tally = _group_pass(pool, job, acc, failures, count, tally_on)
        stats = acc.result()
        _sections(stats, run_dir, write, tally, acc, pairs, formats, filter_, train, shuffle_seed)
        stats["advice"] = advice(stats, temperature)
        if torn:
            stats["torn_lines"] = torn
        stats["unexpected_rows"] = odd.result()
        if index is not None:
            stats["decontamination"] = decontamination_stats(index, held, decontaminated)
        if write:
            _write_outputs(run_dir, job, pool, train, formats, in_bucket, stats)
    return stats


def _pair_rules(preference: dict[str, Any] | None, filter_: dict[str, Any]) -> tuple[float, float, int]:
    """(min_margin, chosen_min_reward, max_pairs_per_prompt) of the ``preference`` section."""
    from sft_ray.config import PreferenceConfig

    pref = PreferenceConfig.model_validate(preference or {})
    chosen_min = pref.chosen_min_reward if pref.chosen_min_reward is not None else filter_["min_reward"]
    return pref.min_margin, chosen_min, pref.max_pairs_per_prompt


def _read_failures(run_dir: str, sessions: frozenset[int] | None,
                   odd: Unexpected) -> tuple[dict[tuple[str, int], dict[str, Any]], int]:
    """(the latest failure record per sample: a sample retried by a rerun may have several, torn lines);
    the rows of failed/ files no session of the run wrote go to ``odd``."""
    torn = 0
    failures: dict[tuple[str, int], dict[str, Any]] = {}
    failed_files, unknown_failed = written_by(io.list_files(io.join(run_dir, FAILED), ".jsonl"), sessions)
    for uri in unknown_failed:
        for row, _ in iter_jsonl(uri):
            odd.add("unknown_part_file", uri, row)
    for uri in failed_files:
        for row, _ in iter_jsonl(uri):
            if row is None:
                torn += 1
            else:
                failures[key_of(row)] = row
    return failures, torn


@dataclass
class _Plan:
    """How the rollouts are cut up: pieces of files for the scan (those of files no session wrote
    quarantined), worker processes, per-prompt groups and shuffle buckets."""

    pieces: list[tuple[str, int, int | None]]
    quarantined: list[bool]
    n_workers: int
    n_groups: int
    n_buckets: int

    @classmethod
    def of(cls, run_dir: str, sessions: frozenset[int] | None, workers: int | None, write: bool) -> _Plan:
        rollout_files = io.list_files(io.join(run_dir, ROLLOUTS), ".jsonl")
        unknown = set(written_by(rollout_files, sessions)[1])
        sizes = [io.size(u) for u in rollout_files]
        total_bytes = sum(sizes)
        pieces = _pieces(rollout_files, sizes, PIECE_BYTES)
        n_workers = _workers(workers, total_bytes, len(pieces))
        # Bucket counts in multiples of the workers, so that no worker is left alone with the last one.
        n_groups = _round_up(max(1, math.ceil(total_bytes / GROUP_BUCKET_BYTES)), n_workers)
        n_buckets = _round_up(max(1, math.ceil(total_bytes / BUCKET_BYTES)), n_workers) if write else 0
        return cls(pieces, [uri in unknown for uri, _, _ in pieces], n_workers, n_groups, n_buckets)


def _scan_pass(pool: Any, job: _Job, plan: _Plan, acc: StatsAccumulator, odd: Unexpected,
               failures: dict[tuple[str, int], dict[str, Any]],
               count: Callable[[dict[str, list[int]]], None], decontaminated: Matches) -> tuple[int, Any]:
    """Scan every piece (in the workers); a failure record of a sample that succeeded later is dropped
    from ``failures``; benchmark matches are added to ``decontaminated``. Returns (torn lines, the
    sampling temperature the rollouts record)."""
    torn, temperature = 0, None
    for part, part_torn, succeeded, temp, counts, part_odd, part_dec in pool.map(
            _scan, itertools.repeat(job), range(len(plan.pieces)), plan.pieces, plan.quarantined):
        acc.merge(part)
        odd.merge(part_odd)
        decontaminated.merge(part_dec)
        torn += part_torn
        for key in succeeded:
            failures.pop(key, None)  # it succeeded later
        if temperature is None:
            temperature = temp
        count(counts)
    for row in failures.values():
        acc.add(row, failed=True, source=source_of(row))
    return torn, temperature


def _group_pass(pool: Any, job: _Job, acc: StatsAccumulator, failures: dict[tuple[str, int], dict[str, Any]],
                count: Callable[[dict[str, list[int]]], None], tally_on: bool) -> Tally | None:
    """Each group of prompts (in the workers): per-prompt rules, shuffle buckets, rejection sampling's tally."""
    # Failed samples per prompt, for rejection sampling's count of samples drawn.
    failed: list[dict[str, list[Any]]] = [{} for _ in range(job.n_groups)]
    if tally_on:
        for (rid, _), row in failures.items():
            entry = failed[_group_of(rid, job.n_groups)].setdefault(rid, [0, _input_line(row)])
            entry[0] += 1
    tally = Tally(*job.tally) if job.tally else None
    for part, part_tally, counts in pool.map(_group, itertools.repeat(job), range(job.n_groups), failed):
        acc.merge(part)
        if tally is not None:
            tally.merge(part_tally)
        count(counts)
    return tally


def _sections(stats: dict[str, Any], run_dir: str, write: bool, tally: Tally | None, acc: StatsAccumulator,
              pairs: tuple[float, float, int] | None, formats: tuple[str, ...], filter_: dict[str, Any],
              train: dict[str, Any], shuffle_seed: int) -> None:
    """The report's sections beyond the accumulator's: rejection sampling (and never_passed.jsonl),
    training rows, preference pairs, the settings of this cut."""
    if tally is not None:
        stats["rejection"] = tally.result()
        # pass@k needs k samples of a prompt whatever the first ones scored. Rejection sampling stops a
        # prompt once it passes, so prompts that passed early have few samples and pass@k is biased (it
        # even falls with k); the rejection section reports what holds for sequential sampling instead.
        for biased in ("pass_at_k", "all_pass"):
            (stats.get("prompts") or {}).pop(biased, None)
        if write:
            never = io.join(run_dir, NEVER_PASSED)
            io.write_bytes(never, b"".join(orjson.dumps(r) + b"\n" for r in tally.never))
            stats["rejection"]["never_passed_file"] = never
    stats["train_rows"] = acc.kept - acc.validation
    if pairs is not None:
        stats["preference"] = acc.pair_stats(*pairs)
        if formats[0] == PREFERENCE:
            stats["train_rows"] = stats["preference"]["pairs"] - stats["preference"]["validation_pairs"]
    # The settings that differ from the defaults (what this cut of the run chose).
    from sft_ray.config import FilterConfig, TrainConfig

    stats["filter"] = {k: v for k, v in filter_.items() if v != FilterConfig.model_fields[k].default}
    stats["train"] = {k: v for k, v in train.items()
                      if k != "include_fields" and v != TrainConfig.model_fields[k].default}
    stats["shuffle_seed"] = shuffle_seed


def _write_outputs(run_dir: str, job: _Job, pool: Any, train: dict[str, Any], formats: tuple[str, ...],
                   in_bucket: dict[str, list[int]], stats: dict[str, Any]) -> None:
    """train/ (and validation/) shards of every format, and the dataset card; their names in ``stats``."""
    shards = _write_split(run_dir, job, pool, TRAIN, in_bucket)
    stats["shards"] = shards[formats[0]]
    val = None
    if train["validation_fraction"] > 0 and any(sum(in_bucket.get(job.target(VALIDATION, f)) or [])
                                                 for f in formats):
        val = _write_split(run_dir, job, pool, VALIDATION, in_bucket)
        stats["validation_shards"] = val[formats[0]]
    else:
        # No split, or one that no prompt fell in (a small fraction of few prompts): an earlier
        # `sft-ray filter`'s validation/ no longer applies, and an empty one is not a split.
        io.delete(io.join(run_dir, VALIDATION))
    if len(formats) > 1:
        stats["shards_by_format"] = shards
        if val is not None:
            stats["validation_shards_by_format"] = val
    # The card declares only splits with rows: `datasets.load_dataset(<folder>)` refuses a
    # declared split whose files it cannot find.
    splits = [TRAIN] + ([VALIDATION] if val is not None else [])
    schemas = {fmt: parquet_schema(fmt, list(train["include_fields"])) for fmt in formats}
    io.write_bytes(io.join(run_dir, DATASET_CARD), dataset_card(schemas, train["file_format"], splits, stats).encode())


def _take(tmp: str, prefix: str) -> Iterator[bytes]:
    """The contents of the temporary files named ``prefix...``, in name order, each deleted once read."""
    for name in sorted(n for n in os.listdir(tmp) if n.startswith(prefix)):
        path = os.path.join(tmp, name)
        with open(path, "rb") as f:
            data = f.read()
        os.unlink(path)
        yield data


def _group_of(rid: str, n_groups: int) -> int:
    """A prompt's bucket: the same in every process (unlike hash(), which is salted per process)."""
    return zlib.crc32(rid.encode()) % n_groups


def _without_gc(fn: Any) -> Any:
    """Run ``fn`` with the cyclic garbage collector paused: the passes make millions of small
    containers (and hold a bucket of them) but no cycles, and its rescans of what is held cost up
    to a third of the time. Paused for the whole call, so that what the call held is freed (by
    reference counting) before the collector runs again."""

    @functools.wraps(fn)
    def paused(*args: Any) -> Any:
        was = gc.isenabled()
        gc.disable()
        try:
            return fn(*args)
        finally:
            if was:
                gc.enable()

    return paused


class _ShuffleOut:
    """Kept training rows into the shuffle-bucket files of their split (train or validation),
    as ``key row`` lines, counted per bucket. Buckets are ranges of the key (its top
    32 bits are enough to choose one), so the buckets sorted one by one give the global order."""

    def __init__(self, job: _Job, tag: str, files: contextlib.ExitStack) -> None:
        self.job, self.tag, self.files = job, tag, files
        self.outs: dict[tuple[str, int], Any] = {}
        self.counts: dict[str, list[int]] = {job.target(split, fmt): [0] * job.n_buckets
                                             for split in (TRAIN, VALIDATION) for fmt in job.formats}
        first = job.formats[0]
        self.splits = {False: job.target(TRAIN, first), True: job.target(VALIDATION, first)}

    def add(self, validation: bool, key: str, row_bytes: bytes, fmt: str | None = None) -> None:
        """One row for its split (of format ``fmt``; default: the first format)."""
        if not self.job.n_buckets:
            return
        split = self.splits[validation] if fmt is None else self.job.target(VALIDATION if validation else TRAIN, fmt)
        b = (int(key[:8], 16) * self.job.n_buckets) >> 32
        out = self.outs.get((split, b))
        if out is None:
            out = self.outs[split, b] = self.files.enter_context(
                open(os.path.join(self.job.tmp, f"{split}{b}.{self.tag}"), "wb", buffering=WRITE_BUFFER))
        out.write(b"".join((key.encode(), row_bytes, b"\n")))
        self.counts[split][b] += 1

    def add_rows(self, validation: bool, key: str, rows: bytes) -> None:
        """A sample's rows in each sample format (tab-joined when there are several)."""
        formats = self.job.sample_formats
        if len(formats) == 1 and len(self.job.formats) == 1:
            self.add(validation, key, rows)
            return
        for fmt, row in zip(formats, rows.split(b"\t")):
            self.add(validation, key, row, fmt)


@_without_gc
def _scan(job: _Job, index: int, piece: tuple[str, int, int | None], quarantined: bool = False) -> tuple[Any, ...]:
    """Pass 1 over one byte range of a rollout file: statistics, row rules, and the prompt-bucket
    records (``meta <tab> training row``) of every rollout with a reward. Returns the statistics,
    the torn lines, the failed samples seen succeeding here, the first sampling temperature, the
    rows put in each shuffle bucket (when no prompt rule applies, kept rows go there from here), and
    the rows that are none of the run's (:class:`Unexpected`). ``quarantined``: the file is no
    recorded session's, and each of its rows is only counted as such."""
    odd = Unexpected()
    if quarantined:
        for line in io.iter_range(*piece):
            if line.strip():
                try:
                    row = orjson.loads(line)
                except JSONDecodeError:
                    row = None
                odd.add("unknown_part_file", piece[0], row)
        return StatsAccumulator(), 0, [], None, {}, odd, Matches()
    unexpected = job.unexpected
    train, n_groups, direct = job.train, job.n_groups, job.direct
    include, reasoning, fraction = list(train["include_fields"]), train["reasoning"], train["validation_fraction"]
    formats = job.sample_formats
    fmt = formats[0] if len(formats) == 1 else None  # several: each row in each format, tab-joined
    pairs = job.pairs is not None
    acc = StatsAccumulator()
    add, drops, dumps, seed = acc.add, acc.drops, orjson.dumps, job.seed
    torn, succeeded, temperature = 0, [], None
    rules = RowRules(job.filter)
    check = RowCheck(job.decontaminate, job.check_prompts) if job.decontaminate else None
    with contextlib.ExitStack() as files:
        outs = [files.enter_context(open(os.path.join(job.tmp, f"p{g}.{index:06d}"), "wb", buffering=WRITE_BUFFER))
                for g in range(n_groups)]
        shuffled = _ShuffleOut(job, f"s{index:06d}", files)
        for line, row, hit, text in _parsed(piece, check):
            if row is None:
                torn += line.strip() != b""
                continue
            rid, k = key_of(row)
            if unexpected and (rid, k) in unexpected:
                odd.add("unexpected_key", piece[0], row)
                continue
            src = source_of(row)
            add(row, False, src)
            if job.succeeded_wanted and (rid, k) in job.succeeded_wanted:
                succeeded.append((rid, k))
            if temperature is None:
                temperature = (row.get("sampling_params") or {}).get("temperature")
            reason = rules(row)
            if reason == "error" or reason == "no_reward":
                drops[reason] += 1
                acc.add_sample(reason, row)  # a few rows of each kind for the report
                continue  # nothing to choose from, nothing to measure per prompt
            if text is None:
                text = reply_text(row)
            # Benchmark text in the prompt or the reply comes before every other reason: such a row is neither
            # kept nor a preference pair's rejected side (nor shown among the report's sample rows).
            if hit is not None:
                reason = DROP_REASON
                check.count(hit, rid, k)
            else:  # a few rows of each kind for the report: dropped by a row rule, or passing them (kept
                # when no prompt rule chooses among a prompt's samples)
                acc.add_sample(reason if reason is not None else ("kept" if direct else "passed the row rules"), row)
            if reason is not None:
                drops[reason] += 1
            # Exact duplicates compare the normalised reply: the text itself, or a digest of it when it
            # is longer than the capped text that rides along (for near duplicates and distinct-n).
            digest = hashlib.blake2b(text.encode(), digest_size=16).hexdigest() if len(text) > TEXT_CAP else ""
            row_bytes, sort_key, kept_tokens = b"", "", 0  # the Scored record's row, shuffle_key, output_tokens
            if reason is None and formats:  # a candidate for train/: its training row in its format
                key, tokens = shuffle_key(seed, rid, k), output_tokens(row)
                row_bytes = (dumps(train_row(row, fmt, include, reasoning)) if fmt is not None else
                             b"\t".join(dumps(train_row(row, f, include, reasoning)) for f in formats))
                if direct:
                    validation = in_validation(seed, rid, fraction)
                    acc.add_kept(src, tokens, validation=validation)
                    shuffled.add_rows(validation, key, row_bytes)
                    row_bytes = b""
                else:
                    sort_key, kept_tokens = key, tokens
            elif reason is None:  # preference only: a sample kept by the rules is counted, its row is a pair's
                acc.add_kept(src, output_tokens(row), validation=in_validation(seed, rid, fraction))
            if pairs and (reason is None or reason == "below_min_reward" or reason == "above_max_reward"):
                # A pair candidate: every row rule but the reward bounds holds (a failing sample may be rejected).
                sort_key = sort_key or shuffle_key(seed, rid, k)
                row_bytes += b"\t" + dumps(train_row(row, CANDIDATE_FORMAT, include, reasoning))
            elif pairs:
                row_bytes += b"\t"
            # A Scored record but its rows (which follow it on the line, as bytes).
            meta = Scored(prompt_id=rid, shuffle_key=sort_key, reward=float(row["reward"]), passed_rules=reason is None,
                          digest=digest, text=text[:TEXT_CAP], source=src, output_tokens=kept_tokens,
                          input_line=_input_line(row) if job.keep_input_line else None, sample_index=k,
                          train_row=b"")[:SCORED_META]
            outs[zlib.crc32(rid.encode()) % n_groups].write(b"".join((dumps(meta), b"\t", row_bytes, b"\n")))
    return acc, torn, succeeded, temperature, shuffled.counts, odd, (check.tally if check is not None else Matches())


def _parsed(piece: tuple[str, int, int | None], check: RowCheck | None) -> Iterator[tuple[bytes, Any, Any, Any]]:
    """``(line, row or None when not JSON, benchmark hit or None, reply text or None)`` of each line of
    a byte range; the rows checked against the benchmarks many at a time when there are benchmarks
    (their :func:`reply_text` comes along, computed once)."""
    lines = io.iter_range(*piece)
    if check is not None:
        yield from check.rows(lines, _prompt_of, reply_text)
        return
    loads = orjson.loads
    for line in lines:
        try:
            yield line, loads(line), None, None
        except JSONDecodeError:
            yield line, None, None, None


def _prompt_of(row: dict[str, Any]) -> str:
    """The text of a rollout's prompt: its messages before the generated turns."""
    msgs = row.get("messages") or []
    return prompt_text(msgs[:generated_start(row)])


@_without_gc
def _group(job: _Job, g: int, failed: dict[str, list[Any]]) -> tuple[StatsAccumulator, Tally | None, dict[str, list[int]]]:
    """Pass 2 over prompt bucket ``g``: per prompt, pass@k and repetition, then (unless the scan
    kept rows directly) the prompt rules and the split; kept training rows go to the shuffle
    buckets. ``failed``: {prompt id: [failed samples, input line]} of this bucket's prompts
    (rejection sampling). Returns the statistics, the tally and the rows put in each shuffle bucket."""
    filter_, seed = job.filter, job.seed
    acc = StatsAccumulator()
    tally = Tally(*job.tally) if job.tally else None
    groups: dict[str, list[Scored]] = defaultdict(list)  # each prompt's records
    loads = orjson.loads
    pairs = job.pairs
    for data in _take(job.tmp, f"p{g}."):
        for line in data.split(b"\n"):
            if line:
                meta_bytes, _, row_bytes = line.partition(b"\t")
                if pairs is None:
                    sample = Scored(*loads(meta_bytes), row_bytes)
                else:  # the candidate's row is the last field (its JSON holds no raw tab)
                    row_bytes, _, pair_bytes = row_bytes.rpartition(b"\t")
                    sample = Scored(*loads(meta_bytes), row_bytes, pair_bytes)
                groups[sample.prompt_id].append(sample)
        del data
    threshold = filter_["min_reward"] if filter_["min_reward"] > 0 else 1.0
    fraction, max_per_prompt = job.train["validation_fraction"], job.train["max_per_prompt"]
    add_prompt, add_kept, drops = acc.add_prompt, acc.add_kept, acc.drops
    with contextlib.ExitStack() as files:
        shuffled = _ShuffleOut(job, f"{g:06d}", files)
        for rid, samples in groups.items():
            rewards = [s.reward for s in samples]
            if tally is not None:
                tally.add(rid, rewards, failed.pop(rid, [0])[0], samples[0].input_line, [s.sample_index for s in samples])
            keys = [s.duplicate_key for s in samples]
            if len(samples) > 1:
                add_prompt(rewards, threshold, 1.0 - len(set(keys)) / len(samples),
                           distinct_n([s.text for s in samples]))
            else:
                add_prompt(rewards, threshold, None, None)
            if pairs is not None:
                _pair(acc, shuffled, samples, filter_, pairs, in_validation(seed, rid, fraction))
            if job.direct or not job.sample_formats:
                continue  # the scan kept this prompt's rows already (or counted them: preference only)
            ok = [i for i, s in enumerate(samples) if s.passed_rules]
            dropped = (choose([samples[i] for i in ok], filter_, max_per_prompt)
                       if len(samples) > 1 and ok else {})
            validation = in_validation(seed, rid, fraction)
            for j, i in enumerate(ok):
                if j in dropped:
                    drops[dropped[j]] += 1
                    continue
                s = samples[i]
                add_kept(s.source, s.output_tokens, validation=validation)
                shuffled.add_rows(validation, s.shuffle_key, s.train_row)
    if tally is not None:
        for rid, (n, input_line) in failed.items():  # prompts without a single scored sample
            tally.add(rid, [], n, input_line)
    return acc, tally, shuffled.counts


def _pair(acc: StatsAccumulator, shuffled: _ShuffleOut, samples: list[Scored], filter_: dict[str, Any],
          rules: tuple[float, float, int], validation: bool) -> None:
    """One prompt's preference pairs (its candidates after ``filter.dedup``) to the shuffle buckets,
    or the reason it has none, counted."""
    cands = [s for s in samples if s.pair_row]
    if len(cands) > 1 and filter_["dedup"] != "none":
        dropped = choose(cands, filter_, None)
        cands = [s for i, s in enumerate(cands) if i not in dropped]
    made, reason = make_pairs(cands, *rules)
    if reason is not None:
        acc.no_pair[reason] += 1
        return
    acc.pair_prompts += 1
    for c, r in made:
        chosen, rejected = cands[c], cands[r]
        row = preference_row(orjson.loads(chosen.pair_row), orjson.loads(rejected.pair_row))
        acc.pairs += 1
        acc.pair_validation += validation
        acc.pair_margins.append(chosen.reward - rejected.reward)
        shuffled.add(validation, chosen.shuffle_key, orjson.dumps(row), PREFERENCE)


@_without_gc
def _sort_bucket(job: _Job, split: str, b: int, first: int, starts: list[int], sizes: list[int]) -> None:
    """Shuffle bucket ``b`` of a split (rows ``first``... of the split's global order), sorted by key;
    its rows (keys dropped) are cut at the shard boundaries, one segment file per shard it spans."""
    lines: list[bytes] = []
    for data in _take(job.tmp, f"{split}{b}."):
        lines += data.split(b"\n")[:-1]  # each line ends with a line end
    lines.sort()  # by the key in front of each row
    for i, (start, size) in enumerate(zip(starts, sizes)):
        lo, hi = max(start, first), min(start + size, first + len(lines))
        if lo < hi:
            with open(os.path.join(job.tmp, f"w{split}{i:06d}.{b:06d}"), "wb") as f:
                f.writelines(line[KEY_HEX:] + b"\n" for line in lines[lo - first:hi - first])


def _write_part(job: _Job, split: str, i: int, uri: str) -> None:
    """Shard ``i`` of a split (a split's rows of one format, :meth:`_Job.target`), from its segments
    (in bucket order)."""
    data = b"".join(_take(job.tmp, f"w{split}{i:06d}."))
    train = job.train
    if train["file_format"] == "jsonl":
        io.write_bytes(uri, data)
        return
    import pyarrow.parquet as pq

    # Every shard gets the schema declared for the format (never one inferred from this shard's rows).
    schema = parquet_schema(job.format_of(split), list(train["include_fields"]))
    table = parquet_table([orjson.loads(line) for line in data.split(b"\n")[:-1]], schema)
    buf = _io.BytesIO()
    pq.write_table(table, buf)
    io.write_bytes(uri, buf.getvalue())


def _write_split(run_dir: str, job: _Job, pool: Any, split: str, in_bucket: dict[str, list[int]]) -> dict[str, list[int]]:
    """Replace the ``split`` folder (train/ or validation/) with balanced shards part-00000.<ext>, ...
    (one format), or with a folder of such shards per format (several): the buckets are sorted and
    cut into segments, then the shards written from them, each step spread over the workers.
    Written aside (<split>.new/), then swapped in, so a crash while writing leaves the old folder
    whole. Returns the shard sizes of each format."""
    final, new = io.join(run_dir, split), io.join(run_dir, split + ".new")
    io.delete(new)
    io.makedirs(new)
    out = {}
    for fmt in job.formats:
        target = job.target(split, fmt)
        counts = in_bucket.get(target) or [0] * job.n_buckets
        folder = new if len(job.formats) == 1 else io.join(new, fmt)
        io.makedirs(folder)
        sizes = shard_sizes(sum(counts), job.train["rows_per_shard"])
        starts = list(itertools.accumulate(sizes, initial=0))[:-1]
        firsts = list(itertools.accumulate(counts, initial=0))[:-1]
        list(pool.map(_sort_bucket, itertools.repeat(job), itertools.repeat(target), range(job.n_buckets), firsts,
                      itertools.repeat(starts), itertools.repeat(sizes)))
        ext = job.train["file_format"]
        list(pool.map(_write_part, itertools.repeat(job), itertools.repeat(target), range(len(sizes)),
                      [io.join(folder, shard_name(i, ext)) for i in range(len(sizes))]))
        out[fmt] = sizes
    io.replace_dir(new, final)
    return out
