"""Read stage: prompt files (JSONL, Parquet, `datasets` folders) -> a Ray dataset of samples to generate.

A small custom Ray Data ``Datasource`` (one read task per file) rather than
``ray.data.read_json``: the built-in readers infer an Arrow schema from the rows,
which fails on, or silently coerces, real NeMo Gym rows (mixed string/list
``content``, extra fields of varying types). Here each row is JSON text
(:mod:`sft_ray.tabular`: a JSONL line as it is, a Parquet or Arrow row as the JSON of its
values), parsed by orjson and kept as that text, so nothing is coerced or dropped, and every
row keeps its ``file:line`` (``file:row`` for Parquet and Arrow) for error messages.

Before that, the driver scans the whole input once (:func:`scan_input`): row counts,
content digests, the first bad line, and the ids, which must be unique across the
whole input (see :class:`KeyMaker`).

Each output row is one *sample*: ``id``, ``sample_index``, ``row`` (the input
line, verbatim), ``source`` (``file:line``), ``bad`` (the reason, for a
malformed line that stops the run, else null) and ``draw`` (null). With rejection
sampling a row is one *prompt* instead: ``draw`` says where it stands
(:class:`sft_ray.runfolder.completion.PromptDraws` as JSON) and the generation actor draws its samples.
"""

from __future__ import annotations

import hashlib
from array import array
from dataclasses import dataclass, field
from typing import Any, Iterable

import orjson
import pyarrow as pa
import pyarrow.fs as pafs

from sft_ray import io, tabular
from sft_ray.decontaminate import Index, canonical, prompt_text
from sft_ray.rows import InputError, check_row, load_object, prompt_messages, rename_fields, row_id
from sft_ray.runfolder.completion import DrawPlan, PromptDraws
from sft_ray.stages import Stage

BLOCK_ROWS = 1024
EMPTY_DRAW = PromptDraws().to_json()  # a prompt with no sample yet
READ_NUM_CPUS = 0.1  # reading is light; a whole CPU per task could find no node on a small cluster
# Read and repartition tasks at once (each): at 0.1 CPU Ray Data would run up to ten of each, and
# every task beyond the first needs a new worker process that imports Ray Data and pandas
# (1.5-3 s of CPU each, beside the actors starting up). One keeps far ahead of generation.
READ_CONCURRENCY = 1

SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("sample_index", pa.int32()),
        ("row", pa.string()),
        ("source", pa.string()),
        ("bad", pa.string()),
        ("draw", pa.string()),
    ]
)


class KeyMaker:
    """Sample ids for the rows of one file, unique within the whole input.

    A row's id is its own ``id`` when that is a non-empty string. Other rows get a derived
    id: a non-string ``id`` as its JSON text (``7`` -> ``"7"``), no ``id`` a hash of the row's
    content (see :func:`row_id`). Then, in file order:

    - a row keeps that id unless an earlier row took it, and a derived id is also given up
      when some row of the file has it as its own string ``id`` (string ids win: ``7`` and
      ``"7"`` in one file give ``"7"`` to the string);
    - a row that cannot keep it (a repeat, or such a type clash) gets ``<id>-1``, ``-2``...: the
      first that is neither taken nor any row's own string ``id`` in the file, so ``a, a, a-1``
      become ``a``, ``a-2``, ``a-1``.

    Rows that need no suffix keep exactly the id they had before this rule also looked ahead
    (run folders made then resume). Only the rows the run uses count (``read.limit``). When
    the driver finds that a file's ids collide with an earlier file's (shards numbered from 0
    each), every id of the file is qualified by its path below the input folder:
    ``shard-1.jsonl:17``. Every rule depends only on the input, so a rerun makes the same ids.

    Feed every used row with :meth:`add`, then :meth:`resolve`: the rule looks ahead, so the
    driver's scan resolves each file and hands its read task the few suffixed ids (``renamed``).
    """

    def __init__(self) -> None:
        # Per row, in three columns (a row costs its id and 9 bytes beside it, at millions of rows):
        self.ids: list[str] = []  # its id before suffixes
        self.lines = array("q")  # its line number
        self.own = bytearray()  # 1 where the row gave that id as a string

    def add(self, lineno: int, row: dict[str, Any]) -> None:
        given = row.get("id")
        self.ids.append(row_id(row))
        self.lines.append(lineno)
        self.own.append(isinstance(given, str) and given != "")

    def resolve(self) -> tuple[list[str], dict[int, str]]:
        """(every row's id in file order, {line: id} of the rows whose id is not their own/derived one)."""
        reserved = {rid for rid, own in zip(self.ids, self.own) if own}
        taken: set[str] = set()
        repeats: dict[str, int] = {}
        keys = self.ids  # made final in place
        renamed: dict[int, str] = {}
        for i, (rid, own) in enumerate(zip(self.ids, self.own)):
            key = rid
            if rid in taken or (not own and rid in reserved):
                n = repeats.get(rid, 0)
                while key in taken or key in reserved:
                    n += 1
                    key = f"{rid}-{n}"
                repeats[rid] = n
                renamed[self.lines[i]] = keys[i] = key
            taken.add(key)
        return keys, renamed


