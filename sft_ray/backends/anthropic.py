"""Claude natively: Anthropic's Messages API (``POST {base_url}/v1/messages``), as the version the config
names (``model.anthropic_version``, default ``2023-06-01``) defines it.

sft-ray's internal form is Chat Completions (:mod:`sft_ray.messages`); this module turns it into a
Messages request and the answer back:

- system and developer turns go in the top-level ``system`` (never a ``role: system`` message);
  ``max_output_tokens`` is ``max_tokens`` (always sent: the API requires it); ``temperature``,
  ``top_p``, ``top_k`` and ``stop`` (``stop_sequences``) as given; ``user`` as ``metadata.user_id``.
  Keys the Messages API lacks (``seed``, penalties, ``reasoning_effort``...) are not sent.
- tools go out as ``{name, description, input_schema}``; ``tool_use`` blocks come back as the rollout's
  OpenAI-shaped ``tool_calls`` (arguments a JSON string), and tool results go back as
  ``tool_result`` blocks in a user turn.
- ``model.thinking: {budget_tokens}`` sends ``thinking: {type: enabled, budget_tokens}``; the thinking
  text is the result's ``reasoning`` and the thinking blocks, signatures included, travel on the
  assistant message (``thinking_blocks``) so the next turn of an episode sends them back unchanged,
  before the turn's ``tool_use`` blocks.
- ``model.prompt_caching`` puts ``cache_control: {type: ephemeral}`` on the last tool, the last
  system block (both the same across rows) and, in an episode, the last block of the previous user
  turn (what the previous call wrote) and the last block of the request (what this call writes): at
  most 4, the API's limit.

The client is aiohttp, through :class:`~sft_ray.backends.openai.OpenAIBackend`'s transport and its
one retry loop, not the ``anthropic`` SDK. Measured (``bench/claude_native.py``, docs/benchmarks.md):
the SDK 2.17 spends 5.2 ms of client CPU per request against 0.39 ms for this client and 0.34 ms for
a bare aiohttp loop (httpx, and pydantic models built for every answer), 13x what this client does:
at C=64 a generation actor would spend its CPU on the client, not on the run. The SDK also speaks its
own newer API version (bearer token, no sampling parameters) and retries by itself, which the one
retry policy and the limiter must own. It stays the reference for the wire format in the tests.
"""

from __future__ import annotations

import re
from typing import Any

import orjson

from sft_ray.backends.base import GenerationRequest, GenerationResult
from sft_ray.backends.openai import BadResponse, OpenAIBackend
from sft_ray.messages import arguments_text
from sft_ray.ratelimit import from_anthropic_headers

DEFAULT_BASE_URL = "https://api.anthropic.com"
MAX_CACHE_BREAKPOINTS = 4  # the API refuses a request with more cache_control blocks
_EPHEMERAL = {"type": "ephemeral"}
# stop_reason -> the finish_reason every other backend writes
_FINISH = {"end_turn": "stop", "stop_sequence": "stop", "max_tokens": "length", "tool_use": "tool_calls",
           "refusal": "content_filter"}
_BAD_ID = re.compile(r"[^a-zA-Z0-9_-]")


def tool_use_id(call_id: str) -> str:
    """A tool call id as the API accepts it (``^[a-zA-Z0-9_-]+$``); the same for a call and its result."""
    return _BAD_ID.sub("_", call_id or "") or "call"


def tool_to_anthropic(tool: dict[str, Any]) -> dict[str, Any]:
    """A Chat-form function tool as an Anthropic tool."""
    fn = tool["function"]
    out: dict[str, Any] = {"name": fn["name"]}
    if fn.get("description") is not None:
        out["description"] = fn["description"]
    out["input_schema"] = fn.get("parameters") or {"type": "object", "properties": {}}
    return out


def tool_choice_to_anthropic(choice: Any, parallel: bool | None) -> dict[str, Any] | None:
    """Chat's ``tool_choice`` (and ``parallel_tool_calls: false``) as Anthropic's ``tool_choice``."""
    out: dict[str, Any] | None
    if isinstance(choice, dict):
        name = (choice.get("function") or {}).get("name") if isinstance(choice.get("function"), dict) \
            else choice.get("name")
        out = {"type": "tool", "name": name}
    elif choice == "required":
        out = {"type": "any"}
    elif choice in ("auto", "none"):
        out = {"type": choice}
    else:
        out = None
    if parallel is False:
        out = out or {"type": "auto"}
        if out["type"] != "none":
            out["disable_parallel_tool_use"] = True
    return out


