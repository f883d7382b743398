"""The run folder's state across runs: the manifest, what is done, and failures to retry.

A run folder is resumable because everything a rerun needs is on disk: ``run.json``
(the config fingerprint and each run's counts), ``rollouts/`` (samples done) and
``failed/`` (samples that failed, with the number of runs they failed in).
"""

from __future__ import annotations

import json
from typing import Any

import orjson

from sft_ray import io
from sft_ray.config import RunConfig, config_fingerprint
from sft_ray.stages.finalize import FAILED, ROLLOUTS, iter_jsonl

MANIFEST = "run.json"


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


def prepare_run_dir(cfg: RunConfig, restart: bool, input_digests: dict[str, str]) -> dict[str, Any]:
    """Create or reopen the run folder; refuse a resume whose config or input content
    changes the outputs (an edited input would leave stale rollouts in the run)."""
    fingerprint = {**config_fingerprint(cfg), "input_files": input_digests}
    manifest = load_manifest(cfg.output)
    if manifest is not None and restart:
        for sub in (ROLLOUTS, FAILED, "train", "stats.json", MANIFEST):
            io.delete(io.join(cfg.output, sub))
        manifest = None
    if manifest is not None:
        old = dict(manifest.get("fingerprint") or {})
        old_inputs = old.pop("input_files", {})
        changes = _diff(old, config_fingerprint(cfg))
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


def done_keys(run_dir: str) -> set[tuple[str, int]]:
    """(id, sample_index) of every rollout already written; torn last lines are cut off."""
    keys: set[tuple[str, int]] = set()
    for uri in io.list_files(io.join(run_dir, ROLLOUTS), ".jsonl"):
        good_bytes, torn = 0, False
        for row, line in iter_jsonl(uri):
            if row is None:
                torn = True
                break
            keys.add((str(row["id"]), int(row["sample_index"])))
            good_bytes += len(line) + 1
        if torn and "://" not in uri:
            # A kill in the middle of a write leaves at most one partial line at the end.
            with open(uri, "r+b") as f:
                f.truncate(good_bytes)
    return keys


def count_failure(row: dict[str, Any], failed_runs: dict[tuple[str, int], int]) -> bytes:
    """A failed sample's record, with how many runs it has now failed in."""
    key = (str(row["id"]), int(row["sample_index"]))
    row["failed_runs"] = failed_runs.get(key, 0) + 1
    return orjson.dumps(row)


def carry_failures(run_dir: str, done: set[tuple[str, int]], max_attempts: int,
                   session: int) -> tuple[set[tuple[str, int]], dict[tuple[str, int], int]]:
    """Decide which earlier failures a new run retries.

    Returns the keys whose failure is final (failed in ``max_attempts`` runs: not sent
    again) and, for the keys to retry, how many runs they failed in. ``failed/`` is
    rewritten to hold only final failures; retried samples get a new record if they
    fail again. The new file is written before the old ones go, so a crash in between
    leaves duplicates (read back by key, latest wins), never a lost failure.
    """
    folder = io.join(run_dir, FAILED)
    old = io.list_files(folder, ".jsonl")
    latest: dict[tuple[str, int], bytes] = {}
    runs: dict[tuple[str, int], int] = {}
    for uri in old:
        for row, line in iter_jsonl(uri):
            if row is None:
                continue
            key = (str(row["id"]), int(row["sample_index"]))
            if key in done:  # succeeded in a later run
                continue
            latest[key] = line
            runs[key] = max(runs.get(key, 0), int(row.get("failed_runs") or 1))
    final = {k for k, n in runs.items() if n >= max_attempts}
    if old:
        if final:
            io.write_bytes(io.join(folder, f"part-{session:03d}-final.jsonl"),
                           b"".join(latest[k] + b"\n" for k in sorted(final)))
        for uri in old:
            if not uri.endswith(f"part-{session:03d}-final.jsonl"):
                io.delete(uri)
    return final, {k: n for k, n in runs.items() if k not in final}
