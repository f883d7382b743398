"""The run configuration: one pydantic model, validated at the edge.

The CLI turns a YAML file plus ``dotted.key=value`` overrides into a
:class:`RunConfig`; everything downstream (Ray actors included) receives plain
values taken from it. Field descriptions are the reference documentation
(``sft-ray validate --schema`` prints them). Names follow NeMo Gym where one
exists (``responses_create_params``, ``num_repeats``, ``num_samples_in_parallel``).
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Literal

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, field_validator, model_validator

# Backends that call a hosted HTTP API (rate limits, budgets, API keys), as against engines in the actors.
HOSTED_BACKENDS = ("openai", "anthropic")

class ConfigError(ValueError):
    """A configuration problem, worded for the user (names the field or file)."""


# Header names that carry credentials (matched case-insensitively as substrings).
_SECRET_HEADER_WORDS = ("key", "token", "secret", "auth", "password", "cookie", "credential", "signature")


def looks_secret(header: str) -> bool:
    """Whether a header's name says it carries a credential (`api-key`, `Authorization`, `x-auth-token`...)."""
    low = header.lower()
    return any(w in low for w in _SECRET_HEADER_WORDS)


def read_env_mapping(mapping: dict[str, str], key: str) -> dict[str, str]:
    """``{name: ENV_VAR}`` with the variables' values; :class:`ConfigError` names unset ones (never a value)."""
    missing = [f"{name} (from {var})" for name, var in mapping.items() if not os.environ.get(var)]
    if missing:
        raise ConfigError(f"{key}: environment variable(s) not set: {', '.join(missing)}")
    return {name: os.environ[var] for name, var in mapping.items()}


def _env_name(header: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in header).upper()


# vLLM's StructuredOutputsParams (0.32): the constraint kinds (exactly one is given) and the options.
_STRUCTURED_KINDS = frozenset({"choice", "regex", "json", "grammar", "json_object", "structural_tag"})
_STRUCTURED_OPTIONS = frozenset({"disable_any_whitespace", "disable_additional_properties", "whitespace_pattern"})


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class PricingConfig(_Strict):
    """Prices of a model, in USD per million tokens. At the top level, the generation model's: the cost in
    stats.json, the progress line and `budget.max_cost_usd`; under `verifier.judge`, the judge's: its cost
    in stats.json's `spend`, apart and in the total."""

    input_per_mtok: float = Field(0.0, ge=0, description="USD per million input tokens.")
    output_per_mtok: float = Field(
        0.0, ge=0, description="USD per million output tokens (reasoning tokens are billed as output).")
    batch_discount: float = Field(
        0.5, gt=0, le=1, description="With `model.batch.enabled`: the share of the prices above that a provider's "
        "Batch API bills (OpenAI: 0.5); the cost in stats.json, the budget and `--dry-run` use it.")


