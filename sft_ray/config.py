"""The run configuration: one pydantic model, validated at the edge.

The CLI turns a YAML file plus ``dotted.key=value`` overrides into a
:class:`RunConfig`; everything downstream (Ray actors included) receives plain
values taken from it. Field descriptions are the reference documentation
(``sft-ray validate --schema`` prints them). Names follow NeMo Gym where one
exists (``responses_create_params``, ``num_repeats``, ``num_samples_in_parallel``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import AliasChoices, BaseModel, ConfigDict, Field, ValidationError, model_validator


class ConfigError(ValueError):
    """A configuration problem, worded for the user (names the field or file)."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(_Strict):
    """Which model answers, and how to reach it."""

    backend: Literal["openai", "vllm"] = Field(
        "openai", description="`openai`: any OpenAI-compatible HTTP endpoint; `vllm`: engines inside the Ray actors."
    )
    name: str | None = Field(
        None,
        description="Model name sent to the API (openai) or a Hugging Face id / local folder (vllm). "
        "Empty with vllm: the embedded default model.",
    )
    base_url: str = Field(
        "https://api.openai.com/v1", description="API root ending in /v1 (openai backend)."
    )
    api: Literal["chat", "responses"] = Field(
        "chat", description="`chat`: POST {base_url}/chat/completions; `responses`: POST {base_url}/responses."
    )
    api_key_env: str | None = Field(
        "OPENAI_API_KEY",
        description="Name of the environment variable that holds the API key. The key itself never "
        "goes into the config, logs or outputs. Unset variable: no Authorization header.",
    )
    timeout_s: float = Field(120.0, gt=0, description="Per-request timeout in seconds (whole request).")
    connect_timeout_s: float = Field(10.0, gt=0, description="TCP/TLS connect timeout in seconds.")
    max_retries: int = Field(
        6, ge=0, le=100, description="Retries after the first attempt on connection errors, timeouts, 408, 429 and 5xx."
    )
    base_retry_wait_s: float = Field(0.5, ge=0, description="First backoff wait; doubles each retry, with full jitter.")
    max_retry_wait_s: float = Field(60.0, ge=0, description="Cap on one backoff wait, Retry-After included.")
    send_seed: bool = Field(
        True, description="Send the per-sample `seed` with chat requests (the Responses API has no seed field)."
    )
    extra_headers: dict[str, str] = Field(default_factory=dict, description="Extra HTTP headers on every request.")
    extra_body: dict[str, Any] = Field(
        default_factory=dict, description="Extra JSON fields merged into every request body."
    )
    engine_kwargs: dict[str, Any] = Field(
        default_factory=dict,
        description="vllm backend: engine options passed through (max_model_len, gpu_memory_utilization, "
        "enable_prefix_caching, dtype, tensor_parallel_size, max_num_seqs, ...).",
    )

    @property
    def tensor_parallel_size(self) -> int:
        """GPUs per vLLM replica (from engine_kwargs; 1 when unset)."""
        return int(self.engine_kwargs.get("tensor_parallel_size") or 1)

    @model_validator(mode="after")
    def _tp(self) -> "ModelConfig":
        tp = self.engine_kwargs.get("tensor_parallel_size", 1)
        if not isinstance(tp, int) or tp < 1:
            raise ValueError("model.engine_kwargs.tensor_parallel_size must be a positive integer")
        return self

    def api_key(self) -> str | None:
        """Read the key from the environment at the point of use (never stored in config)."""
        return os.environ.get(self.api_key_env) if self.api_key_env else None


class SamplingConfig(BaseModel):
    """Defaults for every row's `responses_create_params`; a row's own values win.

    Known fields are checked; other Responses-API fields (e.g. `stop`, `reasoning`)
    are allowed and passed through.
    """

    model_config = ConfigDict(extra="allow")

    temperature: float | None = Field(1.0, ge=0, le=2, description="Sampling temperature.")
    top_p: float | None = Field(1.0, gt=0, le=1, description="Nucleus sampling mass.")
    max_output_tokens: int | None = Field(1024, ge=1, description="Most tokens generated per sample.")
    seed: int | None = Field(
        None, description="Base seed; each sample gets its own seed derived from it, the row id and sample_index."
    )


