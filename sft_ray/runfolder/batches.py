"""``batches.jsonl``: the Batch API's record of a run folder, so that nothing is submitted twice.

One JSON line per event, appended and fsync'd before the driver goes on (on object stores the
whole file is rewritten; it is small):

- ``{"event": "upload", "n", "file_id", "keys": [[id, sample_index], ...], "bytes", "round", "at"}``:
  an input file was uploaded, recorded before any batch is created from it, so that a kill between
  upload and submit submits that same file, never a second copy of its samples;
- ``{"event": "submit", "n", "batch_id", "at"}``: the batch made from upload ``n`` exists at the
  provider, recorded before the driver waits on it; a rerun polls it again;
- ``{"event": "collected", "n", "status", "request_counts", "at"}``: its results are written to
  ``rollouts/`` and ``failed/``: done with it.

A batch is *open* from its upload until it is collected; the samples of open batches are not sent
again. A torn last line (a kill in the middle of a write) is cut off when the file is read.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Any

import orjson

from sft_ray import io
from sft_ray.runfolder.layout import BATCHES, Key, key_from_json, key_to_json


@dataclass
class BatchEntry:
    """One batch as the record holds it."""

    n: int
    file_id: str
    keys: list[Key]
    bytes: int = 0
    round: int = 0
    uploaded_at: float = 0.0
    batch_id: str | None = None
    submitted_at: float | None = None
    status: str | None = None  # the final status, once collected
    request_counts: dict[str, int] = field(default_factory=dict)

    @property
    def collected(self) -> bool:
        return self.status is not None


class BatchLog:
    """The run folder's batches, read once and appended to as the driver goes."""

    def __init__(self, run_dir: str) -> None:
        self.uri = io.join(run_dir, BATCHES)
        self.local = "://" not in self.uri
        self.entries: dict[int, BatchEntry] = {}
        self.lines: list[bytes] = []
        if io.exists(self.uri):
            self._load()

    def _load(self) -> None:
        data = io.read_bytes(self.uri)
        good = 0
        for line in data.split(b"\n"):
            if not line.strip():
                good += len(line) + 1
                continue
            try:
                rec = orjson.loads(line)
            except orjson.JSONDecodeError:
                break  # a torn last line: cut off below
            self._apply(rec)
            self.lines.append(line)
            good += len(line) + 1
        if self.local and good < len(data):
            with open(self.uri, "r+b") as f:
                f.truncate(good)
        elif self.local and data and not data.endswith(b"\n"):  # a whole last line that lost its newline
            with io.open_append(self.uri) as f:
                f.write(b"\n")

    def _apply(self, rec: dict[str, Any]) -> None:
        n = int(rec["n"])
        if rec["event"] == "upload":
            self.entries[n] = BatchEntry(n, rec["file_id"], [key_from_json(k) for k in rec["keys"]],
                                         int(rec.get("bytes") or 0), int(rec.get("round") or 0), rec.get("at") or 0.0)
        elif rec["event"] == "submit":
            self.entries[n].batch_id, self.entries[n].submitted_at = rec["batch_id"], rec.get("at")
        elif rec["event"] == "collected":
            self.entries[n].status = rec["status"]
            self.entries[n].request_counts = rec.get("request_counts") or {}

    def _append(self, rec: dict[str, Any]) -> None:
        line = orjson.dumps(rec)
        if self.local:
            with io.open_append(self.uri) as f:
                f.write(line + b"\n")
                f.flush()
                os.fsync(f.fileno())  # on disk before the driver submits, or waits on, what it records
        else:
            io.write_bytes(self.uri, b"".join(x + b"\n" for x in [*self.lines, line]))
        self.lines.append(line)
        self._apply(rec)

    def uploaded(self, file_id: str, keys: list[Key], nbytes: int, round_no: int = 0) -> BatchEntry:
        n = max(self.entries, default=-1) + 1
        self._append({"event": "upload", "n": n, "file_id": file_id, "keys": [key_to_json(k) for k in keys],
                      "bytes": nbytes, "round": round_no, "at": time.time()})
        return self.entries[n]

    def submitted(self, entry: BatchEntry, batch_id: str) -> None:
        self._append({"event": "submit", "n": entry.n, "batch_id": batch_id, "at": time.time()})

    def collected(self, entry: BatchEntry, status: str, request_counts: dict[str, int]) -> None:
        self._append({"event": "collected", "n": entry.n, "status": status, "request_counts": request_counts,
                      "at": time.time()})

    def open(self) -> list[BatchEntry]:
        """Batches uploaded and not collected, oldest first."""
        return [e for _, e in sorted(self.entries.items()) if not e.collected]

    def in_flight_keys(self) -> set[Key]:
        return {k for e in self.open() for k in e.keys}
