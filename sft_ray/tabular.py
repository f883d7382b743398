"""The one reader of tabular sources: JSONL, Parquet and `datasets` folders, as JSON rows.

A *source* is a file, a folder or a glob, local or on an object store (see :mod:`sft_ray.io`).
Its files (:func:`list_files`) are read by their name:

- ``*.parquet``: Parquet, read one record batch at a time (at most :data:`BATCH_ROWS` rows, never
  more than one row group decoded at once), only the ``columns`` asked for;
- ``*.arrow``: Arrow IPC, as ``datasets``' ``save_to_disk`` writes its shards (the stream format;
  the file format is read too), one record batch at a time;
- anything else: JSONL (``.gz`` decompressed), one line at a time.

A folder contributes its ``*.jsonl``, ``*.jsonl.gz``, ``*.parquet`` and ``*.arrow`` files, all
levels down, in name order; where a folder holds ``state.json`` (a ``save_to_disk`` folder), only
the shards it lists (``_data_files``), so that cache files beside them are not read. A folder
written from a ``DatasetDict`` holds one such folder per split: every split is read.

Every row arrives as the JSON text a JSONL line would hold (:func:`iter_rows`) or its value
(:func:`iter_records`): the same Python values ``orjson.loads`` gives for the JSONL line. Arrow
values are mapped to JSON thus (decided here, documented in docs/input.md):

- a null is an absent key, at every level: a struct field or a column that is null in a row is
  left out of that row's object (pyarrow's ``to_pylist`` would give every struct key, with None
  for the missing ones: a Parquet file written from JSONL rows of different shapes holds every
  key of every row), so ``{"role": "user", "content": "hi"}`` reads back without the
  ``tool_calls: null`` its neighbours put in the schema. A null inside a list stays null.
- structs and string-keyed maps are objects; lists (of any kind) are arrays;
- dictionary-encoded values are their values; decimals are numbers (floats, as JSON parses them);
  timestamps, dates and times are strings (Arrow's text: ``2024-05-01 12:00:00``);
- the canonical JSON extension type (what sft-ray's own Parquet output uses for values of no fixed
  type) is the JSON value it holds;
- binary, durations, intervals, maps with non-string keys and other extension types have no JSON
  value: the file is refused, naming the column.

Row numbers count from 1: a JSONL file's line numbers (blank lines are skipped but counted), a
Parquet or Arrow file's row positions. Errors are :class:`InputError` naming ``file:row`` and, where
there is one, the field.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Iterator

import orjson
import pyarrow as pa
import pyarrow.fs as pafs

from sft_ray import io
from sft_ray.rows import InputError, load_object

BATCH_ROWS = 1024  # rows per record batch read from Parquet/Arrow (memory: one batch's rows as Python values)
PARQUET_SUFFIXES = (".parquet",)
ARROW_SUFFIXES = (".arrow",)
JSONL_SUFFIXES = (".jsonl", ".jsonl.gz")
# What a folder contributes: so that a dataset_info.json, a README or a checksum file next to the
# shards does not stop the run.
FOLDER_SUFFIXES = JSONL_SUFFIXES + PARQUET_SUFFIXES + ARROW_SUFFIXES
DATASETS_STATE = "state.json"  # save_to_disk's list of its shards


@dataclass(frozen=True)
class Record:
    """One row of a source: the file it is in, its row number there, its value (a JSON object)."""

    file: str
    row: int
    value: dict[str, Any]


def kind(path: str) -> str:
    """How a file is read, from its name: ``parquet``, ``arrow`` or ``jsonl``."""
    name = path.split("?", 1)[0].lower()
    if name.endswith(PARQUET_SUFFIXES):
        return "parquet"
    if name.endswith(ARROW_SUFFIXES):
        return "arrow"
    return "jsonl"


def at(path: str, row: int) -> str:
    """Where a row is, as messages name it: ``file:line`` for JSONL, ``file row N`` for Parquet and
    Arrow files (which have rows, not lines). Ids and ``input_line`` keep ``file:N`` for both."""
    return f"{path}:{row}" if kind(path) == "jsonl" else f"{path} row {row}"


def located(err: InputError) -> str:
    """An :class:`InputError`'s message with its place as :func:`at` names it (its ``source`` is
    ``file:N``, or a whole file)."""
    path, _, row = err.source.rpartition(":")
    return f"{at(path, int(row))}: {err.reason}" if path and row.isdigit() else str(err)


def bad_input(err: InputError) -> str:
    """``bad input line: file:N: ...`` for a JSONL line, ``bad input row: file row N: ...`` for a Parquet
    or Arrow row."""
    path, _, row = err.source.rpartition(":")
    what = "line" if not (path and row.isdigit()) or kind(path) == "jsonl" else "row"
    return f"bad input {what}: {located(err)}"


def list_files(source: str, what: str = "input") -> list[str]:
    """The files of a source, sorted, as the user would write them (``s3://...`` for S3).

    A file names itself (whatever its name); a glob its matching files (``*`` stays within a
    folder, ``**/`` spans folders); a folder its JSONL, Parquet and Arrow files below it (in a
    ``save_to_disk`` folder only the shards its ``state.json`` lists). :class:`FileNotFoundError`
    naming the source (as ``what``, the setting it comes from) when it does not exist or names no file.
    """
    fs, path = io.filesystem(source)
    if any(c in path for c in "*?["):
        base = path
        while any(c in base for c in "*?["):
            base = base.rsplit("/", 1)[0]
        infos = fs.get_file_info(pafs.FileSelector(base or "/", recursive=True, allow_not_found=True))
        pattern = io.glob_regex(path)
        files = [i.path for i in infos if i.type == pafs.FileType.File and pattern.fullmatch(i.path)]
    else:
        info = fs.get_file_info(path)
        if info.type == pafs.FileType.NotFound:
            raise FileNotFoundError(f"{what} not found: {source}")
        if info.type == pafs.FileType.Directory:
            infos = fs.get_file_info(pafs.FileSelector(path, recursive=True))
            files = _folder_files(fs, [i.path for i in infos if i.type == pafs.FileType.File])
        else:
            files = [path]
    if not files:
        raise FileNotFoundError(f"no {what} files match {source}")
    return [io.display(fs, f) for f in sorted(files)]


def _folder_files(fs: pafs.FileSystem, paths: list[str]) -> list[str]:
    """The files a folder contributes: by suffix, and in a save_to_disk folder only its listed shards."""
    shards: dict[str, set[str]] = {}  # save_to_disk folder -> its shards' names
    for p in paths:
        folder, _, name = p.rpartition("/")
        if name == DATASETS_STATE:
            with fs.open_input_stream(p) as f:
                try:
                    state = orjson.loads(f.read())
                    shards[folder] = {d["filename"] for d in state["_data_files"]}
                except (orjson.JSONDecodeError, KeyError, TypeError):
                    raise InputError(io.display(fs, p), "not a `datasets` state.json (expected _data_files: "
                                     "[{filename: ...}])") from None
    out = []
    for p in paths:
        folder, _, name = p.rpartition("/")
        if not p.endswith(FOLDER_SUFFIXES):
            continue
        if p.endswith(ARROW_SUFFIXES) and folder in shards and name not in shards[folder]:
            continue  # a cache file beside a saved dataset's shards
        out.append(p)
    return out


def iter_rows(path: str, fs: pafs.FileSystem | None = None,
              columns: list[str] | None = None) -> Iterator[tuple[int, bytes]]:
    """``(row number, JSON text)`` of each row of one file, streamed: a JSONL line as it is in the
    file (not parsed: a bad line is for the caller to report), a Parquet or Arrow row as the JSON
    text of its object (compact, keys in column order). Blank JSONL lines are skipped.
    ``columns``: only these columns of Parquet/Arrow rows (JSONL lines are whole)."""
    how = kind(path)
    if how == "jsonl":
        for lineno, line in enumerate(io.iter_lines(path, fs), start=1):
            if line.strip():
                yield lineno, line
        return
    n = 0
    for batch in _batches(path, fs, columns):
        for text in _json_texts(batch, path, n):
            n += 1
            yield n, text


def iter_records(source: str, columns: list[str] | None = None,
                 files: list[str] | None = None) -> Iterator[Record]:
    """Every row of a source (``files``: its :func:`list_files`, when known) as a :class:`Record`,
    file by file in name order, in bounded memory. ``columns``: keep only these fields of each row
    (and read only these columns of Parquet/Arrow files); a row lacking one simply lacks it. A
    JSONL line that is not a JSON object raises :class:`InputError` naming ``file:line``."""
    for path in files if files is not None else list_files(source):
        for rowno, text in iter_rows(path, columns=columns):
            value = load_object(text, f"{path}:{rowno}")
            if columns is not None and kind(path) == "jsonl":
                value = {k: value[k] for k in columns if k in value}
            yield Record(path, rowno, value)


# -- Parquet and Arrow ---------------------------------------------------------------------


def _batches(path: str, fs: pafs.FileSystem | None, columns: list[str] | None) -> Iterator[pa.RecordBatch]:
    """The record batches of a Parquet or Arrow file (at most BATCH_ROWS rows each), values made JSON-able
    (see the module's docstring), only ``columns`` when given."""
    fs, inner = io.filesystem(path, fs)
    with fs.open_input_file(inner) as f:
        try:
            reader, schema = _open(f, path)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, OSError) as e:
            what = "Parquet" if kind(path) == "parquet" else "Arrow IPC"
            raise InputError(path, f"not a readable {what} file ({e})") from None
        if columns is not None:
            missing = [c for c in columns if c not in schema.names]
            if missing:
                raise InputError(path, f"column(s) {', '.join(missing)}: not in the file (it has: "
                                 f"{', '.join(schema.names)})")
        target = pa.schema([pa.field(fld.name, _json_type(fld.type, path, fld.name)) for fld in schema
                            if columns is None or fld.name in columns])
        try:
            for batch in reader(columns):
                if batch.num_rows == 0:
                    continue
                if columns is not None:
                    batch = batch.select(columns) if kind(path) == "arrow" else batch
                if batch.schema.types != target.types:
                    batch = pa.Table.from_batches([batch]).cast(target).combine_chunks().to_batches()[0]
                yield batch
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
            raise InputError(path, f"cannot be read ({e})") from None


def _open(f: Any, path: str):
    """(a function of ``columns`` giving the record batches, the schema) for an open Parquet/Arrow file."""
    if kind(path) == "parquet":
        import pyarrow.parquet as pq

        pf = pq.ParquetFile(f)
        return (lambda columns: pf.iter_batches(batch_size=BATCH_ROWS, columns=columns)), pf.schema_arrow
    magic = f.read(6)
    f.seek(0)
    if magic == b"ARROW1":  # the IPC file format (random access)
        rf = pa.ipc.open_file(f)
        return (lambda columns: (b for i in range(rf.num_record_batches)
                                 for b in _cut(rf.get_batch(i)))), rf.schema
    sr = pa.ipc.open_stream(f)  # the stream format: what save_to_disk writes
    return (lambda columns: (b for batch in sr for b in _cut(batch))), sr.schema


def _cut(batch: pa.RecordBatch) -> Iterable[pa.RecordBatch]:
    """A record batch in slices of at most BATCH_ROWS rows (zero-copy)."""
    for start in range(0, batch.num_rows, BATCH_ROWS):
        yield batch.slice(start, BATCH_ROWS)


_TEMPORAL = (pa.types.is_timestamp, pa.types.is_date, pa.types.is_time)


def _json_type(t: pa.DataType, path: str, where: str, top: bool = True) -> pa.DataType:
    """The Arrow type whose ``to_pylist`` values are JSON values for values of type ``t`` (``t`` itself
    when they already are), or :class:`InputError` naming the column (``where``) for a type with no JSON
    value. ``top``: ``t`` is a column's type, not a type inside one."""
    if isinstance(t, pa.JsonType):
        if not top:
            raise InputError(path, f"column {where}: a JSON extension value inside another value is not read")
        return t
    if (pa.types.is_null(t) or pa.types.is_boolean(t) or pa.types.is_integer(t)
            or pa.types.is_float32(t) or pa.types.is_float64(t) or pa.types.is_string(t)
            or pa.types.is_large_string(t) or pa.types.is_string_view(t)):
        return t
    if pa.types.is_float16(t) or pa.types.is_decimal(t):
        return pa.float64()
    if any(is_(t) for is_ in _TEMPORAL):
        return pa.string()
    if pa.types.is_dictionary(t):
        return _json_type(t.value_type, path, where, top)
    if pa.types.is_map(t):
        if not (pa.types.is_string(t.key_type) or pa.types.is_large_string(t.key_type)):
            raise InputError(path, f"column {where}: a map with {t.key_type} keys has no JSON value (keys must be "
                             "strings)")
        return pa.map_(t.key_type, _json_type(t.item_type, path, f"{where}[]", False))
    if pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t) \
            or pa.types.is_list_view(t) or pa.types.is_large_list_view(t):
        item = t.value_field.with_type(_json_type(t.value_type, path, f"{where}[]", False))
        return pa.large_list(item) if pa.types.is_large_list(t) else pa.list_(item)
    if pa.types.is_struct(t):
        return pa.struct([t.field(i).with_type(_json_type(t.field(i).type, path, f"{where}.{t.field(i).name}", False))
                          for i in range(t.num_fields)])
    raise InputError(path, f"column {where}: Arrow type {t} has no JSON value (leave the column out of the file, "
                     "or cast it to a string)")