class VerifierConfig(_Strict):
    """How each response is scored."""

    type: Literal["exact_match", "math", "mcq", "regex", "python", "none"] = Field(
        "exact_match", description="Verifier: exact_match, math (math-verify), mcq, regex, python, none."
    )
    answer_field: str = Field("expected_answer", description="Row field holding the reference answer.")
    pattern: str | None = Field(
        None,
        description="regex: pattern searched in the response. With a capture group, group 1 is compared "
        "with the reference answer; without one, a match scores 1.",
    )
    function: str | None = Field(
        None,
        description="python: `module:function` or `path/to/file.py:function`, called as fn(row, response) "
        "and returning a float or a dict with `reward` and other metrics.",
    )
    options: dict[str, Any] = Field(default_factory=dict, description="Extra keyword arguments for the verifier.")

    @model_validator(mode="after")
    def _needs(self) -> "VerifierConfig":
        if self.type == "regex" and not self.pattern:
            raise ValueError("verifier.pattern is required when verifier.type is 'regex'")
        if self.type == "python" and (not self.function or ":" not in self.function):
            raise ValueError("verifier.function must be 'module:function' when verifier.type is 'python'")
        if self.pattern:
            import re

            try:
                re.compile(self.pattern)
            except re.error as e:
                raise ValueError(f"verifier.pattern is not a valid regular expression: {e}") from None
        return self


class FilterConfig(_Strict):
    """Which rollouts reach train/ (applied by finalize; `sft-ray filter` re-applies them without a model).
    Each drop is counted by reason in stats.json."""

    min_reward: float = Field(0.0, description="Keep samples whose reward is >= this.")
    max_reward: float | None = Field(None, description="Optionally also drop samples whose reward is > this.")
    drop_truncated: bool = Field(True, description="Drop samples whose finish_reason is `length` (cut by the model).")
    max_tokens: int | None = Field(
        None, ge=1, description="Drop samples that generated more than this many output tokens (usage.output_tokens, "
        "summed over an episode's model calls)."
    )
    drop_unfinished: bool = Field(
        True, description="Agent episodes: drop those whose `termination` is not `final` (max_steps, length, error)."
    )
    drop_malformed_tool_calls: bool = Field(
        True, description="Agent episodes: drop those with a malformed or unknown tool call (num_malformed_tool_calls > 0)."
    )
    drop_tool_errors: bool = Field(False, description="Agent episodes: drop those in which a tool returned an error.")
    min_tool_calls: int | None = Field(None, ge=0, description="Agent episodes: drop those with fewer tool calls.")
    max_tool_calls: int | None = Field(None, ge=0, description="Agent episodes: drop those with more tool calls.")
    dedup: Literal["none", "exact", "near"] = Field(
        "none", description="Per prompt, drop duplicate replies: `exact` (same text once whitespace and case are "
        "normalised) or `near` (MinHash Jaccard >= near_dedup_threshold). The highest reward of a group is kept."
    )
    near_dedup_threshold: float = Field(
        0.8, gt=0, le=1, description="`dedup: near`: estimated Jaccard similarity of word 3-grams at or above which "
        "two replies to one prompt are duplicates."
    )


class ShuffleConfig(_Strict):
    seed: int = Field(0, description="Seed of the global shuffle: same seed, same order.")