def _input_object(arguments: Any) -> dict[str, Any]:
    """A tool call's arguments as the ``input`` object of a ``tool_use`` block. Malformed arguments
    (a model's cut JSON, answered with an error) are sent as ``{}``: the API takes only objects."""
    if isinstance(arguments, dict):
        return arguments
    try:
        value = orjson.loads(arguments) if isinstance(arguments, str) and arguments.strip() else {}
    except orjson.JSONDecodeError:
        return {}
    return value if isinstance(value, dict) else {}


def to_messages(messages: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Chat messages as (``system`` text blocks, Messages ``messages``). Consecutive turns of one role
    are merged (tool results and the user text after them are one user turn)."""
    system: list[dict[str, Any]] = []
    out: list[dict[str, Any]] = []

    def add(role: str, blocks: list[dict[str, Any]]) -> None:
        if not blocks:
            return
        if out and out[-1]["role"] == role:
            out[-1]["content"].extend(blocks)
        else:
            out.append({"role": role, "content": blocks})

    for m in messages:
        role, content = m["role"], m.get("content")
        if role in ("system", "developer"):
            if content:
                system.append({"type": "text", "text": content})
        elif role == "tool":
            add("user", [{"type": "tool_result", "tool_use_id": tool_use_id(m.get("tool_call_id", "")),
                          "content": content or ""}])
        elif role == "assistant":
            blocks = [dict(b) for b in m.get("thinking_blocks") or []]  # unchanged, signatures and all
            if content:
                blocks.append({"type": "text", "text": content})
            for c in m.get("tool_calls") or []:
                fn = c.get("function") or {}
                blocks.append({"type": "tool_use", "id": tool_use_id(c.get("id", "")), "name": fn.get("name", ""),
                               "input": _input_object(fn.get("arguments"))})
            add("assistant", blocks)
        else:
            add("user", [{"type": "text", "text": content}] if content else [])
    return system, out


def _mark(block: dict[str, Any]) -> None:
    block["cache_control"] = _EPHEMERAL


def place_cache_breakpoints(body: dict[str, Any]) -> int:
    """Put ``cache_control`` on the last tool, the last system block and, in a request with tools (an
    episode, whose next turn resends all of it), the end of the previous user turn and the end of the
    request (at most :data:`MAX_CACHE_BREAKPOINTS`); returns how many. A single-turn request's own
    text is not marked: writing it costs 1.25x input, and no later call of the sample reads it."""
    marks: list[dict[str, Any]] = []
    if body.get("tools"):
        marks.append(body["tools"][-1])
    if isinstance(body.get("system"), list) and body["system"]:
        marks.append(body["system"][-1])
    msgs = body["messages"]
    if body.get("tools"):  # an episode's growing prefix: later turns read what this one writes
        users = [i for i, m in enumerate(msgs) if m["role"] == "user"]
        if len(users) >= 2:
            marks.append(msgs[users[-2]]["content"][-1])
        if msgs:
            marks.append(msgs[-1]["content"][-1])
    placed = 0
    for block in marks[:MAX_CACHE_BREAKPOINTS]:
        if block.get("type") in ("thinking", "redacted_thinking") or "cache_control" in block:
            continue  # the API refuses cache_control on thinking blocks
        _mark(block)
        placed += 1
    return placed


def messages_body(model: dict[str, Any], req: GenerationRequest) -> dict[str, Any]:
    """The Messages request for ``req`` (``omit_params`` already applied)."""
    system, msgs = to_messages(req.messages)
    body: dict[str, Any] = {"model": model.get("name"), "messages": msgs}
    if system:
        body["system"] = system
    p = req.params
    if p.get("max_output_tokens") is not None:
        body["max_tokens"] = p["max_output_tokens"]
    for key in ("temperature", "top_p", "top_k"):
        if p.get(key) is not None:
            body[key] = p[key]
    stop = p.get("stop")
    if stop:
        body["stop_sequences"] = [stop] if isinstance(stop, str) else list(stop)
    if p.get("user"):
        body["metadata"] = {"user_id": p["user"]}
    thinking = model.get("thinking")
    if thinking:
        body["thinking"] = {"type": "enabled", "budget_tokens": thinking["budget_tokens"]}
    if req.tools:
        body["tools"] = [tool_to_anthropic(t) for t in req.tools]
        choice = tool_choice_to_anthropic(req.tool_choice, req.parallel_tool_calls)
        if choice is not None:
            body["tool_choice"] = choice
    if model.get("prompt_caching", True):
        place_cache_breakpoints(body)
    body.update(model.get("extra_body") or {})
    return body


def usage_of(usage: Any) -> dict[str, int]:
    """Anthropic's usage as a result's: ``input_tokens`` (billed at the input price: what no cache
    breakpoint covers), ``output_tokens``, the two cache counts, and their ``total_tokens``."""
    usage = usage if isinstance(usage, dict) else {}

    def n(key: str) -> int:
        v = usage.get(key)
        return int(v) if isinstance(v, (int, float)) and v >= 0 else 0

    out = {"input_tokens": n("input_tokens"), "output_tokens": n("output_tokens")}
    write, read = n("cache_creation_input_tokens"), n("cache_read_input_tokens")
    if write or read:
        out["cache_creation_input_tokens"], out["cache_read_input_tokens"] = write, read
    out["total_tokens"] = sum(out.values())
    return out


def parse_message(data: Any) -> GenerationResult:
    """A Messages answer as a result. Unknown block types are passed over (as the Responses parser
    passes over unknown output items); a thinking block without a signature cannot be sent back, so a
    turn that has one and calls tools is a bad response (retried), and a final turn keeps its text."""
    try:
        if data.get("type") != "message" or not isinstance(data.get("content"), list):
            raise BadResponse(f"unexpected messages body (type {data.get('type')!r}, no content list)")
        texts, reasoning, calls, blocks, unsigned = [], [], [], [], False
        for block in data["content"]:
            kind = block.get("type")
            if kind == "text":
                texts.append(block["text"])
            elif kind == "thinking":
                reasoning.append(block["thinking"])
                if isinstance(block.get("signature"), str) and block["signature"]:
                    blocks.append({"type": "thinking", "thinking": block["thinking"], "signature": block["signature"]})
                else:
                    unsigned = True
            elif kind == "redacted_thinking":
                blocks.append({"type": "redacted_thinking", "data": block["data"]})
            elif kind == "tool_use":
                calls.append({"id": block["id"], "name": block["name"], "arguments": arguments_text(block.get("input"))})
        if unsigned and calls:
            raise BadResponse("a thinking block without a signature in a turn that calls tools (the API refuses "
                              "its continuation without the signature)")
        stop = data.get("stop_reason")
        finish = _FINISH.get(stop, stop)
        if finish == "tool_calls" and not calls:
            finish = "stop"
        return GenerationResult(text="".join(texts), finish_reason=finish, tool_calls=calls,
                                usage=usage_of(data.get("usage")), reasoning="\n".join(reasoning) or None,
                                thinking_blocks=blocks or None)
    except (KeyError, TypeError, AttributeError, ValueError) as e:
        raise BadResponse(f"unexpected messages body ({type(e).__name__}: {e})") from None


def error_words(raw: bytes) -> tuple[str | None, str]:
    """The API's error type and message from an error body ``{type: error, error: {type, message}}``."""
    try:
        err = orjson.loads(raw).get("error")
    except (orjson.JSONDecodeError, AttributeError):
        err = None
    if isinstance(err, dict) and isinstance(err.get("type"), str):
        return err["type"], str(err.get("message") or "")
    return None, raw.decode("utf-8", "replace")


class AnthropicBackend(OpenAIBackend):
    """The Messages API over the OpenAI backend's transport: same session, limiter and retry loop;
    its own headers, body, answer and error reading."""

    def __init__(self, model: dict[str, Any], requests_per_actor: int) -> None:
        super().__init__(model, requests_per_actor)
        self.api = "messages"
        self.url = (model.get("base_url") or DEFAULT_BASE_URL).rstrip("/") + "/v1/messages"

    def _auth_headers(self) -> dict[str, str]:
        headers = {"anthropic-version": self.model.get("anthropic_version") or "2023-06-01"}
        if self._key:
            headers["x-api-key"] = self._key
        return headers

    def _body(self, req: GenerationRequest) -> bytes:
        return orjson.dumps(messages_body(self.model, req))

    def _parse(self, data: Any) -> GenerationResult:
        return parse_message(data)

    def _error_message(self, status: int, raw: bytes) -> str:
        kind, message = error_words(raw)
        text = self._redact(message)[:300]
        return f"HTTP {status} {kind}: {text}" if kind else f"HTTP {status}: {text}"

    def _limit_headers(self, headers: Any) -> Any:
        return from_anthropic_headers(headers)