class BatchConfig(_Strict):
    """The provider's Batch API (OpenAI's `/v1/files` + `/v1/batches`, and the OpenAI-compatible batch endpoints
    of other providers): requests are uploaded as JSONL files and answered within a completion window, at batch
    prices. Every batch is recorded in the run folder (`batches.jsonl`) before the driver waits on it, so a killed
    client's rerun polls the same batches and nothing is submitted twice. See docs/batch.md."""

    enabled: bool = Field(
        False, description="Send generation through the Batch API instead of online requests (`backend: openai`, "
        "`api: chat` or `responses`; rejection sampling and agent episodes go in rounds, see docs/batch.md).")
    completion_window: str = Field("24h", description="The batch's completion window (OpenAI accepts `24h`).")
    max_requests: int = Field(50_000, ge=1, description="Most requests per batch file (OpenAI: 50,000).")
    max_bytes: int = Field(200_000_000, ge=1024, description="Most bytes per batch file (OpenAI: 200 MB).")
    poll_interval_s: float = Field(
        30.0, gt=0, description="Longest wait between polls of a batch's status; polls start faster (a tenth of "
        "it) and back off by half again each time nothing changed.")
    max_in_flight: int = Field(4, ge=1, description="Most batches submitted and not yet collected at once.")


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
    timeout_s: float = Field(
        120.0, gt=0, description="Per-request timeout in seconds (whole request), for a request that asks for up "
        "to 1024 output tokens; longer ones get more: see `timeout_per_1k_output_tokens_s`.")
    timeout_per_1k_output_tokens_s: float = Field(
        20.0, ge=0, description="Seconds added to `timeout_s` per 1000 output tokens a request asks for "
        "(its `max_output_tokens`, a row's own value included) beyond the first 1024, so a long reasoning "
        "answer is not cut at one fixed total: 32,768 tokens get 120 + 20 x 31.7 = 755 s. 0: every request "
        "gets `timeout_s`.")
    connect_timeout_s: float = Field(10.0, gt=0, description="TCP/TLS connect timeout in seconds.")
    max_retries: int = Field(
        6, ge=0, le=100, description="Retries after the first attempt on connection errors, timeouts, 408, 429 and 5xx."
    )
    base_retry_wait_s: float = Field(0.5, ge=0, description="First backoff wait; doubles each retry, with full jitter.")
    max_retry_wait_s: float = Field(60.0, ge=0, description="Cap on one backoff wait, Retry-After included.")
    send_seed: bool = Field(
        True, description="Send the per-sample `seed` with chat requests (the Responses API has no seed field)."
    )
    max_tokens_field: Literal["max_tokens", "max_completion_tokens"] = Field(
        "max_tokens", description="Chat Completions: the body field that carries `max_output_tokens` "
        "(OpenAI's reasoning models want `max_completion_tokens`)."
    )
    omit_params: list[str] = Field(
        default_factory=list,
        description="Sampling keys never sent to this model, for models that refuse them: e.g. `[temperature, "
        "top_p]` for OpenAI's reasoning models (o1, o3, o4-mini, gpt-5). Names are `responses_create_params` "
        "keys (`max_output_tokens` covers `model.max_tokens_field`; `reasoning` and `reasoning_effort` go "
        "together); rollouts record the parameters without them. `extra_body` is still sent as written.",
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
        default_factory=dict, description="Extra JSON fields merged into every request body (openai). With vllm "
        "only `structured_outputs` is read: vLLM's structured output, as its server takes it in a request body "
        "(one of `choice`, `regex`, `json`, `grammar`, `json_object`, `structural_tag`), e.g. "
        "`{structured_outputs: {choice: [yes, no]}}`."
    )
    engine_kwargs: dict[str, Any] = Field(
        default_factory=dict,
        description="vllm backend: engine options passed through (max_model_len, gpu_memory_utilization, "
        "enable_prefix_caching, dtype, tensor_parallel_size, max_num_seqs, ...).",
    )

    tool_parser: str | None = Field(
        None,
        description="vllm backend: vLLM's tool parser that turns the model's text into tool calls on rows with "
        "`tools` (`hermes`, `llama3_json`, `pythonic`, `mistral`, ...; the one vLLM's server would use for the "
        "model). Empty: `hermes` for the embedded model; other models then fail rows that have tools.",
    )
    batch: BatchConfig = Field(default_factory=BatchConfig)
    chat_template: str | None = Field(
        None,
        description="vllm backend: a Jinja chat template replacing the model's own, as a file path (read when "
        "the config loads) or the template text. Empty: the model's template; for the embedded model, a "
        "tool-capable ChatML template shipped with sft-ray.",
    )

    @field_validator("chat_template")
    @classmethod
    def _read_chat_template(cls, t: str | None) -> str | None:
        # Read here, so actors on other nodes need not see the file.
        if t and "{{" not in t and "{%" not in t:  # not template text: a file path
            path = Path(t).expanduser()
            if not path.is_file():
                raise ValueError("no such template file (give a file path or the template text)")
            return path.read_text()
        return t

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

    @field_validator("omit_params")
    @classmethod
    def _known_params(cls, names: list[str]) -> list[str]:
        unknown = [n for n in names if n not in SamplingConfig.model_fields]
        if unknown:
            raise ValueError(f"not a responses_create_params key: {', '.join(unknown)} (one of "
                             f"{', '.join(SamplingConfig.model_fields)})")
        return list(dict.fromkeys(names))

    @model_validator(mode="after")
    def _vllm_body(self) -> "ModelConfig":
        if self.backend != "vllm" or not self.extra_body:
            return self
        other = sorted(set(self.extra_body) - {"structured_outputs"})
        if other:
            raise ValueError(f"extra_body.{other[0]}: with backend vllm, extra_body holds only `structured_outputs` "
                             "(other keys are HTTP request fields of the openai backend)")
        so = self.extra_body["structured_outputs"]
        kinds = [k for k in _STRUCTURED_KINDS if isinstance(so, dict) and so.get(k) not in (None, False)]
        if not isinstance(so, dict) or len(kinds) != 1 or set(so) - _STRUCTURED_KINDS - _STRUCTURED_OPTIONS:
            raise ValueError("extra_body.structured_outputs: a mapping with exactly one of "
                             + ", ".join(sorted(_STRUCTURED_KINDS)) + " (plus vLLM's options "
                             + ", ".join(sorted(_STRUCTURED_OPTIONS)) + ")")
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


