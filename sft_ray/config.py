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


# Header names that carry credentials (matched case-insensitively as substrings).
_SECRET_HEADER_WORDS = ("key", "token", "secret", "auth", "password", "cookie", "credential", "signature")


def looks_secret(header: str) -> bool:
    """Whether a header's name says it carries a credential (`api-key`, `Authorization`, `x-auth-token`...)."""
    low = header.lower()
    return any(w in low for w in _SECRET_HEADER_WORDS)


def _env_name(header: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in header).upper()


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
    extra_headers: dict[str, str] = Field(
        default_factory=dict,
        description="Extra HTTP headers on every request, stored in run.json as written: no credentials here "
        "(a header named like one, e.g. `api-key`, is refused); use `extra_headers_env`.",
    )
    extra_headers_env: dict[str, str] = Field(
        default_factory=dict,
        description="Headers whose values are read from environment variables on the driver: "
        "`{header: ENV_VAR}`, e.g. `{api-key: AZURE_OPENAI_KEY}`. The values never reach the config, "
        "run folder, logs or error messages.",
    )
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

    @model_validator(mode="after")
    def _no_literal_credentials(self) -> "ModelConfig":
        for name in self.extra_headers:
            if looks_secret(name):
                raise ValueError(
                    f"model.extra_headers.{name}: a credential does not belong in the config (run.json keeps "
                    f"it); put it in an environment variable and name that in model.extra_headers_env, "
                    f"e.g. extra_headers_env: {{{name}: MY_{_env_name(name)}}}")
        for name in set(self.extra_headers) & set(self.extra_headers_env):
            raise ValueError(f"model.extra_headers.{name}: set in both extra_headers and extra_headers_env")
        return self

    def api_key(self) -> str | None:
        """Read the key from the environment at the point of use (never stored in config)."""
        return os.environ.get(self.api_key_env) if self.api_key_env else None

    def secret_headers(self) -> dict[str, str]:
        """The `extra_headers_env` headers with their values read from the environment now.
        Raises :class:`ConfigError` naming the variable (never a value) when one is unset."""
        missing = [f"{h} (from {v})" for h, v in self.extra_headers_env.items() if not os.environ.get(v)]
        if missing:
            raise ConfigError("model.extra_headers_env: environment variable(s) not set for header(s): "
                              + ", ".join(missing))
        return {h: os.environ[v] for h, v in self.extra_headers_env.items()}


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
    min_reward: float = Field(0.0, description="Keep samples whose reward is >= this.")
    max_reward: float | None = Field(None, description="Optionally also drop samples whose reward is > this.")
    drop_truncated: bool = Field(False, description="Drop samples whose finish_reason is `length`.")


class ShuffleConfig(_Strict):
    seed: int = Field(0, description="Seed of the global shuffle: same seed, same order.")


class TrainConfig(_Strict):
    format: Literal["jsonl", "parquet"] = Field("jsonl", description="Shard format of train/.")
    rows_per_shard: int = Field(10_000, ge=1, description="Target rows per shard; shard sizes differ by at most 1.")
    include_fields: list[str] = Field(
        default_factory=list,
        description="Rollout fields copied into each training row beside `messages` (e.g. id, reward).",
    )


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
    generate_resources: dict[str, float] = Field(
        default_factory=dict,
        description="Custom Ray resources each generation actor asks for, e.g. `{cpu_node: 1}` keeps "
        "hosted-API actors on cluster.yaml's CPU worker type.",
    )
    score_actors: int | tuple[int, int] = Field(1, description="Scoring actors: a count or [min, max].")
    score_num_cpus: float = Field(0.5, ge=0, description="CPUs reserved per scoring actor.")
    batch_size: int | None = Field(
        None, ge=1, description="Rows per batch sent to a generation actor (default: derived from concurrency)."
    )
    ray_address: str | None = Field(
        None, description="Ray cluster to join: an address, `auto`, or `local` for a new local cluster "
        "(default: RAY_ADDRESS, else a new local cluster)."
    )


