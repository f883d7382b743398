"""The run configuration: pydantic models, validated at the edge.

The CLI turns a YAML file plus ``dotted.key=value`` overrides into a :class:`RunConfig`
(sft_ray/configload.py); everything downstream (Ray actors included) receives plain values taken
from it. Field descriptions are the reference documentation (``sft-ray validate --schema`` prints
them; docs/config.md is generated from them). Names follow NeMo Gym where one exists
(``responses_create_params``, ``num_repeats``, ``num_samples_in_parallel``).

Where each section lives:

- ``base``: :class:`ConfigError`, strict sections, credential checks, and the tagged unions
  (one model per verifier type and per model backend) with their flat form for run.json;
- ``model``: ``model`` (and a judge's ``model``): one section per backend, :data:`ModelConfig`;
- ``sampling``: ``responses_create_params``;
- ``verifier``: ``verifier``: one section per type, :data:`VerifierConfig`, and the judge;
- ``episodes``: ``agent`` and ``environment``;
- ``output``: what finalize makes: ``filter``, ``shuffle``, ``train``, ``preference``, ``decontaminate``;
- ``run``: :class:`RunConfig` with ``read``, ``rejection``, ``resources``, ``rate_limit``, ``budget``;
- ``watch``: ``metrics`` and ``report``: watching a run (Prometheus, the live view in the run folder).

``from sft_ray.config import X`` is the way in: every public name is here.
"""

from sft_ray.config.base import (
    ConfigError,
    Tagged,
    applies_to,
    flat_dump,
    foreign_key,
    looks_secret,
    member_of,
    read_env_mapping,
    union_members,
)
from sft_ray.config.episodes import AgentConfig, EnvironmentConfig
from sft_ray.config.model import (
    MODEL_BACKENDS,
    AnthropicModelConfig,
    BatchConfig,
    HostedModelConfig,
    ModelConfig,
    OpenAIModelConfig,
    PricingConfig,
    VllmModelConfig,
)
from sft_ray.config.output import (
    FORMAT_KEYS,
    BenchmarkSource,
    DecontaminateConfig,
    FilterConfig,
    PreferenceConfig,
    RowFormat,
    ShuffleConfig,
    TrainConfig,
    row_formats,
)
from sft_ray.config.run import (
    BudgetConfig,
    RateLimitConfig,
    ReadConfig,
    RejectionConfig,
    ResourcesConfig,
    RunConfig,
    from_stored,
)
from sft_ray.config.sampling import ROW_PARAM_KEYS, SamplingConfig
from sft_ray.config.verifier import VERIFIER_TYPES, CodeConfig, JudgeConfig, VerifierBase, VerifierConfig
from sft_ray.config.watch import MetricsConfig, ReportConfig

__all__ = [
    "MODEL_BACKENDS", "VERIFIER_TYPES", "AgentConfig", "AnthropicModelConfig", "BatchConfig", "BudgetConfig", "CodeConfig",
    "ConfigError", "BenchmarkSource", "DecontaminateConfig", "EnvironmentConfig", "FORMAT_KEYS", "FilterConfig",
    "HostedModelConfig", "JudgeConfig", "MetricsConfig", "ModelConfig",
    "OpenAIModelConfig", "PreferenceConfig", "PricingConfig", "ROW_PARAM_KEYS", "RateLimitConfig", "ReadConfig",
    "RejectionConfig", "ReportConfig", "ResourcesConfig", "RowFormat", "RunConfig", "SamplingConfig", "ShuffleConfig", "Tagged",
    "TrainConfig", "VerifierBase", "VerifierConfig", "VllmModelConfig", "flat_dump", "foreign_key", "from_stored",
    "looks_secret", "member_of", "read_env_mapping", "row_formats", "applies_to", "union_members",
]
