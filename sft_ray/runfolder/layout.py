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
      contaminated.jsonl   CONTAMINATED: prompts held back by decontamination (never sent)
      report.html          REPORT_HTML: the report, rewritten while a run works and at its end (`sft-ray stats --html -` too)
      progress.json        PROGRESS: done, expected, rate, ETA, spend, errors; rewritten while a run works and at its end
      _SUCCESS             SUCCESS: written once every sample of the run is final
"""

from __future__ import annotations

import base64
import binascii
import hashlib
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
CONTAMINATED = "contaminated.jsonl"
REPORT_HTML = "report.html"
PROGRESS = "progress.json"
SUCCESS = "_SUCCESS"

Key = tuple[str, int]  # a sample: (prompt id, sample_index)


def key_of(row: dict[str, Any]) -> Key:
    """A rollout's or failure record's sample key: ``(str(id), int(sample_index))``."""
    return str(row["id"]), int(row["sample_index"])


def keys_of(columns: dict[str, Any]) -> list[Key]:
    """The sample keys of a batch of columns (``id``, ``sample_index``), as :func:`key_of` gives one row's."""
    return [(str(rid), int(k)) for rid, k in zip(columns["id"], columns["sample_index"])]


# ---- a sample key's string and JSON forms ----------------------------------------------------
# Inside the code a sample is its Key tuple. The forms below are the ones that leave the process and
# must stay as they are: they are on disk in old run folders (resumed by newer code) or were sent to
# a provider that answers with them. Each has its encoding and its decoding side by side.


def key_to_json(key: Key) -> list[Any]:
    """A key as JSON: ``[id, sample_index]``. Written in ``batches.jsonl`` (each upload's ``keys``) and
    run.json (``unexpected_keys.keys``); JSON has no tuple, hence a list."""
    return [key[0], key[1]]


def key_from_json(value: Any) -> Key:
    """The key of :func:`key_to_json`'s list (read back from ``batches.jsonl`` and run.json)."""
    rid, k = value
    return str(rid), int(k)


def batch_custom_id(key: Key) -> str:
    """A sample's ``custom_id`` in an OpenAI-style Batch API file: ``<sample_index>:<id>``. The index
    comes first so that any id round-trips (it ends at the first colon). Providers answer with it, and
    a rerun reads the results of batches submitted by an older run: it never changes."""
    return f"{key[1]}:{key[0]}"


def parse_batch_custom_id(value: Any) -> Key | None:
    """The key of a :func:`batch_custom_id`, or None when it is not one of ours."""
    if not isinstance(value, str):
        return None
    k, sep, rid = value.partition(":")
    return (rid, int(k)) if sep and k.isdigit() and len(k) < 10 else None


def anthropic_custom_id(key: Key) -> str:
    """A sample's custom id in Anthropic's Message Batches, which must match ``^[a-zA-Z0-9_-]{1,64}$``
    whatever the row ids are: ``<sample_index>_<id in unpadded base64url>`` when that fits, else
    ``<sample_index>-<hash of the id>`` (not reversible: :func:`parse_anthropic_custom_id` is given the
    hashed ones). Sent to Anthropic and read back from its results, by this run or a rerun."""
    rid, k = key
    encoded = base64.urlsafe_b64encode(rid.encode()).rstrip(b"=").decode()
    cid = f"{k}_{encoded}"
    return cid if len(cid) <= 64 and encoded else f"{k}-{hashlib.blake2b(rid.encode(), digest_size=24).hexdigest()}"


def parse_anthropic_custom_id(cid: Any, hashed: dict[str, Key]) -> Key | None:
    """The key of an :func:`anthropic_custom_id` (``hashed``: the hashed ids this run made, to their
    keys), or None when it is not one of ours."""
    if not isinstance(cid, str):
        return None
    if cid in hashed:
        return hashed[cid]
    k, sep, rest = cid.partition("_")
    if not sep or not k.isdigit() or len(k) >= 10 or not rest:
        return None
    try:
        rid = base64.urlsafe_b64decode(rest + "=" * (-len(rest) % 4)).decode()
    except (binascii.Error, UnicodeDecodeError, ValueError):
        return None
    return (rid, int(k)) if anthropic_custom_id((rid, int(k))) == cid else None


def request_id(key: Key) -> str:
    """A sample's model request id: ``<id>#<sample_index>`` (an agent episode's calls add
    ``.<step>``). The vLLM engine's request id, in its logs and errors; kept for the people who read
    them. Nothing reads it back; :func:`parse_request_id` is its inverse."""
    return f"{key[0]}#{key[1]}"


def parse_request_id(value: str) -> Key | None:
    """The key of a :func:`request_id` (the index follows the last ``#``), or None."""
    rid, sep, k = value.rpartition("#")
    return (rid, int(k)) if sep and k.isdigit() else None


def episode_id(key: Key) -> str:
    """A sample's agent-episode id: ``<id>.<sample_index>``. An environment's session id (NeMo Gym's
    ``rollout_id`` and ``resources_session_id``, seen by its servers); it differs from
    :func:`request_id` because the servers saw this form. :func:`parse_episode_id` is its inverse."""
    return f"{key[0]}.{key[1]}"


def parse_episode_id(value: str) -> Key | None:
    """The key of an :func:`episode_id` (the index follows the last ``.``), or None."""
    rid, sep, k = value.rpartition(".")
    return (rid, int(k)) if sep and k.isdigit() else None


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
