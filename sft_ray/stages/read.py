"""Read stage: prompt JSONL files -> a Ray dataset of samples to generate.

A small custom Ray Data ``Datasource`` (one read task per file) rather than
``ray.data.read_json``: the built-in readers infer an Arrow schema from the rows,
which fails on, or silently coerces, real NeMo Gym rows (mixed string/list
``content``, extra fields of varying types). Here each line is parsed by orjson
and kept as its original JSON text, so nothing is coerced or dropped, and every
row keeps its ``file:line`` for error messages.

Each output row is one *sample*: ``id``, ``sample_index``, ``row`` (the input
line, verbatim), ``source`` (``file:line``) and ``bad`` (an error text for a
skipped malformed line, else null).
"""

from __future__ import annotations

from typing import Any, Iterable

import pyarrow as pa
import pyarrow.fs as pafs

from sft_ray import io
from sft_ray.rows import InputError, parse_line, row_id

BLOCK_ROWS = 1024

SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("sample_index", pa.int32()),
        ("row", pa.string()),
        ("source", pa.string()),
        ("bad", pa.string()),
    ]
)


def read_samples(
    path: str,
    num_repeats: int,
    skip_bad_lines: bool = False,
    done: frozenset[tuple[str, int]] | set[tuple[str, int]] = frozenset(),
    limit: int | None = None,
    fs: pafs.FileSystem | None = None,
) -> Iterable[dict[str, list[Any]]]:
    """Yield column batches of samples from one file.

    A malformed line becomes a sample whose ``bad`` column holds the reason; without
    ``skip_bad_lines`` the file's reading stops there (the driver stops the run).
    Samples whose ``(id, sample_index)`` is in ``done`` are not emitted (resume).
    Rows with the same content and no ``id`` get ``-1``, ``-2``... suffixes so
    that every sample key stays unique. ``fs``: the filesystem to read ``path``
    from (see :func:`sft_ray.io.filesystem`), else resolved here.
    """
    cols: dict[str, list[Any]] = {name: [] for name in SCHEMA.names}
    seen: dict[str, int] = {}
    rows_read = 0
    for lineno, line in enumerate(io.iter_lines(path, fs), start=1):
        if not line.strip():
            continue
        if limit is not None and rows_read >= limit:
            break
        rows_read += 1
        source = f"{path}:{lineno}"
        try:
            row = parse_line(line, source)
        except InputError as e:
            # The bad line travels as a row marked `bad` rather than as an exception: the
            # driver then stops the run with a one-line message (or, when skipping, records
            # it in failed/), and rows already written stay written.
            rid, text, bad = f"bad:{path}:{lineno}", line.decode("utf-8", "replace"), str(e)
            keys = [(rid, 0)]
            stop = not skip_bad_lines
        else:
            stop = False
            rid, text, bad = row_id(row), line.decode("utf-8"), None
            n = seen.get(rid, 0)
            seen[rid] = n + 1
            if n:
                rid = f"{rid}-{n}"
            keys = [(rid, k) for k in range(num_repeats)]
        for key in keys:
            if key in done:
                continue
            cols["id"].append(key[0])
            cols["sample_index"].append(key[1])
            cols["row"].append(text)
            cols["source"].append(source)
            cols["bad"].append(bad)
        if stop:
            break
        if len(cols["id"]) >= BLOCK_ROWS:
            yield cols
            cols = {name: [] for name in SCHEMA.names}
    if cols["id"]:
        yield cols


def make_dataset(
    files: list[str],
    num_repeats: int,
    skip_bad_lines: bool,
    done: set[tuple[str, int]] | None = None,
    limit: int | None = None,
):
    """A lazy Ray dataset of the samples still to generate."""
    import ray.data
    from ray.data.block import BlockMetadata

    done_keys = frozenset(done or ())
    # Resolved here, on the driver, so that read tasks on other nodes use the endpoint
    # and region the driver was configured with (one input URI: one filesystem).
    fs = io.filesystem(files[0])[0] if files else None

    class _Source(ray.data.Datasource):
        def estimate_inmemory_data_size(self) -> int | None:
            return None

        def get_name(self) -> str:
            return "ReadPromptJSONL"

        def get_read_tasks(self, parallelism: int, per_task_row_limit=None, data_context=None):
            tasks = []
            for path in files:

                def read_fn(path: str = path):
                    for cols in read_samples(path, num_repeats, skip_bad_lines, done_keys, limit, fs):
                        yield pa.table(cols, schema=SCHEMA)

                meta = BlockMetadata(num_rows=None, size_bytes=None, exec_stats=None, input_files=(path,))
                tasks.append(ray.data.ReadTask(read_fn, meta, schema=SCHEMA))
            return tasks

    return ray.data.read_datasource(_Source(), override_num_blocks=len(files))