class TrainConfig(_Strict):
    format: Literal["messages", "prompt_completion", "openai"] = Field(
        "messages",
        description="Training-row format. `messages`: {messages, tools} for TRL's SFTTrainer and Hugging Face chat "
        "templates (tool-call arguments as JSON objects); `prompt_completion`: TRL's conversational prompt/completion "
        "(completion = the generated turns, for completion-only loss); `openai`: OpenAI fine-tuning JSONL "
        "(arguments as JSON strings, parallel_tool_calls).",
    )
    file_format: Literal["jsonl", "parquet"] = Field(
        "jsonl", description="Shard file format of train/ and validation/. Parquet shards share one declared schema."
    )
    rows_per_shard: int = Field(10_000, ge=1, description="Target rows per shard; shard sizes differ by at most 1.")
    include_fields: list[str] = Field(
        default_factory=list,
        description="Rollout fields copied into each training row (e.g. id, reward); a dotted path (metrics.accuracy) "
        "copies one nested value, kept nested.",
    )
    max_per_prompt: int | None = Field(
        None, ge=1, description="Keep at most this many samples per prompt: the highest rewards, ties broken by the "
        "shuffle seed."
    )
    validation_fraction: float = Field(
        0.0, ge=0, lt=1, description="Share of prompts written to validation/ instead of train/ (split by prompt: all "
        "samples of a prompt on one side; deterministic for shuffle.seed)."
    )
    reasoning: Literal["keep", "drop", "think_tags"] = Field(
        "keep", description="Reasoning traces in training rows: `keep` as `reasoning_content` on assistant messages, "
        "`drop` them (and <think> blocks), or `think_tags`: put them in the content as <think>...</think>."
    )

    @model_validator(mode="after")
    def _include(self) -> "TrainConfig":
        from sft_ray.formats import FORMAT_KEYS

        clash = sorted({p.split(".")[0] for p in self.include_fields} & FORMAT_KEYS)
        if clash:
            raise ValueError(f"train.include_fields: {', '.join(clash)} belong to the training format; "
                             "include other fields")
        return self

    @model_validator(mode="before")
    @classmethod
    def _legacy_format(cls, data: Any) -> Any:
        # Run folders written before `file_format` existed stored the file format as `format`.
        if isinstance(data, dict) and data.get("format") in ("jsonl", "parquet") and "file_format" not in data:
            data = {**data, "file_format": data["format"]}
            data.pop("format")
        return data


class ReadConfig(_Strict):
    skip_bad_lines: bool = Field(
        False, description="Skip and count malformed input lines instead of stopping at the first."
    )
    limit: int | None = Field(None, ge=1, description="Use only the first N rows of each input file (for trials).")


class ResourcesConfig(_Strict):
    """Actor pools; the defaults suit one machine."""

    generate_actors: int | tuple[int, int] = Field(
        1, description="Generation actors: a count, or [min, max] for an autoscaling pool."
    )
    generate_num_cpus: float = Field(0.5, ge=0, description="CPUs reserved per generation actor.")
    generate_num_gpus: float = Field(0, ge=0, description="GPUs per generation actor (vllm).")
    score_actors: int | tuple[int, int] = Field(1, description="Scoring actors: a count or [min, max].")
    score_num_cpus: float = Field(0.5, ge=0, description="CPUs reserved per scoring actor.")
    batch_size: int | None = Field(
        None, ge=1, description="Rows per batch sent to a generation actor (default: derived from concurrency)."
    )
    ray_address: str | None = Field(
        None, description="Ray cluster to join: an address, `auto`, or `local` for a new local cluster "
        "(default: RAY_ADDRESS, else a new local cluster)."
    )


class RunConfig(_Strict):
    """A whole `sft-ray run`."""

    input: str = Field(
        validation_alias=AliasChoices("input", "input_jsonl_fpath"),
        description="Prompt JSONL: a file, a folder, or a glob (s3:// and gs:// URIs too).",
    )
    output: str = Field(
        validation_alias=AliasChoices("output", "output_dir"),
        description="Run folder: rollouts/, failed/, train/, stats.json.",
    )
    model: ModelConfig = Field(default_factory=ModelConfig)
    responses_create_params: SamplingConfig = Field(default_factory=SamplingConfig)
    num_samples_in_parallel: int = Field(
        64, ge=1, description="Requests in flight across all generation actors together."
    )
    num_repeats: int = Field(1, ge=1, description="Samples per prompt, each with its own sample_index and seed.")
    verifier: VerifierConfig = Field(default_factory=VerifierConfig)
    filter: FilterConfig = Field(default_factory=FilterConfig)
    shuffle: ShuffleConfig = Field(default_factory=ShuffleConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    read: ReadConfig = Field(default_factory=ReadConfig)
    resources: ResourcesConfig = Field(default_factory=ResourcesConfig)
    max_error_fraction: float = Field(
        0.05,
        ge=0,
        le=1,
        description="Failure budget: the run exits non-zero when more than this share of samples failed. "
        "It also stops early once at least `min_rows_for_budget` samples are done and the share is exceeded.",
    )
    min_rows_for_budget: int = Field(200, ge=1, description="Samples done before the failure budget can stop a run.")
    max_sample_attempts: int = Field(
        3, ge=1, description="Runs (the first and each rerun) in which a failing sample is tried; after that its "
        "failure is final and reruns skip it. Within a run, each try also has model.max_retries retries.")

    @model_validator(mode="after")
    def _model_name(self) -> "RunConfig":
        if self.model.backend == "openai" and not self.model.name:
            raise ValueError("model.name is required with the openai backend (the name the API serves)")
        return self


def _parse_value(raw: str) -> Any:
    """`key=value` overrides take YAML scalars/flow values: 4 -> int, true -> bool, [1,2] -> list."""
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``a.b.c=value`` overrides to a nested dict (in place, and returned)."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form dotted.key=value")
        key, raw = item.split("=", 1)
        parts = [p for p in key.strip().split(".") if p]
        if not parts:
            raise ConfigError(f"override {item!r} has an empty key")
        node = data
        for p in parts[:-1]:
            child = node.get(p)
            if child is None:
                child = node[p] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"override {item!r}: {'.'.join(parts[:-1])} is not a section")
            node = child
        node[parts[-1]] = _parse_value(raw)
    return data


