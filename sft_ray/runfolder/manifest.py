"""The run folder's manifest (``run.json``) and its fingerprint.

The fingerprint is every setting that changes what a run produces (the config's, plus
``read.limit`` and a digest of each input file): a rerun in the same folder resumes only when
its fingerprint matches the one in ``run.json``; otherwise it is refused (or, with
``--restart``, the folder is emptied first). ``run.json`` also keeps the config as given and
each session's record.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import orjson

from sft_ray import io
from sft_ray.config import RunConfig, flat_dump
from sft_ray.runfolder.layout import MANIFEST, RESCORE, RESCORE_TARGET, RUN_OUTPUTS

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
FINGERPRINT_ADDED = (("model", "send_seed"), ("verifier", "reward_range"))


def verifier_fingerprint(cfg: RunConfig) -> dict[str, Any]:
    """The verifier's part of the fingerprint (what `sft-ray rescore` replaces)."""
    return _verifier_fingerprint(flat_dump(cfg.verifier))


def config_fingerprint(cfg: RunConfig) -> dict[str, Any]:
    """The settings that change what a run produces (used to refuse resuming with a different config),
    paths in one spelling (:func:`canonical_fingerprint`)."""
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
        for sub in RUN_OUTPUTS:
            io.delete(io.join(cfg.output, sub))
        manifest = None
    target = io.join(cfg.output, RESCORE, RESCORE_TARGET)
    if manifest is not None and io.exists(target) and orjson.loads(io.read_bytes(target)).get("state") == "swapping":
        raise DriftError(f"{cfg.output}: an `sft-ray rescore` was stopped while it swapped its rewards in; run "
                         f"`sft-ray rescore {cfg.output}` again (same verifier) to finish it first")
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
        manifest = {"fingerprint": fingerprint, "sessions": []}
    manifest["config"] = cfg.stored()
    return manifest
