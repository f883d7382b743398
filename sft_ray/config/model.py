"""``model`` (and ``verifier.judge.model``): which model answers and how to reach it, one section per
backend. A new backend is one more member of :data:`ModelConfig`: a class with ``backend:
Literal["<name>"]`` (a hosted HTTP provider subclasses :class:`HostedModelConfig`), listed in the union
at the bottom, with its backend module under sft_ray/backends/."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from sft_ray.config.base import ConfigError, Strict, Tagged, env_var_name, looks_secret, tagged_union
from sft_ray.config.sampling import SamplingConfig

# vLLM's StructuredOutputsParams (0.32): the constraint kinds (exactly one is given) and the options.
_STRUCTURED_KINDS = frozenset({"choice", "regex", "json", "grammar", "json_object", "structural_tag"})
_STRUCTURED_OPTIONS = frozenset({"disable_any_whitespace", "disable_additional_properties", "whitespace_pattern"})


class PricingConfig(Strict):
    """Prices of a model, in USD per million tokens. At the top level, the generation model's: the cost in
    stats.json, the progress line and `budget.max_cost_usd`; under `verifier.judge`, the judge's: its cost
    in stats.json's `spend`, apart and in the total."""

    input_per_mtok: float = Field(0.0, ge=0, description="USD per million input tokens.")
    output_per_mtok: float = Field(
        0.0, ge=0, description="USD per million output tokens (reasoning tokens are billed as output).")
    cache_write_per_mtok: float | None = Field(
        None, ge=0, description="USD per million input tokens written to the prompt cache (`backend: anthropic`, "
        "`model.prompt_caching`). Empty: 1.25x `input_per_mtok`, Anthropic's price for 5-minute cache writes.")
    cache_read_per_mtok: float | None = Field(
        None, ge=0, description="USD per million input tokens read from the prompt cache. Empty: 0.1x "
        "`input_per_mtok`, Anthropic's price for cache hits.")
    batch_discount: float = Field(
        0.5, gt=0, le=1, description="With `model.batch.enabled`: the share of the prices above that a provider's "
        "Batch API bills (OpenAI and Anthropic: 0.5, cache prices included); the cost in stats.json, the budget "
        "and `--dry-run` use it.")


class BatchConfig(Strict):
    """The provider's Batch API (OpenAI's `/v1/files` + `/v1/batches`, the OpenAI-compatible batch endpoints
    of other providers, and Anthropic's Message Batches): requests are sent in batches and answered within a
    completion window, at batch prices. Every batch is recorded in the run folder (`batches.jsonl`) before the driver waits on it, so a killed
    client's rerun polls the same batches and nothing is submitted twice. See docs/batch.md."""

    enabled: bool = Field(
        False, description="Send generation through the Batch API instead of online requests (`backend: openai` "
        "with `api: chat` or `responses`, or `backend: anthropic`; rejection sampling and agent episodes go in "
        "rounds, see docs/batch.md).")
    completion_window: str = Field("24h", description="The batch's completion window (OpenAI accepts `24h`; "
                                   "Anthropic's batches always have 24 hours and take no window).")
    max_requests: int = Field(50_000, ge=1, description="Most requests per batch file (OpenAI: 50,000; capped at "
                              "Anthropic's 100,000 with `backend: anthropic`).")
    max_bytes: int = Field(200_000_000, ge=1024, description="Most bytes per batch file (OpenAI: 200 MB; capped at "
                           "Anthropic's 256 MB with `backend: anthropic`).")
    poll_interval_s: float = Field(
        30.0, gt=0, description="Longest wait between polls of a batch's status; polls start faster (a tenth of "
        "it) and back off by half again each time nothing changed.")
    max_in_flight: int = Field(4, ge=1, description="Most batches submitted and not yet collected at once.")


