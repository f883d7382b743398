"""The run folder's state across runs: the manifest, what is done, and failures to retry.

A run folder is resumable because everything a rerun needs is on disk: ``run.json``
(the config fingerprint and each run's counts), ``rollouts/`` (samples done) and
``failed/`` (samples that failed, with the number of runs they failed in).
"""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

import orjson

from sft_ray import io
from sft_ray.config import FINGERPRINT_ADDED, RunConfig, canonical_fingerprint, config_fingerprint
from sft_ray.journal import JOURNAL
from sft_ray.stages.finalize import FAILED, ROLLOUTS, iter_jsonl

MANIFEST = "run.json"
SUCCESS = "_SUCCESS"  # written once every sample of the run is final (see sft_ray.driver.Completion)
Key = tuple[str, int]


class DriftError(ValueError):
    """The run folder was made with a config that changes the outputs."""


def _diff(old: Any, new: Any, prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for k in sorted(set(old) | set(new)):
            out += _diff(old.get(k), new.get(k), f"{prefix}{k}.")
        return out
    return [] if old == new else [f"{prefix.rstrip('.')}: {old!r} -> {new!r}"]


def load_manifest(run_dir: str) -> dict[str, Any] | None:
    uri = io.join(run_dir, MANIFEST)
    return orjson.loads(io.read_bytes(uri)) if io.exists(uri) else None


def save_manifest(run_dir: str, manifest: dict[str, Any]) -> None:
    io.write_bytes(io.join(run_dir, MANIFEST), json.dumps(manifest, indent=2).encode())


def run_fingerprint(cfg: RunConfig) -> dict[str, Any]:
    """The config settings that change a run's outputs, plus ``read.limit`` when set (which
    samples the run has; absent when unset, as in folders made before it was part of this)."""
    fp = config_fingerprint(cfg)
    if cfg.read.limit is not None:
        fp["read"] = {"limit": cfg.read.limit}
    return fp


def prepare_run_dir(cfg: RunConfig, restart: bool, input_digests: dict[str, str]) -> dict[str, Any]:
    """Create or reopen the run folder; refuse a resume whose config, ``read.limit`` or input
    content changes the outputs (an edited input would leave stale rollouts in the run, a
    changed limit would leave samples out of, or extra ones in, its completion count)."""
    fingerprint = {**run_fingerprint(cfg), "input_files": input_digests}
    manifest = load_manifest(cfg.output)
    if manifest is not None and restart:
        for sub in (ROLLOUTS, FAILED, JOURNAL, "train", "stats.json", SUCCESS, MANIFEST):
            io.delete(io.join(cfg.output, sub))
        manifest = None
    if manifest is not None:
        old = canonical_fingerprint(dict(manifest.get("fingerprint") or {}))
        old_inputs = old.pop("input_files", {})
        new = run_fingerprint(cfg)
        for section, key in FINGERPRINT_ADDED:  # a folder made before the key was recorded
            if isinstance(old.get(section), dict) and key not in old[section]:
                new[section] = {k: v for k, v in new[section].items() if k != key}
        changes = _diff(old, new)
        for path in sorted(set(old_inputs) | set(input_digests)):
            if path not in input_digests:
                changes.append(f"input file {path}: no longer part of the input")
            elif path not in old_inputs:
                changes.append(f"input file {path}: new")
            elif old_inputs[path] != input_digests[path]:
                changes.append(f"input file {path}: content changed")
        if changes:
            raise DriftError(
                f"{cfg.output} holds a run made with a different configuration:\n  " + "\n  ".join(changes)
                + "\nUse --restart to start over in this folder, or choose another output folder.")
    io.makedirs(cfg.output)
    if manifest is None:
        manifest = {"fingerprint": fingerprint, "sessions": []}
    manifest["config"] = cfg.model_dump(mode="json", by_alias=False)
    return manifest


def done_keys(run_dir: str, passing: Counter[str] | None = None, threshold: float = 0.0,
              repair: bool = False) -> set[tuple[str, int]]:
    """(id, sample_index) of every rollout already written. With ``passing``, also counts per
    prompt id the rollouts whose reward is >= ``threshold``. ``repair``: cut off torn last lines
    (only a run that holds the folder's lock may: a reader such as ``--dry-run`` leaves every
    byte as it is, a line being written by a live run included)."""
    keys: set[tuple[str, int]] = set()
    for uri in io.list_files(io.join(run_dir, ROLLOUTS), ".jsonl"):
        good_bytes, torn = 0, False
        for row, line in iter_jsonl(uri):
            if row is None:
                torn = True
                break
            keys.add((str(row["id"]), int(row["sample_index"])))
            if passing is not None and row.get("reward") is not None and row["reward"] >= threshold:
                passing[str(row["id"])] += 1
            good_bytes += len(line) + 1
        if torn and repair and "://" not in uri:
            # A kill in the middle of a write leaves at most one partial line at the end.
            with open(uri, "r+b") as f:
                f.truncate(good_bytes)
    return keys


def count_failure(row: dict[str, Any], failed_runs: dict[Key, int]) -> bytes:
    """A failed sample's record, with how many runs it has now failed in."""
    key = (str(row["id"]), int(row["sample_index"]))
    row["failed_runs"] = failed_runs.get(key, 0) + 1
    return orjson.dumps(row)


def _failure_records(run_dir: str, done: set[Key]) -> tuple[list[str], int, dict[Key, tuple[int, bytes]]]:
    """failed/'s files, the records they hold, and for each failed sample not done since:
    (runs it failed in, its latest record). Files are read in name order, so a later
    session's record wins."""
    files = io.list_files(io.join(run_dir, FAILED), ".jsonl")
    records = 0
    latest: dict[Key, tuple[int, bytes]] = {}
    for uri in files:
        for row, line in iter_jsonl(uri):
            if row is None:
                continue
            records += 1
            key = (str(row["id"]), int(row["sample_index"]))
            if key in done:  # succeeded in a later run
                continue
            runs = max(int(row.get("failed_runs") or 1), latest.get(key, (0, b""))[0])
            latest[key] = (runs, line)
    return files, records, latest


def load_failures(run_dir: str, done: set[Key]) -> dict[Key, int]:
    """How many runs each failed sample (not done since) has failed in.

    Nothing is deleted here: a record stays in failed/ until its retry is written (as a
    rollout, or as a new record with one more failed run), so a run stopped before it
    retried a sample (a crash, Ctrl-C, the failure budget) loses no failure and no count.
    """
    return {k: runs for k, (runs, _) in _failure_records(run_dir, done)[2].items()}


def compact_failures(run_dir: str, session: int, done: set[Key]) -> None:
    """Rewrite failed/ as one file holding the latest record of each sample still failed.

    Run after a session's writers are closed. The new file is complete before any old one
    is deleted, so a crash in between leaves duplicates (read back by key: most runs and
    latest record win), never a lost failure.
    """
    files, records, latest = _failure_records(run_dir, done)
    if len(files) <= 1 and records == len(latest):
        return  # already at most one file, holding exactly the live records
    name = io.join(run_dir, FAILED, f"part-{session:03d}-compact.jsonl")
    if latest:
        io.write_bytes(name, b"".join(line + b"\n" for _, line in (latest[k] for k in sorted(latest))))
    for uri in files:
        if uri != name:
            io.delete(uri)
