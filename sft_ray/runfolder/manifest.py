"""The run folder's manifest (``run.json``) and its fingerprint.

The fingerprint is every setting that changes what a run produces (the config's, plus
``read.limit``, ``read.rename`` and a digest of each input file: of its rows' JSON text, see
:mod:`sft_ray.tabular`): a rerun in the same folder resumes only when
its fingerprint matches the one in ``run.json``; otherwise it is refused (or, with
``--restart``, the folder is emptied first). ``run.json`` also keeps the config as given and
each session's record.

:class:`Manifest` is run.json as a type: its fields and the changes made to it, each a method
(a session opened, the completion, the unexpected keys, a rescore's swap); :class:`SessionRecord` is
one session's record, and :class:`StopReason` why a session stopped early. Both stay ``dict``
subclasses, so run.json is written exactly as before and code that reads it as data still can.
"""

from __future__ import annotations

import json
import os
import time
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson

from sft_ray import io
from sft_ray.runfolder.completion import Completion, FailureBudget
from sft_ray.runfolder.layout import MANIFEST, RESCORE, RESCORE_TARGET, RESCORED_SESSIONS, Key, key_to_json, run_outputs

if TYPE_CHECKING:  # the config models are the driver's: an actor's start never imports them (~0.4 s of CPU)
    from sft_ray.config import RunConfig

# Keys that change how a run works, not what it produces: left out of the fingerprint, so a
# rerun may change them (e.g. more scoring concurrency, a longer judge timeout).
# `omit_params` fixes requests a server refuses (as `model.max_tokens_field` does for the generation model,
# whose fingerprint names its keys one by one); `pricing` changes the reported cost only.
_OPERATIONAL = {"concurrency", "workers", "timeout_s", "connect_timeout_s", "max_retries", "base_retry_wait_s",
                "max_retry_wait_s", "api_key_env", "extra_headers", "extra_headers_env", "max_output_bytes",
                "timeout_per_1k_output_tokens_s", "omit_params", "pricing", "sandbox"}


def _verifier_fingerprint(data: Any) -> Any:
    if isinstance(data, dict):
        return {k: _verifier_fingerprint(v) for k, v in data.items() if k not in _OPERATIONAL}
    if isinstance(data, list):
        return [_verifier_fingerprint(v) for v in data]
    return data


def _canonical_path(path: str) -> str:
    """A local path made absolute and normal (`./in`, `in` and `in/` name one input); URIs as given."""
    if "://" in path:
        return path
    return os.path.abspath(os.path.expanduser(path))


def _canonical_module(spec: Any) -> Any:
    """A plugin spec (`path/to/file.py[:attr]`, `package.module[:attr]`) with its file path made
    absolute as :func:`sft_ray.plugins.load_module` resolves it; import names as given."""
    if not isinstance(spec, str):
        return spec
    module, sep, attr = spec.rpartition(":") if ":" in spec else (spec, "", "")
    if module.endswith(".py") or "/" in module:
        module = str(Path(module).expanduser().resolve())
    return module + sep + attr


def _canonical_plugins(data: Any) -> Any:
    if isinstance(data, dict):
        return {k: _canonical_module(v) if k in ("function", "module") else _canonical_plugins(v)
                for k, v in data.items()}
    if isinstance(data, list):
        return [_canonical_plugins(v) for v in data]
    return data


def canonical_fingerprint(fp: dict[str, Any]) -> dict[str, Any]:
    """``fp`` with the paths it holds in one spelling each (the input, plugin files, a local
    model folder), so that `./in` and `in` are the same run. Idempotent; applied to the
    fingerprint a run folder holds too, as folders made before this stored paths as typed."""
    fp = dict(fp)
    if isinstance(fp.get("input"), str):
        fp["input"] = _canonical_path(fp["input"])
    for section in ("verifier", "environment"):
        if section in fp:
            fp[section] = _canonical_plugins(fp[section])
    model = fp.get("model")
    if isinstance(model, dict) and model.get("backend") == "vllm" and isinstance(model.get("name"), str) \
            and os.path.isdir(os.path.expanduser(model["name"])):  # a local folder, not a hub id
        fp["model"] = {**model, "name": _canonical_path(model["name"])}
    return fp