@dataclass
class InputFile:
    path: str
    lines: int  # non-blank lines in the file
    digest: str  # content digest (resume refuses an input that changed)
    rows: int = 0  # lines used: the first ones, up to what read.limit leaves for this file
    qualifier: str | None = None
    renamed: dict[int, str] = field(default_factory=dict)  # line -> id, for rows with a suffixed id (KeyMaker)
    held: frozenset[int] = frozenset()  # lines whose prompt holds benchmark text: never sent (decontaminate)


@dataclass
class InputPlan:
    """What the driver learnt from one pass over the input, before anything runs."""

    files: list[InputFile]
    ids: set[str] = field(default_factory=set)  # the sample ids of every usable row
    bad_lines: list[str] = field(default_factory=list)  # "file:line: reason" of each skipped line
    renamed_columns: set[str] = field(default_factory=set)  # the read.rename columns some row has
    # Prompts held back by decontamination ({id, input_line, benchmark, benchmark_row, matched}): not in ids.
    contaminated: list[dict[str, Any]] = field(default_factory=list)
    index: Index | None = None  # the benchmark index the prompts were checked against

    @property
    def rows(self) -> int:
        return sum(f.rows for f in self.files)

    @property
    def digests(self) -> dict[str, str]:
        return {f.path: f.digest for f in self.files}

    def used(self) -> list[InputFile]:
        return [f for f in self.files if f.rows]


def _relative(paths: list[str]) -> list[str]:
    """Each path below the folder the paths have in common (their stable short names)."""
    split = [p.split("/") for p in paths]
    common = 0
    while all(len(s) > common + 1 and s[common] == split[0][common] for s in split):
        common += 1
    return ["/".join(s[common:]) for s in split]


class _PromptCheck:
    """The prompts of one file checked against the benchmark index in batches, as the scan reads them."""

    BATCH = 4096

    def __init__(self, index: Index | None) -> None:
        self.index = index
        self.lines: list[int] = []
        self.canons: list[bytes] = []
        self.hits: dict[int, Any] = {}  # line -> Hit

    def add(self, lineno: int, row: dict[str, Any], source: str) -> None:
        if self.index is None:
            return
        self.lines.append(lineno)
        self.canons.append(canonical(prompt_text(prompt_messages(row, source))))
        if len(self.lines) >= self.BATCH:
            self.flush()

    def flush(self) -> dict[int, Any]:
        if self.lines:
            for lineno, hit in zip(self.lines, self.index.check_canonical(self.canons)):
                if hit is not None:
                    self.hits[lineno] = hit
            self.lines, self.canons = [], []
        return self.hits


