"""Paths on local disk or object stores, behind pyarrow's filesystem layer.

These helpers resolve paths and URIs, match globs, and open files for line reading and atomic
writes (:mod:`sft_ray.tabular` lists and reads the files of an ``input``).

Object stores are configured the standard way, from the environment of the process
that resolves the URI (pyarrow 26's ``FileSystem.from_uri`` reads these itself):

- ``s3://``: credentials from ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``
  (``AWS_SESSION_TOKEN``), ``~/.aws``, or the node's instance role; the region from
  ``AWS_REGION``/``AWS_DEFAULT_REGION`` or the bucket itself; an S3-compatible
  endpoint (MinIO, Ceph, a local moto server) from ``AWS_ENDPOINT_URL_S3`` or
  ``AWS_ENDPOINT_URL``, e.g. ``http://127.0.0.1:9000``.
- ``gs://``: Google's application default credentials. Only URI handling
  (``gs://bucket/key`` <-> pyarrow's GcsFileSystem) is tested here, there being
  no GCS emulator in the test setup; reads and writes go through the same
  pyarrow calls as S3.

The driver resolves a filesystem once and hands the object to Ray read tasks
(:func:`filesystem` with ``fs``), so the endpoint and region the driver saw
apply on every node; credentials are not pickled with it, each node supplies
its own (instance role, or the same environment variables).
"""

from __future__ import annotations

import os
import re
from typing import IO, Iterator

import pyarrow.fs as pafs


