"""The seam every generation backend plugs into.

A backend is built once per generation actor and then serves many concurrent
``generate`` calls from that actor's single asyncio event loop. Backends never
raise for a failed request: they return a :class:`GenerationResult` whose
``error`` says what went wrong, so failures travel as data.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from sft_ray import errors


@dataclass
class GenerationRequest:
    """One model call.

    ``messages`` are chat messages in Chat Completions form, the one internal form
    every backend converts from: ``{"role", "content": str | None}``, assistant turns
    may carry ``tool_calls`` (``[{"id", "type": "function", "function": {"name",
    "arguments": <JSON string>}}]``) and tool results are ``{"role": "tool",
    "tool_call_id", "name", "content": str}``.
    ``params`` are the merged ``responses_create_params`` for this sample
    (``temperature``, ``top_p``, ``max_output_tokens``, ``seed``, ``stop``...),
    already including the per-sample seed, without the tool keys.
    ``tools`` are function tools in Chat Completions form (``{"type": "function",
    "function": {"name", "description", "parameters"}}``); None or empty: no tools.
    """

    messages: list[dict[str, Any]]
    params: dict[str, Any]
    request_id: str = ""
    tools: list[dict[str, Any]] | None = None
    tool_choice: Any = None  # "auto" | "none" | "required" | {"type": "function", ...}; None: API default
    parallel_tool_calls: bool | None = None


@dataclass
class GenerationResult:
    """What a backend returns for one request; ``error`` is None on success."""

    text: str | None = None
    finish_reason: str | None = None  # "stop", "length", "tool_calls", ...
    # Tool calls of this turn, in order: {"id": str, "name": str, "arguments": <the JSON
    # string as the model wrote it, possibly malformed>}. Empty: a final answer.
    tool_calls: list[dict[str, str]] = field(default_factory=list)
    reasoning: str | None = None  # a reasoning trace the API returned beside the text
    # The provider's reasoning blocks of this turn as it sent them (Anthropic's thinking blocks with their
    # signatures): an episode's later turns send them back unchanged. None: nothing to send back.
    thinking_blocks: list[dict[str, Any]] | None = None
    # input_tokens, output_tokens, total_tokens; Anthropic adds cache_creation_input_tokens and
    # cache_read_input_tokens (prompt caching: billed apart from input_tokens, which excludes them)
    usage: dict[str, int] = field(default_factory=dict)
    error: dict[str, str] | None = None  # {"type": <error class>, "message": str}
    attempts: int = 1


def error_result(kind: str, message: str, attempts: int = 1) -> GenerationResult:
    """A failed generation, with its error class (``timeout``, ``rate_limit``, ...)."""
    return GenerationResult(error=errors.error(kind, message), attempts=attempts)


class Backend:
    """Base class: subclasses implement ``generate``; ``start``/``close`` are optional.

    ``model`` is the validated ``model`` config section as a plain dict;
    ``requests_per_actor`` is the most requests this actor may have outstanding.
    """

    def __init__(self, model: dict[str, Any], requests_per_actor: int) -> None:
        self.model = model
        self.requests_per_actor = requests_per_actor

    async def start(self) -> None:  # pragma: no cover - trivial default
        """Open connections or load the engine; called once in the actor's loop."""

    async def generate(self, request: GenerationRequest) -> GenerationResult:
        raise NotImplementedError

    async def close(self) -> None:  # pragma: no cover - trivial default
        """Release connections or the engine."""

    def close_now(self) -> None:  # pragma: no cover - trivial default
        """Best-effort synchronous release, for when the actor is torn down without a loop."""


class Secret:
    """Carries an API key to the actors without it ever showing in a repr, log or error."""

    __slots__ = ("_value",)

    def __init__(self, value: str | None) -> None:
        self._value = value

    def get(self) -> str | None:
        return self._value

    def __repr__(self) -> str:
        return "Secret(***)"

    __str__ = __repr__


REDACT_MIN_RUN = 16  # a run this long of a secret's characters is redacted, wherever it appears


class Redactor:
    """Replaces secrets in text with ``***``: each whole secret, and any run of at least
    :data:`REDACT_MIN_RUN` characters of one (a server that echoes a cut or partial key, a
    body cut in the middle of a key). Apply it to the whole text before cutting it: a cut
    made first can split a key so that no whole copy is left to match.

    Hand-written (no library redacts substrings of known secrets): the secrets' n-grams
    are hashed once, and a scan extends a match while every window is one of them, so a
    call is linear in the text's length whatever the secrets' lengths."""

    def __init__(self, secrets: "list[str | None] | tuple[str | None, ...]") -> None:
        self.secrets = sorted({s for s in secrets if s}, key=len, reverse=True)
        n = REDACT_MIN_RUN
        self.grams = {s[i:i + n] for s in self.secrets if len(s) >= n for i in range(len(s) - n + 1)}

    def __call__(self, text: str) -> str:
        for secret in self.secrets:
            text = text.replace(secret, "***")
        if not self.grams:
            return text
        n, out, start, i = REDACT_MIN_RUN, [], 0, 0
        while i + n <= len(text):
            if text[i:i + n] not in self.grams:
                i += 1
                continue
            j = i + n
            while j < len(text) and text[j - n + 1:j + 1] in self.grams:
                j += 1
            out.append(text[start:i])
            out.append("***")
            start = i = j
        out.append(text[start:])
        return "".join(out)
