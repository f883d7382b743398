"""``RunConfig``, a whole `sft-ray run`, with the sections of its own: ``read``, ``rejection``,
``resources``, ``rate_limit`` and ``budget``."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import AliasChoices, Field, field_validator, model_validator

from sft_ray.config.base import Strict, flat_dump, own_keys
from sft_ray.config.episodes import AgentConfig, EnvironmentConfig
from sft_ray.config.model import AnthropicModelConfig, HostedModelConfig, ModelConfig, OpenAIModelConfig, PricingConfig
from sft_ray.config.output import DecontaminateConfig, FilterConfig, PreferenceConfig, ShuffleConfig, TrainConfig
from sft_ray.config.sampling import SamplingConfig
from sft_ray.config.verifier import ExactMatchVerifier, VerifierConfig
from sft_ray.config.watch import MetricsConfig, ReportConfig


class RejectionConfig(Strict):
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


class ReadConfig(Strict):
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
    rename: dict[str, str] = Field(
        default_factory=dict, description="Input columns (or JSONL fields) to rename, `{column: field}`, before a row "
        "is read as a prompt: `{question: prompt, answer: expected_answer}` reads a Parquet file whose columns are "
        "`question` and `answer` as plain prompt rows with a reference answer. Top-level fields only; a row that "
        "would then have a field twice is a bad row. Part of the run fingerprint."
    )

    @field_validator("rename")
    @classmethod
    def _rename_targets(cls, v: dict[str, str]) -> dict[str, str]:
        if any(not k or not f for k, f in v.items()):
            raise ValueError("column and field names must not be empty")
        seen: dict[str, str] = {}
        for column, name in v.items():
            if name in seen:
                raise ValueError(f"{seen[name]} and {column} are both renamed to {name}")
            seen[name] = column
        return v


class ResourcesConfig(Strict):
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


class RateLimitConfig(Strict):
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


class BudgetConfig(Strict):
    """Spending limits for the whole run folder, all runs together: once the next request could pass
    one, no new request starts, what is in flight finishes, the run finalizes what it has, reports
    `stopped: budget` and exits with code 5; a rerun with a raised budget continues."""

    max_cost_usd: float | None = Field(None, gt=0, description="Most USD spent (needs `pricing`).")
    max_output_tokens: int | None = Field(None, ge=1, description="Most output tokens generated.")
    max_requests: int | None = Field(None, ge=1, description="Most HTTP requests sent (retries count).")

    def active(self) -> bool:
        return any(v is not None for v in (self.max_cost_usd, self.max_output_tokens, self.max_requests))


class RunConfig(Strict):
    """A whole `sft-ray run`."""

    input: str = Field(
        validation_alias=AliasChoices("input", "input_jsonl_fpath"),
        description="Prompt JSONL: a file, a folder, or a glob (s3:// and gs:// URIs too).",
    )
    output: str = Field(
        validation_alias=AliasChoices("output", "output_dir"),
        description="Run folder: rollouts/, failed/, train/, stats.json.",
    )
    model: ModelConfig = Field(default_factory=OpenAIModelConfig)
    responses_create_params: SamplingConfig = Field(default_factory=SamplingConfig)
    num_samples_in_parallel: int | Literal["auto"] = Field(
        64, description="Requests in flight across all generation actors together; `auto`: adapted while the "
        "run goes (grows while latency and errors stay flat, halves on 429s and timeouts), up to "
        "`rate_limit.max_concurrency`."
    )
    num_repeats: int = Field(1, ge=1, description="Samples per prompt, each with its own sample_index and seed.")
    verifier: VerifierConfig = Field(default_factory=ExactMatchVerifier)
    agent: AgentConfig = Field(default_factory=AgentConfig)
    environment: EnvironmentConfig = Field(default_factory=EnvironmentConfig)
    filter: FilterConfig = Field(default_factory=FilterConfig)
    rejection: RejectionConfig = Field(default_factory=RejectionConfig)
    shuffle: ShuffleConfig = Field(default_factory=ShuffleConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    preference: PreferenceConfig = Field(default_factory=PreferenceConfig)
    read: ReadConfig = Field(default_factory=ReadConfig)
    decontaminate: DecontaminateConfig = Field(default_factory=DecontaminateConfig)
    resources: ResourcesConfig = Field(default_factory=ResourcesConfig)
    rate_limit: RateLimitConfig = Field(default_factory=RateLimitConfig)
    pricing: PricingConfig = Field(default_factory=PricingConfig)
    budget: BudgetConfig = Field(default_factory=BudgetConfig)
    metrics: MetricsConfig = Field(default_factory=MetricsConfig)
    report: ReportConfig = Field(default_factory=ReportConfig)
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
    def _model_name(self) -> RunConfig:
        if isinstance(self.model, HostedModelConfig) and not self.model.name:
            raise ValueError(f"model.name is required with the {self.model.backend} backend (the name the API "
                             "serves)")
        if isinstance(self.model, AnthropicModelConfig):
            self._anthropic(self.model)
        if self.verifier.type == "nemo_gym" and self.environment.type != "nemo_gym":
            raise ValueError("verifier.type nemo_gym asks the episode's resources server for the reward: "
                             "set environment.type=nemo_gym and environment.base_url")
        if isinstance(self.num_samples_in_parallel, int) and self.num_samples_in_parallel < 1:
            raise ValueError("num_samples_in_parallel must be a positive integer or 'auto'")
        if self.budget.max_cost_usd is not None and not (self.pricing.input_per_mtok or self.pricing.output_per_mtok):
            raise ValueError("budget.max_cost_usd needs pricing.input_per_mtok / pricing.output_per_mtok")
        if self.model.backend == "vllm" and (self.rate_limit.per_minute() or self.budget.active()
                                             or self.num_samples_in_parallel == "auto"):
            raise ValueError("rate_limit, budget and num_samples_in_parallel: auto apply to the hosted backends "
                             "(openai, anthropic)")
        if self.model.batch.enabled:  # a hosted backend's key (with vllm, `batch` is refused as unknown)
            if self.num_samples_in_parallel == "auto" or self.rate_limit.per_minute():
                raise ValueError("rate_limit and num_samples_in_parallel: auto pace online requests; a Batch API "
                                 "run has no use for them (model.batch.max_in_flight bounds its batches)")
        for judge in self.verifier.judges():
            if judge.model.batch.enabled:
                raise ValueError("verifier.judge.model.batch: the Batch API is for the generation model only")
        return self

    def _anthropic(self, model: AnthropicModelConfig) -> None:
        """What the Messages API refuses, said before anything is sent (rows' own values are checked by the
        API: a refusal is that sample's failure, naming the API's words)."""
        p = self.responses_create_params
        if p.max_output_tokens is None:
            raise ValueError("responses_create_params.max_output_tokens: the Messages API requires max_tokens on "
                             "every request (backend anthropic): set it, e.g. 4096")
        if p.temperature is not None and p.temperature > 1:
            raise ValueError(f"responses_create_params.temperature: {p.temperature} is over the Messages API's "
                             "range 0..1 (backend anthropic)")
        if model.thinking is None:
            return
        budget = model.thinking.budget_tokens
        if p.max_output_tokens <= budget:
            raise ValueError(f"model.thinking.budget_tokens: {budget} must be less than "
                             f"responses_create_params.max_output_tokens ({p.max_output_tokens}), which thinking "
                             "counts toward")
        if p.temperature not in (None, 1.0):
            raise ValueError(f"responses_create_params.temperature: {p.temperature} is refused with model.thinking "
                             "(the API takes only 1 with thinking on): set it to 1 or null")
        if p.top_k is not None:
            raise ValueError("responses_create_params.top_k: refused with model.thinking (the API takes no top_k "
                             "with thinking on)")
        if p.top_p is not None and p.top_p < 0.95:
            raise ValueError(f"responses_create_params.top_p: {p.top_p} is refused with model.thinking (the API "
                             "takes 0.95 to 1 with thinking on)")
        forced = p.tool_choice
        if forced == "required" or isinstance(forced, dict):
            raise ValueError("responses_create_params.tool_choice: a forced tool choice is refused with "
                             "model.thinking (the API takes only auto or none with thinking on)")

    @model_validator(mode="after")
    def _rejection_needs(self) -> RunConfig:
        if not self.rejection.active:
            return self
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
        return self

    @property
    def adaptive(self) -> bool:
        """Whether concurrency is adapted at run time (`num_samples_in_parallel: auto`)."""
        return self.num_samples_in_parallel == "auto"

    @property
    def max_requests_in_flight(self) -> int:
        """The most requests in flight across all generation actors (the ceiling with `auto`)."""
        return self.rate_limit.max_concurrency if self.adaptive else int(self.num_samples_in_parallel)

    def stored(self) -> dict[str, Any]:
        """The config as run.json keeps it: JSON values, each union section flat (:func:`flat_dump`)."""
        return flat_dump(self, "json")


def from_stored(config: dict[str, Any]) -> dict[str, Any]:
    """run.json's config (:meth:`RunConfig.stored`) as a section-by-type config that validates again:
    the model and verifier sections (the judges' and components' too) keep their own member's keys."""
    data = dict(config)
    if "model" in data:
        data["model"] = own_keys(data["model"], "backend", "openai")
    if "verifier" in data:
        data["verifier"] = _own_verifier(data["verifier"])
    return data


def _own_verifier(v: Any) -> Any:
    v = own_keys(v, "type", "exact_match")
    if not isinstance(v, dict):
        return v
    v = dict(v)
    if isinstance(v.get("judge"), dict):
        v["judge"] = {**v["judge"], "model": own_keys(v["judge"].get("model"), "backend", "openai")}
    if isinstance(v.get("components"), list):
        v["components"] = [_own_verifier(c) for c in v["components"]]
    return v
