"""``verifier``: how each response is scored, one section per verifier type. A new type is one more
member of :data:`VerifierConfig`: a class with ``type: Literal["<name>"]`` and its own keys, listed in
:data:`VERIFIER_TYPES`, with its scorer registered in sft_ray/verifiers/."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from sft_ray.config.base import Strict, Tagged, tagged_union
from sft_ray.config.model import HostedModelConfig, ModelConfig, PricingConfig
from sft_ray.config.sampling import SamplingConfig


class CodeConfig(Strict):
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
        True, description="HumanEval / MBPP style: what the entry point returns crosses to the checks (another "
        "interpreter) as plain data (builtin types), else the test fails: an object whose class claims to equal "
        "anything cannot pass `assert candidate(x) == y`. Only `true` (objects of the program's classes cannot cross)."
    )


class JudgeConfig(Strict):
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
    def _judge_model(self) -> JudgeConfig:
        if isinstance(self.model, HostedModelConfig) and not self.model.name:
            raise ValueError(f"verifier.judge.model.name is required with the {self.model.backend} backend (the name "
                             "the judge's API serves; backend vllm with no name runs the embedded default model)")
        if self.model.backend == "anthropic" and not self.responses_create_params.get("max_output_tokens"):
            raise ValueError("verifier.judge.responses_create_params.max_output_tokens: the Messages API requires "
                             "max_tokens on every request (judge backend anthropic): set it, e.g. 1024")
        if self.template not in ("equivalence", "score") and not Path(self.template).is_file():
            raise ValueError(f"verifier.judge.template: not `equivalence`, `score` or an existing file: "
                             f"{self.template}")
        return self



TYPE_DOC = ("Verifier: exact_match, math (math-verify; with `judge`, a judge when it finds no match), mcq, "
            "regex, python, code (run the reply against the row's tests), json_schema, judge (an LLM judge), "
            "composite (several verifiers), nemo_gym (the environment's /verify), none. The other keys of this "
            "section depend on it: a key of another type is refused.")


class VerifierBase(Tagged):
    """What every verifier type's section has (a composite's components included)."""

    TAG = "type"

    type: str = Field(description=TYPE_DOC)
    answer_field: str = Field("expected_answer", description="Row field holding the reference answer.")
    options: dict[str, Any] = Field(default_factory=dict, description="Extra keyword arguments for the verifier.")
    reward_range: list[float] = Field(
        default_factory=lambda: [0.0, 1.0], min_length=2, max_length=2, description="The rewards a verifier may give, [low, high]. A reward outside it, or one that is "
        "not a finite number (NaN, inf, a string; a bool from nemo_gym's `/verify`), is a `verifier_error` naming the "
        "value (the sample fails and a rerun retries it), never clipped. Checked on the final reward (a composite's "
        "combination).")
    concurrency: int = Field(
        32, ge=1, description="Rows scored at once per scoring actor by an async verifier (judge, code, async python)."
    )
    weight: float = Field(1.0, ge=0, description="composite component: its weight in the mean.")
    name: str | None = Field(None, description="composite component: its metric prefix (default: its type).")

    def judges(self) -> list[JudgeConfig]:
        """The judges of this section and its components."""
        return []

    def vllm_judges(self) -> list[JudgeConfig]:
        """The judges of this section and its components that run a vLLM engine in the scoring actors."""
        return [j for j in self.judges() if j.model.backend == "vllm"]

    @model_validator(mode="after")
    def _range(self) -> VerifierBase:
        lo, hi = self.reward_range
        if not (math.isfinite(lo) and math.isfinite(hi) and lo <= hi):
            raise ValueError(f"verifier.reward_range: [{lo:g}, {hi:g}] is not a range of finite numbers, low <= high")
        return self


class ExactMatchVerifier(VerifierBase):
    """`type: exact_match`: the normalised reply equals the reference answer."""

    type: Literal["exact_match"] = Field("exact_match", description=TYPE_DOC)


class McqVerifier(VerifierBase):
    """`type: mcq`: the reply's chosen option letter equals the reference's."""

    type: Literal["mcq"] = Field("mcq", description=TYPE_DOC)


class NemoGymVerifier(VerifierBase):
    """`type: nemo_gym`: the reward of the episode's resources server (its /verify)."""

    type: Literal["nemo_gym"] = Field("nemo_gym", description=TYPE_DOC)


class NoVerifier(VerifierBase):
    """`type: none`: no reward."""

    type: Literal["none"] = Field("none", description=TYPE_DOC)


class RegexVerifier(VerifierBase):
    """`type: regex`: a pattern searched in the reply."""

    type: Literal["regex"] = Field("regex", description=TYPE_DOC)
    pattern: str | None = Field(
        None,
        description="regex: pattern searched in the response. With a capture group, group 1 is compared "
        "with the reference answer; without one, a match scores 1.",
    )

    @model_validator(mode="after")
    def _pattern(self) -> RegexVerifier:
        if not self.pattern:
            raise ValueError("verifier.pattern is required when verifier.type is 'regex'")
        import re

        try:
            re.compile(self.pattern)
        except re.error as e:
            raise ValueError(f"verifier.pattern is not a valid regular expression: {e}") from None
        return self