def filesystem(uri: str, fs: pafs.FileSystem | None = None) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it) for a local path or a URI pyarrow understands.

    With ``fs`` (resolved earlier, e.g. on the driver), only the path is derived.
    """
    if fs is not None:
        if "://" not in uri:
            return fs, os.path.abspath(uri)
        # What from_uri gives: no scheme, no query, no trailing slash ("bucket/key").
        return fs, uri.split("://", 1)[1].split("?", 1)[0].rstrip("/")
    if "://" in uri:
        return pafs.FileSystem.from_uri(uri)
    return pafs.LocalFileSystem(), os.path.abspath(uri)


def display(fs: pafs.FileSystem, path: str) -> str:
    """The path as the user would write it (with its scheme for object stores)."""
    scheme = {"s3": "s3://", "gcs": "gs://"}.get(fs.type_name, "")
    return scheme + path


def glob_regex(pattern: str) -> re.Pattern[str]:
    """A shell glob as a regex: ``*``, ``?`` and ``[...]`` stay within one path component,
    a whole ``**`` component matches any number of folders (zero included).

    Hand-written because fnmatch lets ``*`` cross ``/`` and glob.translate (which does
    this) arrives only in Python 3.13; pyarrow has no glob matcher of its own.
    """
    out = []
    parts = pattern.split("/")
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if part == "**":
            out.append(".*" if last else "(?:[^/]*/)*")
            continue
        j = 0
        while j < len(part):
            c = part[j]
            if c == "*":
                out.append("[^/]*")
            elif c == "?":
                out.append("[^/]")
            elif c == "[" and "]" in part[j + 2:]:  # a set; a "]" right after "[" is part of it
                end = part.index("]", j + 2)
                body = part[j + 1:end]
                body = "^" + body[1:] if body.startswith("!") else body
                out.append(f"[{body.replace(chr(92), chr(92) * 2)}]")
                j = end
            else:
                out.append(re.escape(c))
            j += 1
        if not last:
            out.append("/")
    return re.compile("".join(out))


def iter_lines(uri: str, fs: pafs.FileSystem | None = None) -> Iterator[bytes]:
    """The lines of a (possibly gzipped) file, without their line ends, streamed."""
    fs, path = filesystem(uri, fs)
    compression = "gzip" if path.endswith(".gz") else None
    with fs.open_input_stream(path, compression=compression) as f:
        tail = b""
        while chunk := f.read(1 << 20):
            lines = (tail + chunk).split(b"\n")
            tail = lines.pop()
            for line in lines:
                yield line.rstrip(b"\r")
        if tail:
            yield tail.rstrip(b"\r")


def iter_range(uri: str, start: int = 0, end: int | None = None) -> Iterator[bytes]:
    """The lines of a file that start at a byte offset in ``[start, end)``, without their line ends.

    Splitting a file at arbitrary offsets into ranges and reading each with this function yields
    every line exactly once (a line crossing a boundary belongs to the range it starts in), so a
    large file can be read by several processes at once. Gzipped files are read whole (``start``
    must be 0).
    """
    fs, path = filesystem(uri)
    if path.endswith(".gz"):
        if start:
            raise ValueError(f"{uri}: a gzipped file cannot be read from an offset")
        yield from iter_lines(uri, fs)
        return
    if isinstance(fs, pafs.LocalFileSystem):
        # Python's own line reader: several times cheaper per line than splitting chunks here.
        with open(path, "rb", buffering=1 << 20) as lf:  # large reads: half the cost per line of 8 KB ones
            pos = 0
            if start:
                lf.seek(start - 1)  # the bytes up to the first line end finish the previous range's line
                pos = start - 1 + len(lf.readline())
            for line in lf:
                if end is not None and pos >= end:
                    return
                pos += len(line)
                yield line.rstrip(b"\r\n")
        return
    with fs.open_input_file(path) as f:
        # Read from one byte early: the bytes up to the first line end finish a line that started
        # before ``start`` (an empty one when that byte is itself a line end).
        skip = start > 0
        line_start = start - 1 if skip else 0
        f.seek(line_start)
        tail = b""
        while chunk := f.read(1 << 20):
            lines = (tail + chunk).split(b"\n")
            tail = lines.pop()
            for line in lines:
                if skip:
                    skip = False
                elif end is not None and line_start >= end:
                    return
                else:
                    yield line.rstrip(b"\r")
                line_start += len(line) + 1
        if tail and not skip and (end is None or line_start < end):
            yield tail.rstrip(b"\r")


def join(base: str, *parts: str) -> str:
    """Join path parts with '/', for local paths and URIs alike."""
    return "/".join([base.rstrip("/"), *parts])


def makedirs(uri: str) -> None:
    fs, path = filesystem(uri)
    fs.create_dir(path, recursive=True)


def exists(uri: str) -> bool:
    fs, path = filesystem(uri)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def list_files(uri: str, suffix: str = "") -> list[str]:
    """Files directly in a folder (sorted), or [] if it does not exist."""
    fs, path = filesystem(uri)
    infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    return sorted(display(fs, i.path) for i in infos if i.type == pafs.FileType.File and i.path.endswith(suffix))


def size(uri: str) -> int:
    """Bytes in a file (0 if unknown)."""
    fs, path = filesystem(uri)
    return fs.get_file_info(path).size or 0


def read_bytes(uri: str) -> bytes:
    fs, path = filesystem(uri)
    with fs.open_input_stream(path) as f:
        return f.read()


def write_bytes(uri: str, data: bytes) -> None:
    """Write a whole file so that readers never see half of it.

    Local files go through a temporary name and an atomic rename; object stores
    make an object visible only once its upload completes.
    """
    fs, path = filesystem(uri)
    if isinstance(fs, pafs.LocalFileSystem):
        tmp = f"{path}.tmp-{os.getpid()}"
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    else:
        with fs.open_output_stream(path) as f:
            f.write(data)


def open_append(uri: str) -> IO[bytes]:
    """A local file opened for appending (rollouts are appended as they arrive)."""
    fs, path = filesystem(uri)
    if not isinstance(fs, pafs.LocalFileSystem):
        raise ValueError("appending is only for local files")
    return open(path, "ab")


def replace_dir(src: str, dst: str) -> None:
    """Put folder ``src`` in the place of folder ``dst`` (which may not exist).

    Local: two renames (``dst`` aside, ``src`` in), so ``dst`` is always either the old
    folder or the new one, whole. Object stores have no rename: each object is copied on
    the server side, then what the new folder lacks is deleted; a crash in between leaves a
    mix, which is why callers write their summary (stats.json) only after this returns.
    """
    fs, src_path = filesystem(src)
    _, dst_path = filesystem(dst)
    if isinstance(fs, pafs.LocalFileSystem):
        old = f"{dst_path}.old-{os.getpid()}"
        if os.path.exists(dst_path):
            os.rename(dst_path, old)
        os.rename(src_path, dst_path)
        if os.path.exists(old):
            fs.delete_dir(old)
        return
    new = {i.path[len(src_path) + 1:] for i in fs.get_file_info(pafs.FileSelector(src_path, recursive=True))
           if i.type == pafs.FileType.File}
    fs.create_dir(dst_path, recursive=True)
    for name in sorted(new):
        fs.copy_file(f"{src_path}/{name}", f"{dst_path}/{name}")
    for i in fs.get_file_info(pafs.FileSelector(dst_path, recursive=True, allow_not_found=True)):
        if i.type == pafs.FileType.File and i.path[len(dst_path) + 1:] not in new:
            fs.delete_file(i.path)
    fs.delete_dir(src_path)


def delete(uri: str) -> None:
    fs, path = filesystem(uri)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.Directory:
        fs.delete_dir(path)
    elif info.type == pafs.FileType.File:
        fs.delete_file(path)
