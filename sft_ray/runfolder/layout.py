"""Every file and folder name of a run folder, defined here once.

::

    <output>/
      run.json             MANIFEST: the config fingerprint, the config, each session's record
      run.lock             LOCK: the lease of the one process that runs in the folder
      rollouts/            ROLLOUTS: every scored sample (part-<session>-<n>.jsonl), append-only
      failed/              FAILED: failed samples with the runs they failed in (retried by a rerun)
      journal/             JOURNAL: unscored rollouts as actors get them (<actor>.jsonl); gone after a clean session
      batches.jsonl        BATCHES: with model.batch.enabled, every Batch API file and batch (upload, submit, collect)
      rescore/             RESCORE: `sft-ray rescore`'s journal (target.json, rollouts/, failed/); gone once swapped in
      train/               TRAIN: the shuffled training shards (part-00000.<jsonl|parquet>, ...)
      validation/          VALIDATION: the validation shards, when train.validation_fraction > 0
      README.md            DATASET_CARD: the Hugging Face dataset card of train/ (and validation/)
      stats.json           STATS: the report as data
      never_passed.jsonl   NEVER_PASSED: rejection sampling's prompts that never passed
      report.html          REPORT_HTML: `sft-ray stats --html -` writes it here
      _SUCCESS             SUCCESS: written once every sample of the run is final
"""

from __future__ import annotations

from typing import Any, Iterator

import orjson

from sft_ray import io

MANIFEST = "run.json"
LOCK = "run.lock"
ROLLOUTS = "rollouts"
FAILED = "failed"
JOURNAL = "journal"
BATCHES = "batches.jsonl"
RESCORE = "rescore"
RESCORE_TARGET = "target.json"  # in rescore/: the verifier being applied, the state, the sessions so far
TRAIN = "train"
VALIDATION = "validation"
DATASET_CARD = "README.md"
STATS = "stats.json"
NEVER_PASSED = "never_passed.jsonl"
REPORT_HTML = "report.html"
SUCCESS = "_SUCCESS"
# What `--restart` deletes: everything a run wrote (the lock is held by the restarting run).
RUN_OUTPUTS = (ROLLOUTS, FAILED, JOURNAL, BATCHES, RESCORE, TRAIN, STATS, SUCCESS, MANIFEST)

Key = tuple[str, int]  # a sample: (prompt id, sample_index)


def part_name(session: int, part: int, prefix: str = "part") -> str:
    """A part file of rollouts/ or failed/, written by one session (``prefix`` ``rescore``: by a
    session of `sft-ray rescore`, whose numbers are its own)."""
    return f"{prefix}-{session:03d}-{part:05d}.jsonl"


def compact_name(session: int) -> str:
    """failed/'s compacted file, written at the end of a session."""
    return f"part-{session:03d}-compact.jsonl"


def shard_name(index: int, file_format: str) -> str:
    """A training shard of train/ or validation/."""
    return f"part-{index:05d}.{file_format}"


def iter_jsonl(uri: str, start: int = 0, end: int | None = None) -> Iterator[tuple[dict[str, Any] | None, bytes]]:
    """(row, line) for each line of a rollouts/ or failed/ file (or of its byte range ``[start, end)``);
    row is None for a torn line."""
    for line in io.iter_range(uri, start, end):
        if not line.strip():
            continue
        try:
            yield orjson.loads(line), line
        except orjson.JSONDecodeError:
            yield None, line
