"""What a run folder holds: the samples done, the failures to retry, and per prompt where
rejection sampling stands, all read from disk.

A run folder is resumable because everything a rerun needs is on disk: ``rollouts/``
(samples done) and ``failed/`` (samples that failed, with the number of runs they failed
in); the journal holds what a killed run had generated but not yet written
(:mod:`sft_ray.runfolder.journal`). Only files that a session recorded in run.json wrote
count (:func:`~sft_ray.runfolder.layout.written_by`): a line some other process put in a file
of its own (``rollouts/part-900-00000.jsonl``) never makes a sample done, and finalize never
trains on it.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import orjson

from sft_ray import io
from sft_ray.runfolder.layout import FAILED, ROLLOUTS, Key, compact_name, iter_jsonl, key_of, written_by


class FolderState:
    """What the run folder says about each sample: done (a rollout), or failed in N runs."""

    def __init__(self, run_dir: str, max_attempts: int, pass_threshold: float | None = None,
                 sessions: frozenset[int] | None = None) -> None:
        # The sessions run.json records: files of no other session are not read (None: all are).
        self.sessions = sessions
        # With rejection sampling, the passing samples of each prompt (reward >= pass_threshold).
        self.pass_threshold = pass_threshold
        self.passing: Counter[str] = Counter()
        # Made by a run that holds the folder's lock: it may cut a torn last line (a killed run's).
        self.done: set[Key] = done_keys(run_dir, self.passing if pass_threshold is not None else None,
                                        pass_threshold or 0.0, repair=True, sessions=sessions)
        # How many sessions each failed sample failed in (its failure record's `failed_runs` field).
        self.failed_sessions: dict[Key, int] = load_failures(run_dir, self.done, sessions)
        self.max_attempts = max_attempts

    def skip(self) -> set[Key]:
        """Keys the read stage leaves out: done, or failed in ``max_attempts`` sessions."""
        return self.done | {k for k, n in self.failed_sessions.items() if n >= self.max_attempts}


def done_keys(run_dir: str, passing: Counter[str] | None = None, threshold: float = 0.0,
              repair: bool = False, sessions: frozenset[int] | None = None) -> set[tuple[str, int]]:
    """(id, sample_index) of every rollout already written. With ``passing``, also counts per
    prompt id the rollouts whose reward is >= ``threshold``. ``repair``: cut off torn last lines
    (only a run that holds the folder's lock may: a reader such as ``--dry-run`` leaves every
    byte as it is, a line being written by a live run included). ``sessions``: read only the files
    these sessions wrote (None: every file)."""
    keys: set[tuple[str, int]] = set()
    for uri in written_by(io.list_files(io.join(run_dir, ROLLOUTS), ".jsonl"), sessions)[0]:
        good_bytes, torn = 0, False
        for row, line in iter_jsonl(uri):
            if row is None:
                torn = True
                break
            keys.add(key_of(row))
            if passing is not None and row.get("reward") is not None and row["reward"] >= threshold:
                passing[str(row["id"])] += 1
            good_bytes += len(line) + 1
        if torn and repair and "://" not in uri:
            # A kill in the middle of a write leaves at most one partial line at the end.
            with open(uri, "r+b") as f:
                f.truncate(good_bytes)
    return keys


def count_failure(row: dict[str, Any], failed_sessions: dict[Key, int]) -> bytes:
    """A failed sample's record, with how many sessions it has now failed in (``failed_runs``)."""
    key = key_of(row)
    row["failed_runs"] = failed_sessions.get(key, 0) + 1
    return orjson.dumps(row)


def _failure_records(run_dir: str, done: set[Key], sessions: frozenset[int] | None = None
                     ) -> tuple[list[str], int, dict[Key, tuple[int, bytes]]]:
    """failed/'s files (those ``sessions`` wrote), the records they hold, and for each failed
    sample not done since: (runs it failed in, its latest record). Files are read in name order,
    so a later session's record wins."""
    files = written_by(io.list_files(io.join(run_dir, FAILED), ".jsonl"), sessions)[0]
    records = 0
    latest: dict[Key, tuple[int, bytes]] = {}
    for uri in files:
        for row, line in iter_jsonl(uri):
            if row is None:
                continue
            records += 1
            key = key_of(row)
            if key in done:  # succeeded in a later run
                continue
            runs = max(int(row.get("failed_runs") or 1), latest.get(key, (0, b""))[0])
            latest[key] = (runs, line)
    return files, records, latest


def load_failures(run_dir: str, done: set[Key], sessions: frozenset[int] | None = None) -> dict[Key, int]:
    """How many runs each failed sample (not done since) has failed in.

    Nothing is deleted here: a record stays in failed/ until its retry is written (as a
    rollout, or as a new record with one more failed run), so a run stopped before it
    retried a sample (a crash, Ctrl-C, the failure budget) loses no failure and no count.
    """
    return {k: runs for k, (runs, _) in _failure_records(run_dir, done, sessions)[2].items()}


def compact_failures(run_dir: str, session: int, done: set[Key], sessions: frozenset[int] | None = None) -> None:
    """Rewrite failed/ as one file holding the latest record of each sample still failed.

    Run after a session's writers are closed. The new file is complete before any old one
    is deleted, so a crash in between leaves duplicates (read back by key: most runs and
    latest record win), never a lost failure. Files of no session in ``sessions`` are left as
    they are (and still ignored).
    """
    files, records, latest = _failure_records(run_dir, done, sessions)
    if len(files) <= 1 and records == len(latest):
        return  # already at most one file, holding exactly the live records
    name = io.join(run_dir, FAILED, compact_name(session))
    if latest:
        io.write_bytes(name, b"".join(line + b"\n" for _, line in (latest[k] for k in sorted(latest))))
    for uri in files:
        if uri != name:
            io.delete(uri)