class SamplingConfig(_Strict):
    """Defaults for every row's `responses_create_params`; a row's own values win.

    Unknown keys are refused (a typo such as `temprature` would otherwise be dropped
    without a word); fields an API has beyond these go in `model.extra_body`.
    """

    temperature: float | None = Field(1.0, ge=0, le=2, description="Sampling temperature.")
    top_p: float | None = Field(1.0, gt=0, le=1, description="Nucleus sampling mass.")
    max_output_tokens: int | None = Field(1024, ge=1, description="Most tokens generated per model call "
                                          "(sent as `max_tokens` or `max_completion_tokens` to Chat Completions: "
                                          "see model.max_tokens_field).")
    seed: int | None = Field(
        None, description="Base seed; each sample gets its own seed derived from it, the row id and sample_index."
    )
    stop: str | list[str] | None = Field(None, description="Stop sequences.")
    frequency_penalty: float | None = Field(None, ge=-2, le=2, description="Frequency penalty.")
    presence_penalty: float | None = Field(None, ge=-2, le=2, description="Presence penalty.")
    top_logprobs: int | None = Field(None, ge=0, le=20, description="Log-probabilities of the top tokens.")
    reasoning: dict[str, Any] | None = Field(
        None, description="Responses API reasoning options, e.g. {effort: low}; sent as `reasoning_effort` "
        "to Chat Completions.")
    reasoning_effort: Literal["minimal", "low", "medium", "high"] | None = Field(
        None, description="Chat Completions reasoning effort (sent as `reasoning.effort` to the Responses API).")
    tool_choice: str | dict[str, Any] | None = Field(None, description="Default tool_choice for rows with tools.")
    parallel_tool_calls: bool | None = Field(None, description="Default parallel_tool_calls for rows with tools.")
    user: str | None = Field(None, description="End-user id passed to the API.")
    metadata: dict[str, str] | None = Field(None, description="Request metadata passed to the API.")
    store: bool | None = Field(None, description="Whether the provider stores the request (OpenAI).")
    service_tier: str | None = Field(None, description="Provider service tier (OpenAI).")
    truncation: str | None = Field(None, description="Responses API truncation strategy.")
    text: dict[str, Any] | None = Field(None, description="Responses API text/format options.")

    @model_validator(mode="before")
    @classmethod
    def _renamed(cls, data: Any) -> Any:
        if isinstance(data, dict) and "max_tokens" in data:
            raise ValueError("responses_create_params.max_tokens: use max_output_tokens (it is mapped to the "
                             "field the chosen API wants)")
        return data


# Keys a row's responses_create_params may carry: the sampling fields above plus the prompt
# and tool keys (and `model`, which NeMo Gym rows sometimes name and the config overrides).
ROW_PARAM_KEYS = frozenset(SamplingConfig.model_fields) | {"input", "instructions", "tools", "model",
                                                           "max_tokens", "max_completion_tokens"}


class CodeConfig(_Strict):
    """`type: code`: how the reply's program is run against the row's tests."""

    mode: Literal["share", "all"] = Field(
        "share", description="Reward: `share` of the row's tests passed, or `all` (1 only when every test passes)."
    )
    timeout_s: float = Field(
        10.0, gt=0, description="CPU seconds per test run (the wall-clock deadline is 2x this plus 5 s)."
    )
    memory_mb: int = Field(1024, ge=64, description="Address-space limit of a test run, in MiB.")
    file_mb: int = Field(16, ge=0, description="Largest file a test run may write, in MiB.")
    max_output_bytes: int = Field(1 << 20, ge=1024, description="Output kept per run; past it the run is killed.")
    workers: int | None = Field(
        None, ge=1, description="Test runs at once per scoring actor (default: the machine's cores)."
    )
    prepend_field: str | None = Field(
        None, description="Row field (e.g. `prompt`) put before a reply that does not define `entry_point` "
        "itself (completions that continue HumanEval's prompt)."
    )
    plain_returns: bool = Field(
        True, description="HumanEval style: a value the entry point returns to `check` must be plain data (builtin "
        "types, numpy's), else the test fails: an object whose class claims to equal anything cannot pass "
        "`assert candidate(x) == y`. false: for tests that compare objects of classes the prompt defines."
    )