def scan_input(files: list[str], limit: int | None, skip_bad_lines: bool,
               rename: dict[str, str] | None = None, index: Index | None = None) -> InputPlan:
    """One streamed pass over every input file: its rows and digest, the ids of the rows a
    run uses (the first ``limit`` rows of the whole input, in file order), and bad lines.
    ``rename``: ``read.rename``, applied to every row before it is checked (the digest is of the
    file's rows as they are).

    Without ``skip_bad_lines`` the first bad line raises :class:`InputError`, before any
    work starts. Files whose ids collide with an earlier file's are given a qualifier
    (see :class:`KeyMaker`). Ids are held as a set: memory grows with the input's rows,
    as the set of done samples on resume does. With a benchmark ``index`` (decontaminate), each
    used row's prompt is checked: a contaminated row keeps its id (ids do not depend on the
    benchmarks) but is left out of the ids (never sent, never pending), its line is held back
    from the read stage, and it is listed in ``contaminated``.
    """
    plan = InputPlan([], index=index)
    left = limit
    for path, rel in zip(files, _relative(files)):
        digest = hashlib.blake2b(digest_size=16)
        n = 0
        make = KeyMaker()
        check = _PromptCheck(index)
        for lineno, line in tabular.iter_rows(path):
            n += 1
            digest.update(line + b"\n")
            if left is not None and n > left:
                continue
            source = f"{path}:{lineno}"
            try:
                row = load_object(line, source)
                if rename:
                    plan.renamed_columns.update(k for k in rename if k in row)
                    row = rename_fields(row, rename, source)
                row = check_row(row, source)
            except InputError as e:
                if not skip_bad_lines:
                    raise
                plan.bad_lines.append(tabular.located(e))  # "file row N" for Parquet, as its errors say
                continue
            make.add(lineno, row)
            check.add(lineno, row, source)
        hits = check.flush()
        keys, renamed = make.resolve()
        f = InputFile(path, n, digest.hexdigest(), rows=n if left is None else min(n, left), renamed=renamed,
                      held=frozenset(hits))
        if left is not None:
            left -= f.rows
        if any(k in plan.ids for k in keys):
            f.qualifier = rel
            keys = [f"{rel}:{k}" for k in keys]
        if hits:
            held = set()
            for lineno, key in zip(make.lines, keys):
                hit = hits.get(lineno)
                if hit is not None:
                    held.add(key)
                    plan.contaminated.append({"id": key, "input_line": f"{path}:{lineno}", **hit.as_json()})
            keys = [k for k in keys if k not in held]
        plan.ids.update(keys)
        plan.files.append(f)
    return plan


def read_samples(
    path: str,
    num_repeats: int,
    skip_bad_lines: bool = False,
    done: frozenset[tuple[str, int]] | set[tuple[str, int]] = frozenset(),
    limit: int | None = None,
    fs: pafs.FileSystem | None = None,
    qualifier: str | None = None,
    block_rows: int = BLOCK_ROWS,
    draws: DrawPlan | None = None,
    renamed: dict[int, str] | None = None,
    rename: dict[str, str] | None = None,
    held: frozenset[int] = frozenset(),
) -> Iterable[dict[str, list[Any]]]:
    """Yield column batches of samples from the first ``limit`` rows of one file.

    A malformed line is dropped with ``skip_bad_lines`` (the driver counted it while
    scanning); without, it becomes a sample whose ``bad`` column holds the reason and
    the file's reading stops there (the driver stops the run). Samples whose
    ``(id, sample_index)`` is in ``done`` are not emitted (resume). Ids follow
    :class:`KeyMaker`: a row's own id, or ``renamed[line]`` (the driver's scan resolved those; None:
    this file is scanned first), with the ``qualifier`` the driver chose for this file. ``fs``: the
    filesystem to read ``path`` from (see :func:`sft_ray.io.filesystem`), else resolved here.
    With ``draws`` (rejection sampling), one row per prompt that is not finished, with its
    ``draw`` state, instead of one per sample. ``rename``: ``read.rename`` (the ``row`` column holds
    the row with its fields renamed). Lines in ``held`` (prompts with benchmark text, found by the
    driver's scan) are never emitted.
    """
    cols: dict[str, list[Any]] = {name: [] for name in SCHEMA.names}
    if renamed is None:  # called on its own, not with the driver's scan: the suffixes need the whole file
        renamed = scan_input([path], limit, True, rename).files[0].renamed
    rows_read = 0
    for lineno, line in tabular.iter_rows(path, fs):
        if limit is not None and rows_read >= limit:
            break
        rows_read += 1
        if lineno in held:
            continue
        source = f"{path}:{lineno}"
        try:
            given = load_object(line, source)
            row = check_row(rename_fields(given, rename, source), source)
        except InputError as e:
            if skip_bad_lines:
                continue
            # The bad line travels as a row marked `bad` rather than as an exception: the
            # driver then stops the run with a one-line message, and rows already written
            # stay written. (The driver's scan normally finds it first.)
            rid, text, bad = f"bad:{path}:{lineno}", line.decode("utf-8", "replace"), str(e)
            keys, draw = [(rid, 0)], None
            stop = True
        else:
            stop = False
            text = line.decode("utf-8") if row is given else orjson.dumps(row).decode()  # renamed: its new JSON
            rid, bad = renamed.get(lineno) or row_id(row), None
            if qualifier:
                rid = f"{qualifier}:{rid}"
            if draws is None:
                keys, draw = [(rid, k) for k in range(num_repeats)], None
            elif rid in draws.finished:
                keys = []
            else:
                draw = draws.started.get(rid) or EMPTY_DRAW
                keys = [(rid, PromptDraws.from_json(draw).next)]
        for key in keys:
            if key in done:
                continue
            cols["id"].append(key[0])
            cols["sample_index"].append(key[1])
            cols["row"].append(text)
            cols["source"].append(source)
            cols["bad"].append(bad)
            cols["draw"].append(draw)
        if stop:
            break
        if len(cols["id"]) >= block_rows:
            yield cols
            cols = {name: [] for name in SCHEMA.names}
    if cols["id"]:
        yield cols


