"""The part writers: the driver appends scored rollouts to the run folder as they arrive.

The driver is the single writer: rows stream to it from the actors, and each
block is appended and flushed before the next is asked for (and fsync'd at most
once a second), so a crash loses at most the rows in flight, never a written
row, and no two processes ever write one file. Each run session writes new part files
(``part-<session>-<n>.jsonl``), so a resumed run never rewrites what an
earlier session wrote. On object stores a part is uploaded whole when it is
closed: every ``part_rows`` rows, ``part_bytes`` bytes, or ``part_seconds``
seconds (60 s by default there), the last by a timer thread, so rows do not sit
in memory while no batch arrives (an autoscaler waiting for GPUs). A hard kill of
the driver loses at most that much work, which a rerun regenerates.
"""

from __future__ import annotations

import os
import threading
import time
from typing import IO

import orjson
import pyarrow.fs as pafs

from sft_ray import io
from sft_ray.rows import InputError
from sft_ray.runfolder.layout import FAILED, ROLLOUTS, Key, part_name
from sft_ray.runfolder.state import FolderState, count_failure


class PartWriter:
    """Appends JSON lines to rotating part files in one folder."""

    def __init__(self, folder: str, session: int, part_rows: int = 100_000, part_seconds: float | None = None,
                 part_bytes: int = 64 << 20, prefix: str = "part") -> None:
        self.folder = folder
        self.prefix = prefix
        self.part_bytes = part_bytes
        self.session = session
        self.part_rows = part_rows
        self.local = isinstance(io.filesystem(folder)[0], pafs.LocalFileSystem)
        # Local parts are written through per block, so rotating them is only about file size;
        # object-store parts exist only once uploaded, so they are closed more often.
        self.part_seconds = part_seconds if part_seconds is not None else (300.0 if self.local else 60.0)
        self.part = 0
        self.rows_in_part = 0
        self.opened_at = 0.0
        self.fh: IO[bytes] | None = None
        self.buffer: list[bytes] = []
        self.buffered = 0
        self.rows = 0
        self.fsync_every_s = 1.0
        self.synced_at = 0.0
        io.makedirs(folder)
        # write() runs on the driver's loop, the flush timer on its own thread.
        self.lock = threading.Lock()
        self.closed = threading.Event()
        self.timer: threading.Thread | None = None
        if not self.local:
            self.timer = threading.Thread(target=self._flush_when_due, name="sft-ray-part-timer", daemon=True)
            self.timer.start()

    def _flush_when_due(self) -> None:
        while not self.closed.wait(min(1.0, self.part_seconds / 4)):
            with self.lock:
                if self.rows_in_part and time.monotonic() - self.opened_at >= self.part_seconds:
                    self._close_part()

    def _name(self) -> str:
        return io.join(self.folder, part_name(self.session, self.part, self.prefix))

    def write(self, lines: list[bytes]) -> None:
        if not lines:
            return
        with self.lock:
            self._write(lines)

    def _write(self, lines: list[bytes]) -> None:
        if self.rows_in_part == 0:
            self.opened_at = time.monotonic()
            if self.local:
                self.fh = io.open_append(self._name())
        data = b"".join(line + b"\n" for line in lines)
        if self.local:
            assert self.fh is not None
            self.fh.write(data)
            self.fh.flush()  # in the OS from here on: a killed process loses nothing written
            now = time.monotonic()
            if now - self.synced_at >= self.fsync_every_s:
                # fsync only guards against the machine itself going down; once a second
                # bounds that loss without a disk round trip per block.
                os.fsync(self.fh.fileno())
                self.synced_at = now
        else:
            self.buffer.append(data)
            self.buffered += len(data)
        self.rows_in_part += len(lines)
        self.rows += len(lines)
        if (self.rows_in_part >= self.part_rows or self.buffered >= self.part_bytes
                or time.monotonic() - self.opened_at >= self.part_seconds):
            self._close_part()

    def _close_part(self) -> None:
        if self.rows_in_part == 0:
            return
        if self.local:
            assert self.fh is not None
            self.fh.flush()
            os.fsync(self.fh.fileno())
            self.fh.close()
            self.fh = None
        else:
            io.write_bytes(self._name(), b"".join(self.buffer))
            self.buffer, self.buffered = [], 0
        self.part += 1
        self.rows_in_part = 0

    def close(self) -> None:
        self.closed.set()
        if self.timer is not None:
            self.timer.join()
        with self.lock:
            self._close_part()


class Writers:
    """rollouts/ and failed/ part writers for one session. A failure record carries the runs
    it failed in; ``state`` follows what is written, so it stays the folder's state."""

    def __init__(self, run_dir: str, session: int, state: FolderState, skip_bad_input: bool = False) -> None:
        self.skip_bad_input = skip_bad_input  # read.skip_bad_lines: a bad_input row is a counted failure
        self.ok = PartWriter(io.join(run_dir, ROLLOUTS), session)
        self.bad = PartWriter(io.join(run_dir, FAILED), session)
        self.state = state

    def write(self, keys: list[Key], lines: list[str], failed: list[bool],
              rewards: list[float | None] | None = None) -> tuple[int, int]:
        """Write one scored batch; raises :class:`InputError` for a bad input row (a malformed line the
        read stage marked, or a row whose tools its episode found bad), unless ``skip_bad_input``: then
        it is written to failed/ and counted (bad lines the read stage skips never get here)."""
        oks = [s.encode() for s, f in zip(lines, failed) if not f]
        bad_rows = [orjson.loads(s) for s, f in zip(lines, failed) if f]
        self.ok.write(oks)
        for row in bad_rows:
            if (row.get("error") or {}).get("type") == "bad_input" and not self.skip_bad_input:
                source, _, reason = row["error"]["message"].partition(": ")
                raise InputError(source, reason)
        runs = self.state.failed_sessions
        self.bad.write([count_failure(row, runs) for row in bad_rows])
        threshold = self.state.pass_threshold
        for i, (key, f) in enumerate(zip(keys, failed)):
            if f:
                runs[key] = runs.get(key, 0) + 1
            else:
                self.state.done.add(key)
                runs.pop(key, None)
                reward = rewards[i] if rewards is not None else None
                if threshold is not None and reward is not None and reward >= threshold:
                    self.state.passing[key[0]] += 1
        return len(oks), len(bad_rows)

    def close(self) -> None:
        self.ok.close()
        self.bad.close()