class JudgeConfig(_Strict):
    """An LLM judge (`type: judge`, or `type: math` falling back to it)."""

    model: ModelConfig = Field(
        description="The judge model, with the same keys as the top-level `model` section: `backend: openai` (an "
        "OpenAI-compatible endpoint; `name` required) or `backend: vllm` (an engine in each scoring actor; `name` "
        "empty: the embedded default model; GPUs: `resources.score_num_gpus`).")
    template: str = Field(
        "equivalence",
        description="`equivalence` (question, reference, candidate -> [[A=B]] / [[A!=B]]), `score` (a rubric -> "
        "`Rating: [[N]]`, N in 1..10, reward (N-1)/9), or a template file with {field} placeholders from the row "
        "plus {question}, {reference}, {response}.",
    )
    verdict: Literal["equivalence", "score"] = Field(
        "equivalence", description="How a template file's verdict is read: [[A=B]] / [[A!=B]], or Rating: [[N]]."
    )
    check_twice_swap: bool = Field(
        False, description="equivalence: ask again with reference and candidate swapped; reward 1 only if both agree."
    )
    max_parse_retries: int = Field(
        2, ge=0, le=10, description="New judge calls when a verdict cannot be read; then the row is a `judge_error`."
    )
    responses_create_params: dict[str, Any] = Field(
        default_factory=lambda: {"temperature": 0.0, "max_output_tokens": 1024},
        description="Sampling for the judge's calls (temperature, max_output_tokens, ...).",
    )
    question_field: str | None = Field(
        None, description="Row field holding the question (default: the row's prompt, its last user message)."
    )
    rubric_field: str = Field("rubric", description="`score` template: row field holding the rubric.")
    pricing: PricingConfig = Field(
        default_factory=PricingConfig,
        description="The judge model's prices: stats.json's `spend` shows the judge's cost apart and in "
        "`total_cost_usd` (`budget.max_cost_usd` bounds the generation spend only).",
    )

    @field_validator("responses_create_params")
    @classmethod
    def _judge_sampling(cls, params: dict[str, Any]) -> dict[str, Any]:
        # Checked as the run's own sampling is (a typo such as `temprature` would otherwise be
        # dropped without a word), but kept as given: the judge's defaults are not the run's.
        SamplingConfig.model_validate(params)
        return params

    @model_validator(mode="after")
    def _judge_model(self) -> "JudgeConfig":
        if self.model.backend == "openai" and not self.model.name:
            raise ValueError("verifier.judge.model.name is required with the openai backend (the name the judge's "
                             "API serves; backend vllm with no name runs the embedded default model)")
        if self.template not in ("equivalence", "score") and not Path(self.template).is_file():
            raise ValueError(f"verifier.judge.template: not `equivalence`, `score` or an existing file: "
                             f"{self.template}")
        return self