BACKEND_DOC = ("`openai`: any OpenAI-compatible HTTP endpoint; `anthropic`: Anthropic's Messages API (Claude, "
               "with extended thinking, prompt caching and Message Batches); `vllm`: engines inside the Ray actors. "
               "The other keys of this section depend on it: a key of another backend is refused.")


class ModelBase(Tagged):
    """What every backend's section has."""

    TAG = "backend"

    backend: str = Field(description=BACKEND_DOC)
    name: str | None = Field(
        None,
        description="Model name sent to the API (openai) or a Hugging Face id / local folder (vllm). "
        "Empty with vllm: the embedded default model.",
    )
    extra_body: dict[str, Any] = Field(
        default_factory=dict, description="Extra JSON fields merged into every request body (openai). With vllm "
        "only `structured_outputs` is read: vLLM's structured output, as its server takes it in a request body "
        "(one of `choice`, `regex`, `json`, `grammar`, `json_object`, `structural_tag`), e.g. "
        "`{structured_outputs: {choice: [yes, no]}}`."
    )


class HostedModelConfig(ModelBase):
    """A model behind an HTTP API: where it is, the credentials (named, never written), timeouts and
    retries. Each hosted provider's section subclasses it with its own `backend` and keys."""

    base_url: str = Field(
        "https://api.openai.com/v1", description="API root ending in /v1 (openai backend)."
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
    batch: BatchConfig = Field(default_factory=BatchConfig)

    @field_validator("omit_params")
    @classmethod
    def _known_params(cls, names: list[str]) -> list[str]:
        unknown = [n for n in names if n not in SamplingConfig.model_fields]
        if unknown:
            raise ValueError(f"not a responses_create_params key: {', '.join(unknown)} (one of "
                             f"{', '.join(SamplingConfig.model_fields)})")
        return list(dict.fromkeys(names))

    @model_validator(mode="after")
    def _no_literal_credentials(self) -> HostedModelConfig:
        for name in self.extra_headers:
            if looks_secret(name):
                raise ValueError(
                    f"model.extra_headers.{name}: a credential does not belong in the config (run.json keeps "
                    f"it); put it in an environment variable and name that in model.extra_headers_env, "
                    f"e.g. extra_headers_env: {{{name}: MY_{env_var_name(name)}}}")
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


class OpenAIModelConfig(HostedModelConfig):
    """`backend: openai`: any OpenAI-compatible endpoint (Chat Completions or the Responses API)."""

    backend: Literal["openai"] = Field("openai", description=BACKEND_DOC)
    api: Literal["chat", "responses"] = Field(
        "chat", description="`chat`: POST {base_url}/chat/completions; `responses`: POST {base_url}/responses."
    )
    send_seed: bool = Field(
        True, description="Send the per-sample `seed` with chat requests (the Responses API has no seed field)."
    )
    max_tokens_field: Literal["max_tokens", "max_completion_tokens"] = Field(
        "max_tokens", description="Chat Completions: the body field that carries `max_output_tokens` "
        "(OpenAI's reasoning models want `max_completion_tokens`)."
    )


class ThinkingConfig(Strict):
    """Extended thinking: the model reasons before it answers, within a budget of output tokens."""

    budget_tokens: int = Field(ge=1024, description="Most tokens the model may think (the API's minimum is 1024); "
                               "`max_output_tokens` must exceed it, as thinking counts toward it.")


class AnthropicModelConfig(HostedModelConfig):
    """`backend: anthropic`: Anthropic's Messages API (`POST {base_url}/v1/messages`, headers `x-api-key` and
    `anthropic-version`), with extended thinking, prompt caching and Message Batches. See docs/hosted-apis.md."""

    backend: Literal["anthropic"] = Field("anthropic", description=BACKEND_DOC)
    base_url: str = Field("https://api.anthropic.com", description="API root, without /v1 (requests go to "
                          "{base_url}/v1/messages).")
    api_key_env: str | None = Field(
        "ANTHROPIC_API_KEY", description="Name of the environment variable that holds the API key (sent as "
        "`x-api-key`). The key itself never goes into the config, logs or outputs.")
    anthropic_version: str = Field("2023-06-01", description="The API version sent as `anthropic-version`; "
                                   "request bodies follow its rules.")
    thinking: ThinkingConfig | None = Field(
        None, description="Extended thinking, e.g. `{budget_tokens: 4096}`: sent as `thinking: {type: enabled, "
        "budget_tokens}`; the thinking is the rollout's `reasoning` (see `train.reasoning`). Refused at validate "
        "when `max_output_tokens` does not exceed the budget, or with `temperature` other than 1, `top_k`, "
        "`top_p` below 0.95 or a forced `tool_choice` (the API refuses them with thinking on).")
    prompt_caching: bool = Field(
        True, description="Mark the tools, the system prompt and an episode's growing prefix as cacheable "
        "(`cache_control`, at most 4 breakpoints per request): later requests read them at a tenth of the input "
        "price, writes cost 1.25x (see `pricing.cache_*`). A prefix shorter than the model's minimum (1024 tokens "
        "for most models) is not cached by the API and costs nothing extra.")

    @field_validator("base_url")
    @classmethod
    def _no_v1(cls, url: str) -> str:
        if url.rstrip("/").endswith("/v1"):
            raise ValueError("the API root without /v1 (requests go to {base_url}/v1/messages), e.g. "
                             "https://api.anthropic.com")
        return url


class VllmModelConfig(ModelBase):
    """`backend: vllm`: a vLLM engine inside each Ray actor that needs one."""

    backend: Literal["vllm"] = Field("vllm", description=BACKEND_DOC)
    engine_kwargs: dict[str, Any] = Field(
        default_factory=dict,
        description="vllm backend: engine options passed through (max_model_len, gpu_memory_utilization, "
        "enable_prefix_caching, dtype, tensor_parallel_size, max_num_seqs, ...). On a CPU, unless given here: "
        "dtype float32, enforce_eager, max_model_len 4096, no chunked prefill. On a CPU, "
        "distributed_executor_backend: uni runs the model inside vLLM's engine core process (sft-ray sets "
        "VLLM_ENABLE_V1_MULTIPROCESSING=0 for it unless that variable is set): the engine is ready ~20 s sooner, "
        "but serves slower with many requests in flight; for short runs.",
    )
    tool_parser: str | None = Field(
        None,
        description="vllm backend: vLLM's tool parser that turns the model's text into tool calls on rows with "
        "`tools` (`hermes`, `llama3_json`, `pythonic`, `mistral`, ...; the one vLLM's server would use for the "
        "model). Empty: `hermes` for the embedded model; other models then fail rows that have tools.",
    )
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
    def _tp(self) -> VllmModelConfig:
        tp = self.engine_kwargs.get("tensor_parallel_size", 1)
        if not isinstance(tp, int) or tp < 1:
            raise ValueError("model.engine_kwargs.tensor_parallel_size must be a positive integer")
        return self

    @model_validator(mode="after")
    def _vllm_body(self) -> VllmModelConfig:
        if not self.extra_body:
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

    @property
    def batch(self) -> BatchConfig:
        """An engine has no Batch API: never enabled (as read by the run's checks and the driver)."""
        return BatchConfig()

    def api_key(self) -> str | None:
        """No key: the engine runs in the actors."""
        return None

    def secret_headers(self) -> dict[str, str]:
        """No headers: the engine runs in the actors."""
        return {}


# A new backend goes in this list (its `backend` value is its tag); the first is the default.
MODEL_BACKENDS: list[type[Tagged]] = [OpenAIModelConfig, VllmModelConfig, AnthropicModelConfig]
ModelConfig = tagged_union(MODEL_BACKENDS, default="openai", phrase="the {} backend")
"""The ``model`` section: one of :data:`MODEL_BACKENDS`, picked by its ``backend`` key."""
