"""Every file and folder name of a run folder, defined here once.

Each upper-case string constant of this module names an entry at the top of the run folder (or, when
listed in ``_INSIDE``, inside one): ``--restart`` deletes every one of them but the lock
(:func:`run_outputs`), so an output declared here is never left behind by a restart.

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

import re
from typing import Any, Iterable, Iterator

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

Key = tuple[str, int]  # a sample: (prompt id, sample_index)


def key_of(row: dict[str, Any]) -> Key:
    """A rollout's or failure record's sample key: ``(str(id), int(sample_index))``."""
    return str(row["id"]), int(row["sample_index"])


def keys_of(columns: dict[str, Any]) -> list[Key]:
    """The sample keys of a batch of columns (``id``, ``sample_index``), as :func:`key_of` gives one row's."""
    return [(str(rid), int(k)) for rid, k in zip(columns["id"], columns["sample_index"])]


def part_name(session: int, part: int, prefix: str = "part") -> str:
    """A part file of rollouts/ or failed/, written by one session (``prefix`` ``rescore``: by a
    session of `sft-ray rescore`, whose numbers are its own)."""
    return f"{prefix}-{session:03d}-{part:05d}.jsonl"


def compact_name(session: int) -> str:
    """failed/'s compacted file, written at the end of a session."""
    return f"part-{session:03d}-compact.jsonl"


# part_name's and compact_name's names: the session number is the first number.
_PART = re.compile(r"(part|rescore)-(\d+)-(?:\d+|compact)\.jsonl")


def part_session(uri: str) -> int | str | None:
    """The session in a rollouts/ or failed/ file's name (:func:`part_name`, :func:`compact_name`):
    a run's session number, or ``"rescore-<n>"`` for the n-th session of the `sft-ray rescore`
    whose rows were swapped in; None for a name no session writes."""
    m = _PART.fullmatch(uri.rsplit("/", 1)[-1])
    if not m:
        return None
    return int(m.group(2)) if m.group(1) == "part" else f"rescore-{int(m.group(2))}"


# run.json's count of the sessions of the `sft-ray rescore` whose files rollouts/ holds.
RESCORED_SESSIONS = "rescored_sessions"


def recorded_sessions(manifest: dict[str, Any] | None) -> frozenset[int | str] | None:
    """The numbers of the sessions run.json records (each session is recorded before it writes a
    part file); None without a manifest or one with no session record at all (every file is then
    taken as the run's)."""
    if manifest is None or "sessions" not in manifest:
        return None
    runs = {int(s.get("session", i)) for i, s in enumerate(manifest.get("sessions") or [])}
    # The files of the last `sft-ray rescore` (its swap replaced rollouts/ whole and recorded them).
    return frozenset(runs | {f"rescore-{n}" for n in range(int(manifest.get(RESCORED_SESSIONS) or 0))})


def written_by(uris: Iterable[str], sessions: frozenset[int | str] | None) -> tuple[list[str], list[str]]:
    """``uris`` split into (files a recorded session wrote, files none did: their name carries
    no session number or one run.json does not record). ``sessions`` None: all are the run's."""
    if sessions is None:
        return list(uris), []
    ours, unknown = [], []
    for uri in uris:
        (ours if part_session(uri) in sessions else unknown).append(uri)
    return ours, unknown


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


# Names of this module that are no run output at the top of the folder: the lock (held by the
# restarting run), a name inside a folder above, a key of run.json.
_NOT_OUTPUTS = ("LOCK", "RESCORE_TARGET", "RESCORED_SESSIONS")


def run_outputs() -> list[str]:
    """What ``--restart`` deletes: every name this module declares (see the module docstring) but
    the lock, in the order declared, run.json last (a restart killed halfway still finds its folder)."""
    names = [v for k, v in globals().items() if k.isupper() and not k.startswith("_") and isinstance(v, str)
             and k not in _NOT_OUTPUTS and v != MANIFEST]
    return [*dict.fromkeys(names), MANIFEST]