class RateLimitConfig(_Strict):
    """Provider limits, held together by every generation actor on every node (a shared Ray actor
    hands out permits); empty: no pacing. Token use is estimated before each request (prompt bytes / 4
    for input, the request's `max_output_tokens` for output, as providers count it) and corrected with
    the usage the server reports."""

    requests_per_minute: float | None = Field(None, gt=0, description="Most requests started per minute.")
    input_tokens_per_minute: float | None = Field(None, gt=0, description="Most input tokens per minute.")
    output_tokens_per_minute: float | None = Field(None, gt=0, description="Most output tokens per minute.")
    tokens_per_minute: float | None = Field(None, gt=0, description="Most input + output tokens per minute.")
    max_concurrency: int = Field(
        1024, ge=1, description="With `num_samples_in_parallel: auto`: the most requests in flight across all "
        "generation actors that the adaptive controller may reach.")

    def per_minute(self) -> dict[str, float]:
        """The configured limits by permit kind (requests, input_tokens, output_tokens, tokens)."""
        limits = {"requests": self.requests_per_minute, "input_tokens": self.input_tokens_per_minute,
                  "output_tokens": self.output_tokens_per_minute, "tokens": self.tokens_per_minute}
        return {k: float(v) for k, v in limits.items() if v}


class PricingConfig(_Strict):
    """Prices of the generation model, for the cost in stats.json, the progress line and budgets."""

    input_per_mtok: float = Field(0.0, ge=0, description="USD per million input tokens.")
    output_per_mtok: float = Field(
        0.0, ge=0, description="USD per million output tokens (reasoning tokens are billed as output).")


class BudgetConfig(_Strict):
    """Spending limits for the whole run folder, all runs together: once the next request could pass
    one, no new request starts, what is in flight finishes, the run finalizes what it has, reports
    `stopped: budget` and exits with code 4; a rerun with a raised budget continues."""

    max_cost_usd: float | None = Field(None, gt=0, description="Most USD spent (needs `pricing`).")
    max_output_tokens: int | None = Field(None, ge=1, description="Most output tokens generated.")
    max_requests: int | None = Field(None, ge=1, description="Most HTTP requests sent (retries count).")

    def active(self) -> bool:
        return any(v is not None for v in (self.max_cost_usd, self.max_output_tokens, self.max_requests))


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
    num_samples_in_parallel: int | Literal["auto"] = Field(
        64, description="Requests in flight across all generation actors together; `auto`: adapted while the "
        "run goes (grows while latency and errors stay flat, halves on 429s and timeouts), up to "
        "`rate_limit.max_concurrency`."
    )
    num_repeats: int = Field(1, ge=1, description="Samples per prompt, each with its own sample_index and seed.")
    verifier: VerifierConfig = Field(default_factory=VerifierConfig)
    filter: FilterConfig = Field(default_factory=FilterConfig)
    shuffle: ShuffleConfig = Field(default_factory=ShuffleConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    read: ReadConfig = Field(default_factory=ReadConfig)
    resources: ResourcesConfig = Field(default_factory=ResourcesConfig)
    rate_limit: RateLimitConfig = Field(default_factory=RateLimitConfig)
    pricing: PricingConfig = Field(default_factory=PricingConfig)
    budget: BudgetConfig = Field(default_factory=BudgetConfig)
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
        if isinstance(self.num_samples_in_parallel, int) and self.num_samples_in_parallel < 1:
            raise ValueError("num_samples_in_parallel must be a positive integer or 'auto'")
        if self.budget.max_cost_usd is not None and not (self.pricing.input_per_mtok or self.pricing.output_per_mtok):
            raise ValueError("budget.max_cost_usd needs pricing.input_per_mtok / pricing.output_per_mtok")
        if self.model.backend == "vllm" and (self.rate_limit.per_minute() or self.budget.active()
                                             or self.num_samples_in_parallel == "auto"):
            raise ValueError("rate_limit, budget and num_samples_in_parallel: auto apply to the openai backend")
        return self

    @property
    def adaptive(self) -> bool:
        """Whether concurrency is adapted at run time (`num_samples_in_parallel: auto`)."""
        return self.num_samples_in_parallel == "auto"

    @property
    def max_in_flight(self) -> int:
        """The most requests in flight across all generation actors (the ceiling with `auto`)."""
        return self.rate_limit.max_concurrency if self.adaptive else int(self.num_samples_in_parallel)


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
        # Header values may be credentials: never echo them.
        hidden = isinstance(got, dict) or e["type"] == "missing" or "extra_headers" in e["loc"]
        shown = "" if hidden else f" (got {got!r})"
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
