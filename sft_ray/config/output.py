"""What finalize makes of the rollouts: ``filter``, ``shuffle``, ``train`` and ``preference``."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from sft_ray.config.base import Strict


class FilterConfig(Strict):
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


class ShuffleConfig(Strict):
    seed: int = Field(0, description="Seed of the global shuffle: same seed, same order.")


# Keys a training row's format owns (sft_ray/finalize/formats.py); include_fields may not name them.
FORMAT_KEYS = frozenset({"messages", "prompt", "completion", "chosen", "rejected", "tools", "parallel_tool_calls"})


RowFormat = Literal["messages", "prompt_completion", "openai", "preference"]


class PreferenceConfig(Strict):
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


class TrainConfig(Strict):
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