# Fingerprint keys added after run folders existed: a folder whose fingerprint lacks one was
# made before it was recorded, and is compared without it (its value then is unknown).
FINGERPRINT_ADDED = (("model", "send_seed"), ("verifier", "reward_range"), ("decontaminate", "content"))


def verifier_fingerprint(cfg: RunConfig) -> dict[str, Any]:
    """The verifier's part of the fingerprint (what `sft-ray rescore` replaces)."""
    from sft_ray.config import flat_dump

    return _verifier_fingerprint(flat_dump(cfg.verifier))


def config_fingerprint(cfg: RunConfig) -> dict[str, Any]:
    """The settings that change what a run produces (used to refuse resuming with a different config),
    paths in one spelling (:func:`canonical_fingerprint`)."""
    from sft_ray.config import flat_dump

    model = flat_dump(cfg.model)  # every backend's keys (others at their defaults), as fingerprints always held
    return canonical_fingerprint({
        "input": cfg.input,
        "model": {
            "backend": model["backend"],
            "name": model["name"],
            "base_url": model["base_url"],
            "api": model["api"],
            "engine_kwargs": model["engine_kwargs"],
            "tool_parser": model["tool_parser"],
            "chat_template": model["chat_template"],
            "extra_body": model["extra_body"],
            "send_seed": model["send_seed"],  # without the seed, a server samples differently
            # Claude's thinking changes the answers; keys only anthropic has are left out of others' fingerprints
            **({"thinking": model["thinking"], "anthropic_version": model["anthropic_version"]}
               if model["backend"] == "anthropic" else {}),
        },
        # top_k (added later) only when set: earlier run folders' fingerprints stay as they were
        "responses_create_params": cfg.responses_create_params.model_dump(
            exclude=set() if cfg.responses_create_params.top_k is not None else {"top_k"}),
        "num_repeats": cfg.num_repeats,
        "verifier": verifier_fingerprint(cfg),
        "agent": {"max_steps": cfg.agent.max_steps},
        "environment": cfg.environment.model_dump(
            include={"type", "module", "episode_class", "base_url"}
            | ({"command", "args", "url", "session"} if cfg.environment.type == "mcp" else set())),
    })


class DriftError(ValueError):
    """The run folder was made with a config that changes the outputs."""