def _converter(t: pa.DataType):
    """A function making a ``to_pylist`` value of type ``t`` what JSON gives (struct fields that are
    None left out, maps as objects), or None where the value is that already."""
    if pa.types.is_struct(t):
        subs = {t.field(i).name: _converter(t.field(i).type) for i in range(t.num_fields)}
        if not any(subs.values()):
            return lambda v: {k: x for k, x in v.items() if x is not None}
        return lambda v: {k: (subs[k](x) if subs[k] else x) for k, x in v.items() if x is not None}
    if pa.types.is_map(t):
        item = _converter(t.item_type)
        return lambda v: {k: (item(x) if item and x is not None else x) for k, x in v}
    if pa.types.is_list(t) or pa.types.is_large_list(t):
        item = _converter(t.value_type)
        return None if item is None else (lambda v: [None if x is None else item(x) for x in v])
    return None


def _to_convert(array: pa.Array) -> bool:
    """Whether a column's ``to_pylist`` values need :func:`_converter`: a map, or a struct field holding a
    null somewhere inside (checked on the Arrow buffers, so a column without one costs nothing more)."""
    t = array.type
    if pa.types.is_map(t):
        return True
    if pa.types.is_struct(t):
        return any(array.field(i).null_count or _to_convert(array.field(i)) for i in range(t.num_fields))
    if pa.types.is_list(t) or pa.types.is_large_list(t):
        return _to_convert(array.values)  # the whole child array, a slice's neighbours included: at worst converted
    return False


def _json_texts(batch: pa.RecordBatch, path: str, before: int) -> Iterator[bytes]:
    """The JSON text of each row of a batch (``before``: rows of the file before it); columns are
    converted as whole lists, far cheaper than value by value."""
    names = batch.schema.names
    columns = []
    for name, col in zip(names, batch.columns):
        if isinstance(col.type, pa.JsonType):
            values = [None if v is None else _parse_json_cell(v, path, before + i + 1, name)
                      for i, v in enumerate(col.storage.to_pylist())]
        else:
            values = col.to_pylist()
            convert = _converter(col.type) if _to_convert(col) else None
            if convert is not None:
                values = [None if v is None else convert(v) for v in values]
        columns.append(values)
    for values in zip(*columns):
        yield orjson.dumps({k: v for k, v in zip(names, values) if v is not None})


def _parse_json_cell(text: str, path: str, row: int, name: str) -> Any:
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError as e:
        raise InputError(f"{path}:{row}", f"field {name}: not valid JSON ({e})") from None
