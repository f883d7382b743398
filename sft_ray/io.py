"""Paths on local disk or object stores, behind pyarrow's filesystem layer.

One helper resolves ``input`` (a file, a folder or a glob, local or ``s3://``/``gs://``)
to a sorted file list; the others open files for line reading and atomic writes.

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

import fnmatch
import hashlib
import os
from typing import IO, Iterator

import pyarrow.fs as pafs

JSONL_SUFFIXES = (".jsonl", ".json", ".jsonl.gz", ".json.gz")


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


def list_input_files(uri: str) -> list[str]:
    """Files named by ``uri``: itself, the JSONL files below a folder, or a glob's matches."""
    fs, path = filesystem(uri)
    if any(c in path for c in "*?["):
        base = path
        while any(c in base for c in "*?["):
            base = base.rsplit("/", 1)[0]
        infos = fs.get_file_info(pafs.FileSelector(base or "/", recursive=True, allow_not_found=True))
        files = [i.path for i in infos if i.type == pafs.FileType.File and fnmatch.fnmatch(i.path, path)]
    else:
        info = fs.get_file_info(path)
        if info.type == pafs.FileType.NotFound:
            raise FileNotFoundError(f"input not found: {uri}")
        if info.type == pafs.FileType.Directory:
            infos = fs.get_file_info(pafs.FileSelector(path, recursive=True))
            files = [i.path for i in infos if i.type == pafs.FileType.File and i.path.endswith(JSONL_SUFFIXES)]
        else:
            files = [path]
    if not files:
        raise FileNotFoundError(f"no input files match {uri}")
    return [display(fs, f) for f in sorted(files)]


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


def scan_lines(uri: str) -> tuple[int, str]:
    """(non-blank lines, content digest) of a file, in one streamed pass: how many rows a
    run has, and whether the input changed since the run folder was made."""
    digest = hashlib.blake2b(digest_size=16)
    n = 0
    for line in iter_lines(uri):
        if line.strip():
            n += 1
            digest.update(line + b"\n")
    return n, digest.hexdigest()


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


def delete(uri: str) -> None:
    fs, path = filesystem(uri)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.Directory:
        fs.delete_dir(path)
    elif info.type == pafs.FileType.File:
        fs.delete_file(path)