def _diff(old: Any, new: Any, prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for k in sorted(set(old) | set(new)):
            out += _diff(old.get(k), new.get(k), f"{prefix}{k}.")
        return out
    return [] if old == new else [f"{prefix.rstrip('.')}: {old!r} -> {new!r}"]


class StopReason(str, Enum):
    """Why a session stopped before everything was sent: a session record's ``stopped`` holds the
    value, followed by ``: <detail>`` for the reasons that carry one (:meth:`text`)."""

    SPENDING_BUDGET = "budget"  # budget.*: what was spent (or would be) reached a limit
    FAILURE_BUDGET = "failure budget exceeded"  # max_error_fraction: too many samples failed
    INPUT_ERROR = "input error"  # a bad input line (without read.skip_bad_lines)
    BATCH_API_ERROR = "batch API error"  # the Batch API refused a call
    LIMITER_UNREACHABLE = "rate limiter unreachable"  # the run's shared limits actor is gone

    def text(self, detail: Any = None) -> str:
        """The record's ``stopped`` text for this reason."""
        return self.value if detail is None else f"{self.value}: {detail}"

    @classmethod
    def of(cls, text: Any) -> "StopReason | None":
        """The reason a ``stopped`` text gives; None when it gives none."""
        if not isinstance(text, str) or not text:
            return None
        for reason in cls:
            if text == reason.value or text.startswith(reason.value + ": "):
                return reason
        return None


class SessionRecord(dict):
    """One session's record in run.json: what it planned, wrote and spent, and why it stopped."""

    @classmethod
    def start(cls, number: int, planned: int) -> "SessionRecord":
        return cls({"session": number, "started_at": time.time(), "planned": planned, "written": 0, "failed": 0,
                    "output_tokens": 0, "generate_wall_s": 0.0, "stopped": None})

    @property
    def number(self) -> int:
        return int(self["session"])

    def add(self, ok: int, failed: int, output_tokens: int) -> None:
        """Rollouts written (``ok``), failure records written, output tokens they hold."""
        self["written"] += ok
        self["failed"] += failed
        self["output_tokens"] += output_tokens

    @property
    def stop_reason(self) -> StopReason | None:
        return StopReason.of(self.get("stopped"))

    @property
    def stopped(self) -> bool:
        return bool(self.get("stopped"))

    def stop(self, reason: StopReason, detail: Any = None) -> None:
        self["stopped"] = reason.text(detail)

    def stop_first(self, text: str | None) -> None:
        """Record a stop reason given as text (the limiter's), unless the session stopped already."""
        if text and not self.get("stopped"):
            self["stopped"] = text


class Manifest(dict):
    """run.json: the fingerprint, the config as given, each session's record, and what the run's
    steps recorded (the completion, the unexpected keys, a rescore's swap)."""

    @classmethod
    def of(cls, data: dict[str, Any]) -> "Manifest":
        manifest = cls(data)
        if isinstance(manifest.get("sessions"), list):
            manifest["sessions"] = [SessionRecord(s) if isinstance(s, dict) else s for s in manifest["sessions"]]
        return manifest

    @classmethod
    def load(cls, run_dir: str) -> "Manifest | None":
        uri = io.join(run_dir, MANIFEST)
        return cls.of(orjson.loads(io.read_bytes(uri))) if io.exists(uri) else None

    def save(self, run_dir: str) -> None:
        io.write_bytes(io.join(run_dir, MANIFEST), json.dumps(self, indent=2).encode())

    @property
    def sessions(self) -> list[SessionRecord]:
        return self.get("sessions") or []

    def open_session(self, planned: int) -> SessionRecord:
        """A new session's record, appended (numbered after those before it)."""
        record = SessionRecord.start(len(self["sessions"]), planned)
        self["sessions"].append(record)
        return record

    def spent_before(self) -> dict[str, float]:
        """What the sessions recorded so far spent (their ``spend``): requests, input and output tokens, and
        the prompt cache's tokens (Anthropic) when a session recorded any."""
        total: dict[str, float] = {"requests": 0, "input_tokens": 0, "output_tokens": 0}
        for s in self.sessions:
            spend = s.get("spend") or {}
            for k in total.keys() | {k for k in ("cache_creation_input_tokens", "cache_read_input_tokens") if k in spend}:
                total[k] = total.get(k, 0) + spend.get(k, 0)
        return total

    @property
    def config(self) -> dict[str, Any]:
        return self.get("config") or {}

    @property
    def completion(self) -> dict[str, Any] | None:
        return self.get("completion")

    def set_completion(self, stats: dict[str, Any]) -> None:
        self["completion"] = stats

    def set_unexpected(self, keys: frozenset[Key], kept: int) -> None:
        """The done samples that are none of the run's: their count, and up to ``kept`` of their keys."""
        self["unexpected_keys"] = {"count": len(keys), "keys": [key_to_json(k) for k in sorted(keys)[:kept]]}

    @property
    def unexpected(self) -> dict[str, Any] | None:
        return self.get("unexpected_keys")

    def record_rescore(self, target: dict[str, Any], verifier_config: dict[str, Any], record: dict[str, Any],
                       final: int, budget: FailureBudget) -> None:
        """After an `sft-ray rescore` swapped its rows in (``target``: its ``rescore/target.json``): the
        verifier of the rewards (config and fingerprint), the rescore's record, and the completion with
        the ``final`` rows that lost their reward (``budget``: the failure budget it is judged by)."""
        # rollouts/ now holds this rescore's files (rescore-<session>-<n>.jsonl): the run's own, for
        # finalize and resume (which take no file of an unrecorded session).
        self[RESCORED_SESSIONS] = int(target.get("sessions") or 0)
        rescores = self.setdefault("rescores", [])
        if any(r.get("id") == target["id"] for r in rescores):
            return  # recorded before a kill: the swap is being finished
        old = (self.get("fingerprint") or {}).get("verifier")
        self.setdefault("fingerprint", {})["verifier"] = target["verifier"]
        self.setdefault("config", {})["verifier"] = verifier_config
        self["rewards_from"] = {"by": "rescore", "at": time.time(), "verifier": target["verifier"],
                                "rescore": target["id"]}
        rescores.append({**record, "id": target["id"], "verifier_before": old, "verifier": target["verifier"],
                         "failed_for_good": final})
        done = self.get("completion")
        if done and final:
            fields = {k: done[k] for k in ("expected", "done", "failed", "failed_final", "pending", "bad_lines")
                      if k in done}
            c = Completion(**fields)
            c.done, c.failed, c.failed_final = c.done - final, c.failed + final, c.failed_final + final
            self["completion"] = {**done, **c.as_stats(budget)}


def load_manifest(run_dir: str) -> Manifest | None:
    return Manifest.load(run_dir)


def save_manifest(run_dir: str, manifest: dict[str, Any]) -> None:
    Manifest.save(manifest, run_dir)  # type: ignore[arg-type]  # a plain dict is saved the same way


def run_fingerprint(cfg: RunConfig, benchmarks: dict[str, str] | None = None) -> dict[str, Any]:
    """The config settings that change a run's outputs, plus ``read.limit`` when set (which
    samples the run has; absent when unset, as in folders made before it was part of this) and
    ``read.rename`` when given (which field each column is read as) and ``decontaminate`` when it
    names benchmarks (which prompts are sent), with ``benchmarks`` (per benchmark name, a digest
    of its content) as its ``content``: an edited benchmark file is a change too."""
    fp = config_fingerprint(cfg)
    read: dict[str, Any] = {}
    if cfg.read.limit is not None:
        read["limit"] = cfg.read.limit
    if cfg.read.rename:
        read["rename"] = dict(cfg.read.rename)
    if read:
        fp["read"] = read
    if cfg.decontaminate.active:  # which prompts are held back (absent when off, as in folders made before it)
        d = cfg.decontaminate.model_dump(mode="json")
        d["against"] = [_canonical_path(a) if isinstance(a, str) else {**a, "path": _canonical_path(a["path"])}
                        for a in d["against"]]
        if benchmarks is not None:
            d["content"] = dict(benchmarks)
        fp["decontaminate"] = d
    return fp


def prepare_run_dir(cfg: RunConfig, restart: bool, input_digests: dict[str, str],
                    benchmark_digests: dict[str, str] | None = None) -> Manifest:
    """Create or reopen the run folder; refuse a resume whose config, ``read.limit``, input
    content or benchmark content (``benchmark_digests``: per benchmark name, when decontaminating)
    changes the outputs (an edited input would leave stale rollouts in the run, a changed limit
    would leave samples out of, or extra ones in, its completion count, an edited benchmark would
    hold back other prompts)."""
    fingerprint = {**run_fingerprint(cfg, benchmark_digests), "input_files": input_digests}
    manifest = load_manifest(cfg.output)
    if manifest is not None and restart:
        for sub in run_outputs():
            io.delete(io.join(cfg.output, sub))
        manifest = None
    target = io.join(cfg.output, RESCORE, RESCORE_TARGET)
    if manifest is not None and io.exists(target) and orjson.loads(io.read_bytes(target)).get("state") == "swapping":
        raise DriftError(f"{cfg.output}: an `sft-ray rescore` was stopped while it swapped its rewards in; run "
                         f"`sft-ray rescore {cfg.output}` again (same verifier) to finish it first")
    if manifest is not None:
        old = canonical_fingerprint(dict(manifest.get("fingerprint") or {}))
        old_inputs = old.pop("input_files", {})
        new = run_fingerprint(cfg, benchmark_digests)
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
            rescored = manifest.get("rewards_from") or {}
            note = ""
            if rescored.get("by") == "rescore" and any(c.startswith("verifier") for c in changes):
                note = ("\nIts rewards were rescored (`sft-ray rescore`) with the verifier in run.json's "
                        "config.verifier: a run continues the folder with that verifier.")
            raise DriftError(
                f"{cfg.output} holds a run made with a different configuration:\n  " + "\n  ".join(changes) + note
                + "\nUse --restart to start over in this folder, or choose another output folder.")
    io.makedirs(cfg.output)
    if manifest is None:
        manifest = Manifest({"fingerprint": fingerprint, "sessions": []})
    manifest["config"] = cfg.stored()
    return manifest
