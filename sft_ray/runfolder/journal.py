"""The generation journal: what a model returned, durable as soon as it returns.

Rollouts reach ``rollouts/`` only once the driver receives their batch, after scoring:
between a model's answer and that write lie the actor's batch, the score stage and the
driver's prefetch, hundreds of samples in a busy pipeline. A ``kill -9`` there used to
send all of them again. So each generation actor also appends every successful, unscored
rollout to its own journal file, ``journal/<actor>.jsonl`` in the run folder, the moment
it has it; a resumed run scores what the journal holds beyond ``rollouts/`` (calling no
model) and writes it, and the session that ends normally deletes the journal.

Local and shared filesystems: one append + flush per rollout (in the OS from then on: a
killed process loses nothing). Object stores have no append: the actor uploads what it
gathered as a new object every ``OBJECT_STORE_FLUSH_S`` seconds, so at most that much
work is generated twice. A run folder on a node's local disk is only seen by actors on
that node: use a shared filesystem or an object store for a multi-node run.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import uuid
from typing import IO, Iterator

import orjson
import pyarrow.fs as pafs

from sft_ray import io
from sft_ray.runfolder.layout import JOURNAL, key_of

log = logging.getLogger(__name__)

OBJECT_STORE_FLUSH_S = 10.0


class JournalSpec:
    """Where actors journal: the run folder, with its filesystem resolved on the driver (so
    actors on any node use the endpoint and region the driver saw). Picklable; ``open()``
    in the actor."""

    def __init__(self, run_dir: str) -> None:
        self.run_dir = run_dir
        self.fs = io.filesystem(run_dir)[0]

    def open(self, actor_id: str | None = None) -> "Journal":
        return Journal(self.run_dir, actor_id, self.fs)


class Journal:
    """One actor's append-only journal. ``append`` takes one JSON line (bytes, no newline).

    The journal only saves work: when it cannot be written, generation goes on without it
    (a warning is logged once)."""

    def __init__(self, run_dir: str, actor_id: str | None = None, fs: pafs.FileSystem | None = None) -> None:
        self.actor_id = actor_id or f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.fs, self.folder = io.filesystem(io.join(run_dir, JOURNAL), fs)
        self.local = isinstance(self.fs, pafs.LocalFileSystem)
        self.lock = threading.Lock()
        self.fh: IO[bytes] | None = None
        self.buffer: list[bytes] = []
        self.chunk = 0
        self.flushed_at = time.monotonic()
        self.closed = False
        self.broken = False
        if self.local:
            try:
                os.makedirs(self.folder, exist_ok=True)
                self.fh = open(os.path.join(self.folder, f"{self.actor_id}.jsonl"), "ab")
            except OSError as e:
                self._broke(e)
        else:  # upload on time even when no rollout arrives
            threading.Thread(target=self._flush_when_due, name="sft-ray-journal", daemon=True).start()

    def _broke(self, err: Exception) -> None:
        if not self.broken:
            log.warning("generation journal unavailable (%s); a crash would re-send what is in flight", err)
        self.broken = True

    def _flush_when_due(self) -> None:
        while not self.closed:
            time.sleep(1.0)
            with self.lock:
                if time.monotonic() - self.flushed_at >= OBJECT_STORE_FLUSH_S:
                    self._upload()

    def append(self, line: bytes) -> None:
        with self.lock:
            if self.broken:
                return
            if self.fh is not None:
                try:
                    self.fh.write(line + b"\n")
                    self.fh.flush()  # in the OS from here on: a killed process loses nothing written
                except OSError as e:
                    self._broke(e)
                return
            self.buffer.append(line + b"\n")
            if time.monotonic() - self.flushed_at >= OBJECT_STORE_FLUSH_S:
                self._upload()

    def _upload(self) -> None:
        if self.buffer:
            try:
                with self.fs.open_output_stream(f"{self.folder}/{self.actor_id}-{self.chunk:06d}.jsonl") as f:
                    f.write(b"".join(self.buffer))
            except OSError as e:
                self._broke(e)
            self.buffer, self.chunk = [], self.chunk + 1
        self.flushed_at = time.monotonic()

    def close(self) -> None:
        with self.lock:
            self.closed = True
            if self.fh is not None:
                self.fh.close()
                self.fh = None
            elif not self.local:
                self._upload()


def read_journal(run_dir: str, skip: set[tuple[str, int]]) -> Iterator[dict]:
    """The journaled rollouts whose ``(id, sample_index)`` is not in ``skip``, each once
    (a torn last line, from a kill in mid-append, is ignored)."""
    seen: set[tuple[str, int]] = set()
    for uri in io.list_files(io.join(run_dir, JOURNAL), ".jsonl"):
        for line in io.iter_lines(uri):
            try:
                row = orjson.loads(line)
                key = key_of(row)
            except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
                continue
            if key in skip or key in seen:
                continue
            seen.add(key)
            yield row


def clear_journal(run_dir: str) -> None:
    """Delete the journal (once everything in it is in rollouts/)."""
    io.delete(io.join(run_dir, JOURNAL))