class PythonVerifier(VerifierBase):
    """`type: python`: a function of the user's."""

    type: Literal["python"] = Field("python", description=TYPE_DOC)
    function: str | None = Field(
        None,
        description="python: `module:function` or `path/to/file.py:function`, called as fn(row, response) "
        "(plus `rollout=` / `messages=` when it names those parameters; it may be async) and returning a "
        "float or a dict with `reward` and other metrics.",
    )

    @model_validator(mode="after")
    def _function(self) -> PythonVerifier:
        if not self.function or ":" not in self.function:
            raise ValueError("verifier.function must be 'module:function' when verifier.type is 'python'")
        return self


class CodeVerifier(VerifierBase):
    """`type: code`: the reply's program run against the row's tests, in a sandbox."""

    type: Literal["code"] = Field("code", description=TYPE_DOC)
    code: CodeConfig = Field(default_factory=CodeConfig)
    sandbox: Literal["bwrap", "none"] = Field(
        "bwrap",
        description="code: how programs are isolated. `bwrap` (bubblewrap: own namespaces, no network, a "
        "read-only file system but a private tmpfs, an unprivileged user; the verifier refuses to start on a node "
        "without a working `bwrap`: `apt-get install bubblewrap`). `none`: no operating-system isolation, only "
        "resource limits and Python-level guards; UNSAFE, for trusted code only (a program can read and write "
        "what the scoring process can, e.g. API keys in other processes' environments, the run folder).",
    )


class JsonSchemaVerifier(VerifierBase):
    """`type: json_schema`: the reply is JSON valid against a schema."""

    type: Literal["json_schema"] = Field("json_schema", description=TYPE_DOC)
    schema_field: str = Field("schema", description="json_schema: row field holding the JSON Schema.")
    json_schema: dict[str, Any] | None = Field(
        None, description="json_schema: one schema for every row (a row's own `schema_field` wins)."
    )

    @model_validator(mode="after")
    def _schema(self) -> JsonSchemaVerifier:
        if self.json_schema is not None:
            from jsonschema import SchemaError
            from jsonschema.validators import validator_for

            try:
                validator_for(self.json_schema).check_schema(self.json_schema)
            except SchemaError as e:
                raise ValueError(f"verifier.json_schema is not a valid JSON Schema: {e.message}") from None
        return self


class _WithJudge(VerifierBase):
    judge: JudgeConfig | None = Field(None, description="judge, or math with a judge fallback: the judge.")

    def judges(self) -> list[JudgeConfig]:
        return [self.judge] if self.judge is not None else []


class MathVerifier(_WithJudge):
    """`type: math`: math-verify's equivalence, with an optional judge when it finds no match."""

    type: Literal["math"] = Field("math", description=TYPE_DOC)


class JudgeVerifier(_WithJudge):
    """`type: judge`: an LLM judge."""

    type: Literal["judge"] = Field("judge", description=TYPE_DOC)

    @model_validator(mode="after")
    def _judge(self) -> JudgeVerifier:
        if self.judge is None:
            raise ValueError("verifier.judge is required when verifier.type is 'judge' (at least judge.model.name)")
        return self


class CompositeVerifier(VerifierBase):
    """`type: composite`: several verifiers' rewards combined."""

    type: Literal["composite"] = Field("composite", description=TYPE_DOC)
    components: list[VerifierConfig] = Field(
        default_factory=list,
        description="composite: the verifiers, each a verifier section of its own plus `weight` and `name`.",
    )
    combine: Literal["mean", "min", "all"] = Field(
        "mean", description="composite: weighted `mean` of the rewards, their `min`, or `all` (1 when all are 1)."
    )

    def judges(self) -> list[JudgeConfig]:
        return [j for c in self.components for j in c.judges()]

    @model_validator(mode="after")
    def _components(self) -> CompositeVerifier:
        if not self.components:
            raise ValueError("verifier.components: a composite verifier needs at least one component")
        if sum(c.weight for c in self.components) <= 0 and self.combine == "mean":
            raise ValueError("verifier.components: the weights sum to 0")
        if len(self.vllm_judges()) > 1:
            raise ValueError("verifier: at most one judge with backend vllm (each would start its own engine in "
                             "every scoring actor); give the others backend openai, e.g. a vLLM server")
        return self


# A new verifier type goes in this list (its `type` value is its tag); the first is the default.
VERIFIER_TYPES: list[type[Tagged]] = [
    ExactMatchVerifier, MathVerifier, McqVerifier, RegexVerifier, PythonVerifier, CodeVerifier, JsonSchemaVerifier,
    JudgeVerifier, CompositeVerifier, NemoGymVerifier, NoVerifier]
VerifierConfig = tagged_union(VERIFIER_TYPES, default="exact_match", phrase="verifier type {}")
"""The ``verifier`` section: one of :data:`VERIFIER_TYPES`, picked by its ``type`` key."""
CompositeVerifier.model_rebuild()
