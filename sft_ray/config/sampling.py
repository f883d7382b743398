"""``responses_create_params``: the sampling defaults of every row, and the keys a row may carry."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from sft_ray.config.base import Strict


class SamplingConfig(Strict):
    """Defaults for every row's `responses_create_params`; a row's own values win.

    Unknown keys are refused (a typo such as `temprature` would otherwise be dropped
    without a word); fields an API has beyond these go in `model.extra_body`.
    """

    temperature: float | None = Field(1.0, ge=0, le=2, description="Sampling temperature.")
    top_p: float | None = Field(1.0, gt=0, le=1, description="Nucleus sampling mass.")
    top_k: int | None = Field(None, ge=1, description="Sample from the k most likely tokens only (`backend: "
                              "anthropic`; not sent to OpenAI-compatible APIs, which have no such field).")
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