class VerifierConfig(_Strict):
    """How each response is scored."""

    type: Literal["exact_match", "math", "mcq", "regex", "python", "code", "json_schema", "judge", "composite",
                  "nemo_gym", "none"] = Field(
        "exact_match",
        description="Verifier: exact_match, math (math-verify; with `judge`, a judge when it finds no match), mcq, "
        "regex, python, code (run the reply against the row's tests), json_schema, judge (an LLM judge), "
        "composite (several verifiers), nemo_gym (the environment's /verify), none.",
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
        "(plus `rollout=` / `messages=` when it names those parameters; it may be async) and returning a "
        "float or a dict with `reward` and other metrics.",
    )
    options: dict[str, Any] = Field(default_factory=dict, description="Extra keyword arguments for the verifier.")
    reward_range: list[float] = Field(
        default_factory=lambda: [0.0, 1.0], min_length=2, max_length=2, description="The rewards a verifier may give, [low, high]. A reward outside it, or one that is "
        "not a finite number (NaN, inf, a string; a bool from nemo_gym's `/verify`), is a `verifier_error` naming the "
        "value (the sample fails and a rerun retries it), never clipped. Checked on the final reward (a composite's "
        "combination).")
    concurrency: int = Field(
        32, ge=1, description="Rows scored at once per scoring actor by an async verifier (judge, code, async python)."
    )
    code: CodeConfig = Field(default_factory=CodeConfig)
    sandbox: Literal["bwrap", "none"] = Field(
        "bwrap",
        description="code: how programs are isolated. `bwrap` (bubblewrap: own namespaces, no network, a "
        "read-only file system but a private tmpfs, an unprivileged user; the verifier refuses to start on a node "
        "without a working `bwrap`: `apt-get install bubblewrap`). `none`: no operating-system isolation, only "
        "resource limits and Python-level guards; UNSAFE, for trusted code only (a program can read and write "
        "what the scoring process can, e.g. API keys in other processes' environments, the run folder).",
    )
    schema_field: str = Field("schema", description="json_schema: row field holding the JSON Schema.")
    json_schema: dict[str, Any] | None = Field(
        None, description="json_schema: one schema for every row (a row's own `schema_field` wins)."
    )
    judge: JudgeConfig | None = Field(None, description="judge, or math with a judge fallback: the judge.")
    components: list["VerifierConfig"] = Field(
        default_factory=list,
        description="composite: the verifiers, each a verifier section of its own plus `weight` and `name`.",
    )
    combine: Literal["mean", "min", "all"] = Field(
        "mean", description="composite: weighted `mean` of the rewards, their `min`, or `all` (1 when all are 1)."
    )
    weight: float = Field(1.0, ge=0, description="composite component: its weight in the mean.")
    name: str | None = Field(None, description="composite component: its metric prefix (default: its type).")

    def judges(self) -> list[JudgeConfig]:
        """The judges of this section and its components."""
        return ([self.judge] if self.judge is not None else []) + [j for c in self.components for j in c.judges()]

    def vllm_judges(self) -> list[JudgeConfig]:
        """The judges of this section and its components that run a vLLM engine in the scoring actors."""
        own = [self.judge] if self.judge is not None and self.judge.model.backend == "vllm" else []
        return own + [j for c in self.components for j in c.vllm_judges()]

    @model_validator(mode="after")
    def _needs(self) -> "VerifierConfig":
        lo, hi = self.reward_range
        if not (math.isfinite(lo) and math.isfinite(hi) and lo <= hi):
            raise ValueError(f"verifier.reward_range: [{lo:g}, {hi:g}] is not a range of finite numbers, low <= high")
        if self.type == "regex" and not self.pattern:
            raise ValueError("verifier.pattern is required when verifier.type is 'regex'")
        if self.type == "python" and (not self.function or ":" not in self.function):
            raise ValueError("verifier.function must be 'module:function' when verifier.type is 'python'")
        if self.type == "judge" and self.judge is None:
            raise ValueError("verifier.judge is required when verifier.type is 'judge' (at least judge.model.name)")
        if self.type == "composite" and not self.components:
            raise ValueError("verifier.components: a composite verifier needs at least one component")
        if self.type == "composite" and sum(c.weight for c in self.components) <= 0 and self.combine == "mean":
            raise ValueError("verifier.components: the weights sum to 0")
        if self.judge is not None and self.type not in ("judge", "math"):
            raise ValueError("verifier.judge is used only by the judge and math verifiers")
        if len(self.vllm_judges()) > 1:
            raise ValueError("verifier: at most one judge with backend vllm (each would start its own engine in "
                             "every scoring actor); give the others backend openai, e.g. a vLLM server")
        if self.pattern:
            import re

            try:
                re.compile(self.pattern)
            except re.error as e:
                raise ValueError(f"verifier.pattern is not a valid regular expression: {e}") from None
        if self.json_schema is not None:
            from jsonschema import SchemaError
            from jsonschema.validators import validator_for

            try:
                validator_for(self.json_schema).check_schema(self.json_schema)
            except SchemaError as e:
                raise ValueError(f"verifier.json_schema is not a valid JSON Schema: {e.message}") from None
        return self


class AgentConfig(_Strict):
    """The episode loop, for rows with tools (or any row when an environment is set)."""

    max_steps: int = Field(8, ge=1, description="Most model calls per episode; an episode still calling "
                           "tools after that ends with termination `max_steps`.")
    timeout_s: float = Field(600.0, gt=0, description="Wall-clock bound of one whole episode (model calls, "
                             "tools, verify); past it the sample fails as `episode_timeout` and a rerun retries it.")