def make_dataset(
    files: list[InputFile],
    num_repeats: int,
    skip_bad_lines: bool,
    done: set[tuple[str, int]] | None = None,
    block_rows: int = BLOCK_ROWS,
    draws: DrawPlan | None = None,
    rename: dict[str, str] | None = None,
):
    """A lazy Ray dataset of the samples still to generate: one read task per file, each
    reading the rows the scan gave it, with the file's id qualifier, cut into blocks of about
    ``block_rows`` samples. Read and repartition tasks ask for ``READ_NUM_CPUS``: beside actors that leave
    only part of a CPU free on each node, a whole-CPU task would wait forever."""
    import ray.data
    from ray.data._internal.compute import TaskPoolStrategy
    from ray.data.block import BlockMetadata

    done_keys = frozenset(done or ())
    # Resolved here, on the driver, so that read tasks on other nodes use the endpoint
    # and region the driver was configured with (one input URI: one filesystem).
    fs = io.filesystem(files[0].path)[0] if files else None

    class _Source(ray.data.Datasource):
        def estimate_inmemory_data_size(self) -> int | None:
            return None

        def get_name(self) -> str:
            return "ReadPrompts"

        def get_read_tasks(self, parallelism: int, per_task_row_limit=None, data_context=None):
            tasks = []
            for f in files:

                def read_fn(f: InputFile = f):
                    for cols in read_samples(f.path, num_repeats, skip_bad_lines, done_keys, f.rows, fs,
                                             f.qualifier, block_rows, draws, f.renamed, rename, f.held):
                        yield pa.table(cols, schema=SCHEMA)

                meta = BlockMetadata(num_rows=None, size_bytes=None, exec_stats=None, input_files=(f.path,))
                tasks.append(ray.data.ReadTask(read_fn, meta, schema=SCHEMA))
            return tasks

    ds = ray.data.read_datasource(_Source(), override_num_blocks=max(1, len(files)), num_cpus=READ_NUM_CPUS,
                                  concurrency=READ_CONCURRENCY)
    # Ray Data merges a task's small outputs into blocks of up to target_max_block_size bytes:
    # a streaming repartition cuts them to block_rows so that they spread over every actor.
    ds = ds.repartition(target_num_rows_per_block=block_rows)
    # Its tasks would ask for a whole CPU, without a bound on how many run at once, and
    # repartition() takes neither argument, so the logical operator's remote args and compute
    # strategy are set here (Ray Data internals: checked by tests/e2e/test_resume.py::
    # test_reads_fit_beside_actors_that_leave_half_a_cpu and test_read_tasks_run_one_at_a_time).
    op = ds._logical_plan.dag
    if isinstance(getattr(op, "ray_remote_args", None), dict):
        op.ray_remote_args["num_cpus"] = READ_NUM_CPUS
    if isinstance(getattr(op, "compute", None), TaskPoolStrategy):
        object.__setattr__(op, "compute", TaskPoolStrategy(size=READ_CONCURRENCY))  # a frozen dataclass
    return ds


def wiring(cfg: Any, plan: dict[str, Any], files: list[InputFile], done: set[tuple[str, int]],
           draws: DrawPlan | None = None) -> dict[str, Any]:
    """:func:`make_dataset`'s arguments: one read task per file (ids are made per file), cut into
    blocks small enough to spread over every actor; ``done``: the samples not to send again."""
    return dict(files=files, num_repeats=cfg.num_repeats, skip_bad_lines=cfg.read.skip_bad_lines, done=done,
                block_rows=plan["block_rows"], draws=draws, rename=cfg.read.rename or None)


STAGE = Stage("read", make_dataset, reads=(), writes=tuple(SCHEMA.names), wiring=wiring)