def format_validation_error(err: ValidationError, source: str) -> str:
    """One line per problem, each naming the dotted field."""
    lines = [f"invalid configuration ({source}):"]
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "<root>"
        if e["type"] == "extra_forbidden":
            lines.append(f"  {loc}: unknown key")
            continue
        got = e.get("input")
        shown = "" if isinstance(got, dict) or e["type"] == "missing" else f" (got {got!r})"
        msg = e["msg"].removeprefix("Value error, ")
        lines.append(f"  {loc}: {msg}{shown}" if loc != "<root>" else f"  {msg}")
    return "\n".join(lines)


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> RunConfig:
    """Read YAML (optional), apply overrides, validate. Raises :class:`ConfigError`."""
    data: dict[str, Any] = {}
    source = str(path) if path else "overrides"
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            loaded = yaml.safe_load(p.read_text())
        except yaml.YAMLError as e:
            raise ConfigError(f"{p}: not valid YAML: {e}") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{p}: the top level must be a mapping of keys to values")
        data = loaded
    apply_overrides(data, overrides or [])
    try:
        return RunConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, source)) from None


def config_fingerprint(cfg: RunConfig) -> dict[str, Any]:
    """The settings that change what a run produces (used to refuse resuming with a different config)."""
    return {
        "input": cfg.input,
        "model": {
            "backend": cfg.model.backend,
            "name": cfg.model.name,
            "base_url": cfg.model.base_url,
            "api": cfg.model.api,
            "engine_kwargs": cfg.model.engine_kwargs,
            "extra_body": cfg.model.extra_body,
        },
        "responses_create_params": cfg.responses_create_params.model_dump(),
        "num_repeats": cfg.num_repeats,
        "verifier": cfg.verifier.model_dump(),
    }


def reference_markdown() -> str:
    """The config reference as a Markdown table, generated from the field descriptions
    (the README embeds it; a test keeps the two in step)."""
    rows = ["| key | default | description |", "|---|---|---|"]

    def walk(model: type[BaseModel], prefix: str) -> None:
        for name, f in model.model_fields.items():
            ann = f.annotation
            if isinstance(ann, type) and issubclass(ann, BaseModel):
                walk(ann, f"{prefix}{name}.")
                continue
            default = "required" if f.is_required() else repr(f.get_default(call_default_factory=True))
            desc = (f.description or "").replace("|", "\\|").replace("\n", " ")
            rows.append(f"| `{prefix}{name}` | `{default}` | {desc} |")

    walk(RunConfig, "")
    return "\n".join(rows)


def update_readme(path: str | Path = "README.md") -> None:
    """Replace the README's config table (between its markers) with the current reference."""
    p = Path(path)
    text = p.read_text()
    start, end = "<!-- config-reference:start -->\n", "<!-- config-reference:end -->"
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    p.write_text(head + start + reference_markdown() + "\n" + end + tail)


if __name__ == "__main__":
    import sys

    if "--update-readme" in sys.argv:
        update_readme()
    else:
        print(reference_markdown())