class EnvironmentConfig(_Strict):
    """Where tool calls run (see README, Agent rollouts)."""

    type: Literal["none", "python", "nemo_gym", "mcp"] = Field(
        "none", description="`python`: functions of a Python module; `nemo_gym`: a running NeMo Gym resources "
        "server; `mcp`: a Model Context Protocol server's tools (docs/mcp.md); `none`: no tools (rows that "
        "bring tools fail with `environment_error`).")
    module: str | None = Field(None, description="python: `package.module` or `path/to/tools.py`; its public "
                               "functions are the tools.")
    episode_class: str | None = Field(None, description="python: a class of the module made per episode (with the "
                                      "row if its constructor takes one); its public methods are the tools and its "
                                      "`close()` runs after the episode.")
    isolation: Literal["thread", "process"] = Field(
        "thread", description="python: where sync tools run. `thread`: a thread per call, off the event loop (a "
        "tool that never returns is abandoned when `agent.timeout_s` ends its episode); `process`: a worker "
        "process per episode runs every tool, killed when the episode ends or times out (for tools that may "
        "hang, crash or `os._exit`).")
    base_url: str | None = Field(None, description="nemo_gym: the resources server, e.g. http://127.0.0.1:8001.")
    timeout_s: float = Field(60.0, gt=0, description="nemo_gym: per-request timeout.")
    max_retries: int = Field(4, ge=0, description="nemo_gym: retries of a request that got no answer (and of 5xx "
                             "answers to seed_session and verify).")
    base_retry_wait_s: float = Field(0.5, ge=0, description="nemo_gym: first backoff wait; doubles each retry.")
    max_retry_wait_s: float = Field(10.0, ge=0, description="nemo_gym: cap on one backoff wait.")
    command: str | None = Field(None, description="mcp: the program that starts a stdio server (e.g. `python`, "
                                "`uvx`, `mcp-server-time`), found on PATH.")
    args: list[str] = Field(default_factory=list, description="mcp: the stdio server's arguments; relative paths are "
                            "relative to `cwd`.")
    env: dict[str, str] = Field(default_factory=dict, description="mcp: environment variables of the stdio server, "
                                "stored in run.json as written (a credential-like name is refused: use `env_from`). "
                                "The server inherits only HOME, PATH, USER, SHELL, TERM, LOGNAME besides.")
    env_from: dict[str, str] = Field(default_factory=dict, description="mcp: `{NAME: ENV_VAR}`: variables of the stdio "
                                     "server whose values are read from the driver's environment; never stored, "
                                     "logged or shown.")
    cwd: str | None = Field(None, description="mcp: the stdio server's working directory. Empty: the directory "
                            "`sft-ray run` was started in.")
    url: str | None = Field(None, description="mcp: a Streamable HTTP server's endpoint, e.g. "
                            "http://127.0.0.1:8000/mcp (instead of `command`).")
    headers_env: dict[str, str] = Field(default_factory=dict, description="mcp: `{header: ENV_VAR}`: HTTP headers "
                                        "sent to `url`, values read from the driver's environment; never stored, "
                                        "logged or shown (as `model.extra_headers_env`).")
    session: Literal["actor", "episode"] = Field("actor", description="mcp: `actor`: one server connection per "
                                                 "generation actor, shared by its episodes (stateless servers); "
                                                 "`episode`: a fresh server process (or HTTP session) per episode, "
                                                 "closed after it (stateful servers).")
    max_concurrent_calls: int = Field(16, ge=1, description="mcp: tool calls in flight at once per server "
                                      "connection.")
    call_timeout_s: float = Field(60.0, gt=0, description="mcp: bound on one tool call; a server that does not "
                                  "answer in time is taken as hung: restarted, and the episode ends as "
                                  "`environment_error`.")
    connect_timeout_s: float = Field(60.0, gt=0, description="mcp: bound on starting and initializing a server.")

    @model_validator(mode="after")
    def _mcp(self) -> "EnvironmentConfig":
        if self.type != "mcp":
            return self
        if bool(self.command) == bool(self.url):
            raise ValueError("environment.type 'mcp' needs exactly one of environment.command (a stdio server) and "
                             "environment.url (a Streamable HTTP server)")
        for name in self.env:
            if looks_secret(name):
                raise ValueError(f"environment.env.{name}: a credential does not belong in the config (run.json "
                                 f"keeps it); put it in an environment variable and name that in "
                                 f"environment.env_from, e.g. env_from: {{{name}: {name}}}")
        for name in set(self.env) & set(self.env_from):
            raise ValueError(f"environment.env.{name}: set in both env and env_from")
        return self

    def secret_env(self) -> dict[str, str]:
        """`env_from` with the values read from the environment now (ConfigError naming unset variables)."""
        return read_env_mapping(self.env_from, "environment.env_from")

    def secret_headers(self) -> dict[str, str]:
        """`headers_env` with the values read from the environment now (ConfigError naming unset variables)."""
        return read_env_mapping(self.headers_env, "environment.headers_env")

    @model_validator(mode="after")
    def _needs(self) -> "EnvironmentConfig":
        if self.type == "python" and not self.module:
            raise ValueError("environment.module is required when environment.type is 'python'")
        if self.type == "nemo_gym" and not self.base_url:
            raise ValueError("environment.base_url is required when environment.type is 'nemo_gym'")
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
    keep_invalid_tool_arguments: bool = Field(
        False, description="Agent episodes: keep those with a tool call whose arguments violate the tool's JSON "
        "Schema (num_invalid_tool_arguments > 0; the call was answered with the validation message, not run). "
        "Default: dropped."
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


class RejectionConfig(_Strict):
    """Rejection sampling: draw samples of a prompt until `target_passing` of them pass (reward >=
    `filter.min_reward`) or `max_samples` were drawn, then stop asking for that prompt. Samples of a
    prompt are drawn together up to what is still needed, so the overshoot past the target is at most
    the samples in flight for it. A rerun continues each prompt where it stopped (raising either
    number and rerunning continues too)."""

    target_passing: int | None = Field(
        None, ge=1, description="Passing samples wanted per prompt; empty: no rejection sampling (`num_repeats` "
        "samples per prompt)."
    )
    max_samples: int | None = Field(
        None, ge=1, description="Most samples drawn for one prompt (required with `target_passing`)."
    )

    @property
    def active(self) -> bool:
        return self.target_passing is not None

    @model_validator(mode="after")
    def _both(self) -> "RejectionConfig":
        if (self.target_passing is None) != (self.max_samples is None):
            raise ValueError("rejection.target_passing and rejection.max_samples go together")
        if self.active and self.max_samples < self.target_passing:
            raise ValueError("rejection.max_samples must be at least rejection.target_passing")
        return self


class ShuffleConfig(_Strict):
    seed: int = Field(0, description="Seed of the global shuffle: same seed, same order.")


# Keys a training row's format owns (sft_ray/finalize/formats.py); include_fields may not name them.
FORMAT_KEYS = frozenset({"messages", "prompt", "completion", "chosen", "rejected", "tools", "parallel_tool_calls"})


RowFormat = Literal["messages", "prompt_completion", "openai", "preference"]


class PreferenceConfig(_Strict):
    """Preference pairs (`train.format: preference`): per prompt, its best samples paired with its worst,
    for TRL's DPOTrainer. Candidates are a prompt's samples that pass every row rule of `filter` except
    the reward bounds (so a failing sample can be the rejected one), after `filter.dedup`."""

    min_margin: float = Field(
        0.5, ge=0, description="Smallest reward gap between the chosen and the rejected sample of a pair."
    )
    chosen_min_reward: float | None = Field(
        None, description="A chosen sample's reward is at least this (default: `filter.min_reward`)."
    )
    max_pairs_per_prompt: int = Field(
        1, ge=1, description="Most pairs per prompt: the best sample with the worst, then the second best with the "
        "second worst, ... (each sample in one pair at most; ties broken by the shuffle seed)."
    )


class TrainConfig(_Strict):
    format: RowFormat | list[RowFormat] = Field(
        "messages",
        description="Training-row format, or a list of formats written from one pass (each under "
        "train/<format>/ and validation/<format>/). `messages`: {messages, tools} for TRL's SFTTrainer and "
        "Hugging Face chat templates (tool-call arguments as JSON objects); `prompt_completion`: TRL's "
        "conversational prompt/completion (completion = the generated turns, for completion-only loss); `openai`: "
        "OpenAI fine-tuning JSONL (arguments as JSON strings, parallel_tool_calls); `preference`: TRL's "
        "conversational preference rows {prompt, chosen, rejected, tools}, one per pair (rules: `preference.*`).",
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

    @property
    def formats(self) -> list[str]:
        """The formats written, in the order given (one, or several from one pass)."""
        return row_formats(self.format)

    @model_validator(mode="after")
    def _include(self) -> "TrainConfig":
        if isinstance(self.format, list):
            if not self.format:
                raise ValueError("train.format: an empty list; give a format or a list of formats")
            if len(set(self.format)) != len(self.format):
                raise ValueError(f"train.format: a format listed twice in {self.format}")
            if len(self.format) == 1:
                self.format = self.format[0]  # one format: the single-format layout
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


def row_formats(fmt: str | list[str]) -> list[str]:
    """``train.format`` as a list (a single format, or the formats written from one pass)."""
    return [fmt] if isinstance(fmt, str) else list(fmt)


class ReadConfig(_Strict):
    skip_bad_lines: bool = Field(
        False, description="Skip and count malformed input lines instead of stopping at the first."
    )
    limit: int | None = Field(
        None, ge=1, description="Use only the first N rows of the whole input, files in name order (for trials, as "
        "NeMo Gym's `limit`). Part of the run fingerprint: a resume with another limit is refused."
    )
    allow_empty: bool = Field(
        False, description="Accept an input with no rows (empty or blank files, or every line skipped as bad): "
        "the run then finishes with empty outputs. By default such an input is refused (exit 2), as it is "
        "almost always a wrong path or an unfinished export."
    )


class ResourcesConfig(_Strict):
    """Actor pools; the defaults suit one machine."""

    @field_validator("generate_actors", "score_actors")
    @classmethod
    def _actor_range(cls, v: int | tuple[int, int]) -> int | tuple[int, int]:
        lo, hi = (v, v) if isinstance(v, int) else v
        if lo < 1 or hi < 1:
            raise ValueError("actor counts must be at least 1")
        if lo > hi:
            raise ValueError(f"[min, max] has min {lo} greater than max {hi}")
        return v

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
    score_num_gpus: float = Field(
        0, ge=0, description="GPUs per scoring actor, for a judge with backend vllm (its engine runs in each scoring "
        "actor; with the judge's tensor_parallel_size > 1 the actor takes none and its engine gets a placement "
        "group of that many GPUs, as generation does).")
    batch_size: int | None = Field(
        None, ge=1, description="Rows per batch sent to a generation actor (default: derived from concurrency)."
    )
    stall_warning_s: float = Field(
        60.0, ge=0, description="Seconds without a finished sample after which the run prints what is going on, "
        "again every as many seconds while it lasts: what each generation actor has in flight (an engine loading, "
        "model calls, tool calls by name, with their age) and what Ray is waiting for (pending resource demands "
        "against free resources per node, and how to fix it); 0 turns it off."
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


class BudgetConfig(_Strict):
    """Spending limits for the whole run folder, all runs together: once the next request could pass
    one, no new request starts, what is in flight finishes, the run finalizes what it has, reports
    `stopped: budget` and exits with code 5; a rerun with a raised budget continues."""

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
    agent: AgentConfig = Field(default_factory=AgentConfig)
    environment: EnvironmentConfig = Field(default_factory=EnvironmentConfig)
    filter: FilterConfig = Field(default_factory=FilterConfig)
    rejection: RejectionConfig = Field(default_factory=RejectionConfig)
    shuffle: ShuffleConfig = Field(default_factory=ShuffleConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    preference: PreferenceConfig = Field(default_factory=PreferenceConfig)
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
        if self.verifier.type == "nemo_gym" and self.environment.type != "nemo_gym":
            raise ValueError("verifier.type nemo_gym asks the episode's resources server for the reward: "
                             "set environment.type=nemo_gym and environment.base_url")
        if isinstance(self.num_samples_in_parallel, int) and self.num_samples_in_parallel < 1:
            raise ValueError("num_samples_in_parallel must be a positive integer or 'auto'")
        if self.budget.max_cost_usd is not None and not (self.pricing.input_per_mtok or self.pricing.output_per_mtok):
            raise ValueError("budget.max_cost_usd needs pricing.input_per_mtok / pricing.output_per_mtok")
        if self.rejection.active:
            if self.num_repeats != 1:
                raise ValueError("num_repeats and rejection.* both set how many samples a prompt gets: "
                                 "with rejection sampling leave num_repeats at 1")
            if self.verifier.type == "none":
                raise ValueError("rejection sampling keeps drawing until samples pass: it needs a verifier "
                                 "(verifier.type is none)")
            if self.verifier.vllm_judges():
                raise ValueError("rejection sampling scores each sample in the generation actor, where a vLLM "
                                 "judge's engine has no place: use a hosted judge (verifier.judge.model.backend: "
                                 "openai, e.g. a vLLM server)")
            if "min_reward" not in self.filter.model_fields_set:
                raise ValueError("rejection sampling counts samples with reward >= filter.min_reward as passing: "
                                 "set filter.min_reward (e.g. 1.0)")
        if self.model.backend == "vllm" and (self.rate_limit.per_minute() or self.budget.active()
                                             or self.num_samples_in_parallel == "auto"):
            raise ValueError("rate_limit, budget and num_samples_in_parallel: auto apply to the openai backend")
        if self.model.batch.enabled:
            if self.model.backend != "openai":
                raise ValueError("model.batch.enabled sends requests through a hosted provider's Batch API: it "
                                 "needs model.backend openai")
            if self.num_samples_in_parallel == "auto" or self.rate_limit.per_minute():
                raise ValueError("rate_limit and num_samples_in_parallel: auto pace online requests; a Batch API "
                                 "run has no use for them (model.batch.max_in_flight bounds its batches)")
        for judge in self.verifier.judges():
            if judge.model.batch.enabled:
                raise ValueError("verifier.judge.model.batch: the Batch API is for the generation model only")
        if self.model.backend == "vllm" and self.model.omit_params:
            raise ValueError("model.omit_params applies to the openai backend (vllm takes every sampling key)")
        return self

    @property
    def adaptive(self) -> bool:
        """Whether concurrency is adapted at run time (`num_samples_in_parallel: auto`)."""
        return self.num_samples_in_parallel == "auto"

    @property
    def max_in_flight(self) -> int:
        """The most requests in flight across all generation actors (the ceiling with `auto`)."""
        return self.rate_limit.max_concurrency if self.adaptive else int(self.num_samples_in_parallel)
