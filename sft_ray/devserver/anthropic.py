"""The mock server's Anthropic side: ``POST /v1/messages`` and the Message Batches API.

Its routes (:class:`AnthropicRoutes`) are one more table in :func:`sft_ray.devserver.route_tables`.
It applies the rules of the API version each request names in ``anthropic-version`` (:data:`VERSIONS`):
for ``2023-06-01`` (and ``2023-01-01``, the same here) the key in ``x-api-key``, ``model`` and
``max_tokens`` required, ``system`` only at the top level (a ``role: system`` message is
a 400), content blocks of known types, at most 4 ``cache_control`` breakpoints, and with ``thinking``
on: ``budget_tokens`` >= 1024 and below ``max_tokens``, no ``temperature`` other than 1, no
``top_k``, ``top_p`` of at least 0.95, no forced tool, and an assistant turn that called tools must
carry its thinking blocks back with the signatures the mock gave them (an HMAC of the text). The
version the official SDK 2.x sends (``2026-10-21``) takes a bearer token and system messages and refuses
``temperature``, ``top_p`` and ``top_k``.

Answers echo the last user text as the OpenAI side does; requests with ``tools`` are answered as by
the mock agent (:func:`sft_ray.devserver.agent_turn`, the same ``[[tool:...]]``, ``[[steps:N]]``,
``[[parallel:N]]`` markers) with ``tool_use`` blocks. With thinking on every answer starts with a
thinking block (``Thinking about: <text>``) and its signature. Tokens are words (tools and system
counted as a quarter of their JSON's bytes). Prompt caching behaves like a cache: each breakpoint's prefix is
stored when written; a request whose breakpoint prefix was stored before reads it
(``cache_read_input_tokens``), the part from there to its last breakpoint is written
(``cache_creation_input_tokens``) and ``input_tokens`` is the rest.

Markers in the last user text: ``[[fail:429:N]]`` / ``[[fail:529:N]]`` / ``[[fail:500:N]]`` (the
first N attempts of this prompt: ``rate_limit_error`` with ``retry-after``, ``overloaded_error``,
``api_error``), ``[[status:400]]`` (``invalid_request_error``), ``[[echo_auth]]`` (a 401 quoting the
key), and for a hostile provider: ``[[anthropic:unknown_block]]`` (a block of a type nobody knows),
``[[anthropic:no_usage]]`` (no ``usage``), ``[[anthropic:unsigned]]`` (a thinking block with no
signature), ``[[anthropic:redacted]]`` (a ``redacted_thinking`` block too).

Message Batches: ``POST /v1/messages/batches`` (``requests: [{custom_id, params}]``), ``GET
/v1/messages/batches/{id}``, ``GET /v1/messages/batches`` (newest first), ``POST .../cancel`` and ``GET .../results`` (JSONL at the batch's
``results_url``). A batch is ``in_progress`` for ``batch_delay_s``, then each request is answered as
online (no latency or limits): ``succeeded`` with the message, ``errored`` for a non-2xx answer or
``[[batch_error:N]]``; with ``batch_expire`` the first N batches answer only ``batch_expire_keep`` of
their requests, the rest ``expired``; a canceled batch's unanswered ones are ``canceled``.
``MockState.batch_lines`` counts submissions per custom_id, as for OpenAI's batches.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import re
from datetime import datetime, timedelta, timezone
from typing import Any

import orjson
from aiohttp import web

from sft_ray.devserver.agent import agent_turn
from sft_ray.devserver.core import Mock
from sft_ray.devserver.openai import _SLEEP
from sft_ray.devserver.openai_batch import _BATCH_ERROR
from sft_ray.devserver.state import Bucket, MockConfig, MockState, simulate_latency

# The API versions the mock knows, and where their request rules differ: 2023-06-01 (what sft-ray speaks)
# takes the key in x-api-key, system only at the top level and the sampling parameters; the version
# the official SDK 2.x names takes a bearer token and system messages and has no sampling parameters.
VERSIONS = {"2023-01-01": "old", "2023-06-01": "old", "2026-10-21": "new"}
_SAMPLING = ("temperature", "top_p", "top_k")
_FAIL = re.compile(r"\[\[fail:(429|529|500):(\d+)\]\]")
_SIGNING_KEY = b"sft-ray mock thinking"
_ID = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")
_BLOCKS = {"user": {"text", "image", "document", "tool_result"},
           "assistant": {"text", "thinking", "redacted_thinking", "tool_use"}}


def sign(thinking: str) -> str:
    return hmac.new(_SIGNING_KEY, thinking.encode(), hashlib.sha256).hexdigest()


def error_body(kind: str, message: str) -> dict[str, Any]:
    return {"type": "error", "error": {"type": kind, "message": message}}


def _error(status: int, kind: str, message: str, headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response(error_body(kind, message), status=status, headers=headers)


def _words(value: Any) -> int:
    """Tokens of a text or text block (its words) or of another block or a tool (a quarter of its JSON's bytes)."""
    if isinstance(value, tuple):  # (role, block) of a message
        value = value[1]
    if isinstance(value, dict) and value.get("type") == "text":
        value = value.get("text", "")
    if isinstance(value, str):
        return len(value.split())
    return max(1, len(orjson.dumps(value)) // 4)


def _plain(block: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in block.items() if k != "cache_control"}


def _text_of(content: Any) -> str:
    if isinstance(content, str):
        return content
    return "".join(b.get("text", "") for b in content or [] if isinstance(b, dict) and b.get("type") == "text")


def check_request(body: Any, version: str | None) -> str | None:
    """Why the version's rules refuse ``body`` (an ``invalid_request_error`` message), or None."""
    if version not in VERSIONS:
        return f"anthropic-version: {version!r} is not a known version" if version else \
            "anthropic-version: header is required"
    problem = _check_top(body, version)
    if problem is None:
        problem, marks = _check_messages(body["messages"], VERSIONS[version] == "new")
        system = body.get("system")
        marks += sum(1 for b in system if "cache_control" in b) if isinstance(system, list) else 0
        marks += sum(1 for t in body.get("tools") or [] if isinstance(t, dict) and "cache_control" in t)
        if problem is None and marks > 4:
            problem = f"A maximum of 4 blocks with cache_control may be provided. Found {marks}."
    return problem or _check_thinking(body) or _check_signatures(body["messages"]) or _check_ranges(body)


def _check_top(body: Any, version: str) -> str | None:
    """The top-level fields: model, max_tokens, messages, system, tools, this version's parameters."""
    if not isinstance(body, dict):
        return "body: expected an object"
    if not isinstance(body.get("model"), str) or not body["model"]:
        return "model: Field required"
    if not isinstance(body.get("max_tokens"), int) or isinstance(body["max_tokens"], bool) or body["max_tokens"] < 1:
        return "max_tokens: Field required (a positive integer)"
    if not isinstance(body.get("messages"), list) or not body["messages"]:
        return "messages: at least one message is required"
    system = body.get("system")
    if system is not None and not isinstance(system, str) and not (
            isinstance(system, list) and all(isinstance(b, dict) and b.get("type") == "text" for b in system)):
        return "system: a string or a list of text blocks"
    if VERSIONS[version] == "new" and (given := [k for k in _SAMPLING if k in body]):
        return f"{given[0]}: Extra inputs are not permitted (not a parameter of anthropic-version {version})"
    for t in body.get("tools") or []:
        if not isinstance(t, dict) or not isinstance(t.get("name"), str) or not isinstance(t.get("input_schema"), dict):
            return "tools: each tool needs a name and an input_schema object"
    return None


def _check_messages(msgs: list[Any], new: bool) -> tuple[str | None, int]:
    """(why a message is refused or None, the cache_control marks in the messages)."""
    marks = 0
    for i, m in enumerate(msgs):
        if new and isinstance(m, dict) and m.get("role") == "system":
            continue
        if not isinstance(m, dict) or m.get("role") not in ("user", "assistant"):
            role = m.get("role") if isinstance(m, dict) else None
            return (f"messages.{i}.role: Input should be 'user' or 'assistant'"
                    + (" (a system prompt goes in the top-level system parameter)" if role == "system" else "")), 0
        content = m.get("content")
        if isinstance(content, str):
            continue
        if not isinstance(content, list) or not content:
            return f"messages.{i}.content: a string or a non-empty list of blocks", 0
        for j, b in enumerate(content):
            problem = _check_block(b, m["role"])
            if problem:
                return f"messages.{i}.content.{j}{problem}", 0
            marks += "cache_control" in b
    return None, marks


def _check_block(b: Any, role: str) -> str | None:
    """Why one content block is refused (the path's tail and the reason), or None."""
    if not isinstance(b, dict) or b.get("type") not in _BLOCKS[role]:
        return f".type: not a block type a {role} turn takes"
    kind = b.get("type")
    if kind == "text" and not b.get("text"):
        return ".text: text content blocks must be non-empty"
    if kind == "tool_use" and not isinstance(b.get("input"), dict):
        return ".input: Input should be a valid dictionary"
    if kind == "tool_use" and not _ID.match(str(b.get("id", ""))):
        return ".id: String should match pattern '^[a-zA-Z0-9_-]+$'"
    if "cache_control" in b and kind in ("thinking", "redacted_thinking"):
        return ".cache_control: thinking blocks cannot be cached directly"
    return None


def _check_thinking(body: dict[str, Any]) -> str | None:
    """What extended thinking refuses, and a tool continuation without the turn's thinking blocks."""
    thinking = body.get("thinking")
    if thinking is None:
        return None
    budget = thinking.get("budget_tokens") if isinstance(thinking, dict) else None
    if not isinstance(thinking, dict) or thinking.get("type") != "enabled" or not isinstance(budget, int):
        return "thinking: expected {type: enabled, budget_tokens: int}"
    if budget < 1024:
        return "thinking.budget_tokens: Input should be greater than or equal to 1024"
    if budget >= body["max_tokens"]:
        return "`max_tokens` must be greater than `thinking.budget_tokens`"
    if body.get("temperature") not in (None, 1, 1.0):
        return "`temperature` may only be set to 1 when thinking is enabled"
    if body.get("top_k") is not None:
        return "`top_k` is not supported when thinking is enabled"
    if body.get("top_p") is not None and not 0.95 <= body["top_p"] <= 1:
        return "`top_p` must be between 0.95 and 1 when thinking is enabled"
    if (body.get("tool_choice") or {}).get("type") in ("any", "tool"):
        return "Thinking may not be enabled when tool_choice forces tool use."
    msgs = body["messages"]
    last, prev = msgs[-1], (msgs[-2] if len(msgs) >= 2 else None)
    if prev is not None and prev.get("role") == "assistant" and isinstance(prev.get("content"), list) \
            and isinstance(last.get("content"), list) \
            and any(b.get("type") == "tool_result" for b in last["content"] if isinstance(b, dict)):
        first = prev["content"][0]
        if first.get("type") not in ("thinking", "redacted_thinking"):
            return (f"messages.{len(msgs) - 2}.content.0.type: Expected `thinking` or `redacted_thinking`, but "
                    f"found `{first.get('type')}`. When `thinking` is enabled, a final `assistant` message must "
                    "start with a thinking block")
    return None


def _check_signatures(msgs: list[dict[str, Any]]) -> str | None:
    for i, m in enumerate(msgs):
        for j, b in enumerate(m["content"] if isinstance(m["content"], list) else []):
            if b.get("type") == "thinking" and b.get("signature") != sign(str(b.get("thinking", ""))):
                return f"messages.{i}.content.{j}: Invalid `signature` in `thinking` block"
    return None


def _check_ranges(body: dict[str, Any]) -> str | None:
    for key, lo, hi in (("temperature", 0, 1), ("top_p", 0, 1)):
        if body.get(key) is not None and not lo <= body[key] <= hi:
            return f"{key}: Input should be between {lo} and {hi}"
    return None


def _chat_items(msgs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Messages turns as the Chat-form items the mock agent reads (to count an episode's turns)."""
    items: list[dict[str, Any]] = []
    for m in msgs:
        if m["role"] == "system":  # a version that takes system messages: not the user's text
            continue
        blocks = m["content"] if isinstance(m["content"], list) else [{"type": "text", "text": m["content"]}]
        if m["role"] == "assistant":
            calls = [b for b in blocks if b.get("type") == "tool_use"]
            items.append({"role": "assistant", "content": _text_of(blocks), "tool_calls": calls or None})
            continue
        results = [b for b in blocks if b.get("type") == "tool_result"]
        for b in results:
            items.append({"role": "tool", "content": b.get("content") if isinstance(b.get("content"), str)
                          else _text_of(b.get("content"))})
        if not results:
            items.append({"role": "user", "content": _text_of(blocks)})
    return items


class Cache:
    """The prompt cache: prefixes stored at their breakpoints (no expiry: a test run is short)."""

    def __init__(self) -> None:
        self.stored: set[bytes] = set()

    def usage(self, body: dict[str, Any]) -> dict[str, int]:
        """Token counts of this request, split as the API splits them."""
        parts: list[tuple[Any, bool]] = []  # (block without cache_control, is a breakpoint)
        for t in body.get("tools") or []:
            parts.append((_plain(t), "cache_control" in t))
        system = body.get("system")
        if isinstance(system, str):
            parts.append((system, False))
        for b in system if isinstance(system, list) else []:
            parts.append((_plain(b), "cache_control" in b))
        for m in body["messages"]:
            blocks = m["content"] if isinstance(m["content"], list) else [m["content"]]
            for b in blocks:
                if isinstance(b, dict) and b.get("type") in ("thinking", "redacted_thinking") \
                        and m is not body["messages"][-1]:
                    continue  # earlier turns' thinking is not part of the context
                parts.append(((m["role"], _plain(b) if isinstance(b, dict) else b), isinstance(b, dict)
                              and "cache_control" in b))
        total, h, read, last_mark = 0, hashlib.blake2b(digest_size=16), 0, 0
        keys = []
        for part, mark in parts:
            total += _words(part)
            h.update(orjson.dumps(part, option=orjson.OPT_SORT_KEYS))
            if mark:
                key = h.copy().digest()
                keys.append(key)
                if key in self.stored:
                    read = total
                last_mark = total
        self.stored.update(keys)
        write = max(0, last_mark - read)
        return {"input_tokens": total - read - write, "cache_creation_input_tokens": write,
                "cache_read_input_tokens": read}


def answer_message(body: dict[str, Any], cfg: MockConfig, state: MockState, cache: Cache, rng: Any,
                   call_no: int) -> dict[str, Any]:
    """The 200 answer to a valid request."""
    msgs = body["messages"]
    items = _chat_items(msgs)
    text = next((it["content"] for it in reversed(items) if it["role"] == "user"), "")
    tools = [{"name": t["name"], "parameters": t.get("input_schema") or {}} for t in body.get("tools") or []]
    choice = body.get("tool_choice") or {}
    agent_body = {"tools": tools, "tool_choice": "none" if choice.get("type") == "none" else
                  choice if choice.get("type") == "tool" else None}
    turn = agent_turn(agent_body, items, text, cfg, rng, call_no)
    content: list[dict[str, Any]] = []
    if body.get("thinking"):
        thought = f"Thinking about: {text}"
        if "[[anthropic:unsigned]]" in text:
            content.append({"type": "thinking", "thinking": thought})
        else:
            content.append({"type": "thinking", "thinking": thought, "signature": sign(thought)})
        if "[[anthropic:redacted]]" in text:
            content.append({"type": "redacted_thinking", "data": "EmwKAhgBEgy3va3pzix/LafPsn4aDFIT2Xlxh0L5L8rLVyIw"})
    if "[[anthropic:unknown_block]]" in text:
        content.append({"type": "mystery_block", "payload": {"x": 1}})
    limit, hit = body["max_tokens"], None
    if turn is not None and turn.calls:
        state.tool_call_turns += 1
        state.tool_calls += len(turn.calls)
        for i, c in enumerate(turn.calls):
            try:
                args = orjson.loads(c["arguments"])
            except orjson.JSONDecodeError:
                args = {"raw": c["arguments"]}  # the API's input is always an object
            content.append({"type": "tool_use", "id": f"toolu_{call_no:06d}_{i}", "name": c["name"], "input": args})
        stop, n_out = "tool_use", sum(_words(b) for b in content)
    else:
        source = turn.final if turn is not None else text
        words = source.split()
        truncated = len(words) > limit
        reply = " ".join(words[:limit])
        if reply:
            content.append({"type": "text", "text": reply})
        stops = body.get("stop_sequences") or []
        hit = next((s for s in stops if s and s in reply), None)
        if hit is not None:
            content[-1]["text"] = reply[:reply.index(hit)] or "."
        stop = "max_tokens" if truncated else "stop_sequence" if hit else "end_turn"
        n_out = min(len(words), limit)
    usage = {**cache.usage(body), "output_tokens": n_out}
    out = {"id": f"msg_{call_no:08d}", "type": "message", "role": "assistant", "model": body["model"],
           "content": content, "stop_reason": stop, "stop_sequence": hit if stop == "stop_sequence" else None,
           "usage": usage}
    if "[[anthropic:no_usage]]" in text:
        del out["usage"]
    return out


class AnthropicRoutes:
    """The Messages and Message Batches routes over the mock's config, state and random source."""

    def __init__(self, mock: Mock) -> None:
        self.cfg, self.state, self.rng = mock.cfg, mock.state, mock.rng
        self.cache = Cache()
        self.buckets = {name: Bucket(limit, self.cfg.limit_window_s) for name, limit in
                        (("requests", self.cfg.requests_per_minute), ("tokens", self.cfg.tokens_per_minute)) if limit}
        self.batches: dict[str, dict[str, Any]] = {}

    def limit_headers(self, tokens: float) -> tuple[float, dict[str, str]]:
        need = {"requests": 1.0, "tokens": tokens}
        waits = {name: b.take(need[name]) for name, b in self.buckets.items()}
        if any(waits.values()):
            for name, b in self.buckets.items():
                if not waits[name]:
                    b.level += need[name]
        headers = {}
        for name, b in self.buckets.items():
            reset = datetime.now(timezone.utc) + timedelta(seconds=(b.capacity - b.level) / b.rate)
            headers[f"anthropic-ratelimit-{name}-limit"] = f"{b.rate * 60:.0f}"
            headers[f"anthropic-ratelimit-{name}-remaining"] = f"{max(0.0, b.level):.0f}"
            headers[f"anthropic-ratelimit-{name}-reset"] = reset.isoformat().replace("+00:00", "Z")
        return max(waits.values(), default=0.0), headers

    async def respond(self, body: Any, headers: Any, online: bool) -> tuple[int, dict[str, Any], dict[str, str]]:
        """(status, JSON body, headers) for one request body."""
        if self.state.keep_bodies:
            self.state.bodies = (self.state.bodies + [body])[-self.state.keep_bodies:]
        key_header = headers.get("x-api-key", "")
        self.state.api_key_headers.add(key_header)
        self.state.auth_headers.add(headers.get("Authorization", ""))
        bearer = VERSIONS.get(headers.get("anthropic-version", "")) == "new" and headers.get("Authorization")
        if online and not key_header and not bearer:
            return 401, error_body("authentication_error", "x-api-key header is required"), {}
        problem = check_request(body, headers.get("anthropic-version"))
        if problem:
            self.state.by_status[400] += 1
            return 400, error_body("invalid_request_error", problem), {}
        items = _chat_items(body["messages"])
        text = next((it["content"] for it in reversed(items) if it["role"] == "user"), "")
        if self.cfg.latency_ms and online:
            await simulate_latency(self.cfg)
        if m := _SLEEP.search(text):
            await asyncio.sleep(float(m.group(1)))
        extra: dict[str, str] = {}
        if self.buckets and online:
            n_prompt = sum(len(_text_of(m["content"]).split()) for m in body["messages"])
            wait, extra = self.limit_headers(n_prompt + body["max_tokens"])
            if wait:
                self.state.rate_limited += 1
                self.state.by_status[429] += 1
                return 429, error_body("rate_limit_error", "Number of requests has exceeded your rate limit"), \
                    {**extra, "retry-after": f"{max(1, round(wait))}"}
        turns = sum(1 for it in items if it["role"] == "assistant" and it.get("tool_calls"))
        fkey = f"anthropic|{text}|{turns}"
        if m := _FAIL.search(text):
            self.state.attempts[fkey] += 1
            if self.state.attempts[fkey] <= int(m.group(2)):
                status = int(m.group(1))
                self.state.by_status[status] += 1
                if status == 429:
                    return 429, error_body("rate_limit_error", "rate limited"), \
                        {**extra, "retry-after": f"{self.cfg.retry_after_s:g}"}
                if status == 529:
                    return 529, error_body("overloaded_error", "Overloaded"), extra
                return 500, error_body("api_error", "Internal server error"), extra
        if "[[echo_auth]]" in text:
            return 401, error_body("authentication_error", f"invalid x-api-key: {key_header}"), {}
        if "[[status:400]]" in text:
            self.state.by_status[400] += 1
            return 400, error_body("invalid_request_error", "prompt is too long: 210000 tokens > 200000 maximum"), {}
        self.state.by_status[200] += 1
        self.state.served[text] += 1
        return 200, answer_message(body, self.cfg, self.state, self.cache, self.rng, self.state.requests), extra

    async def messages(self, request: web.Request) -> web.Response:
        self.state.requests += 1
        self.state.track(+1)
        self.state.max_in_flight = max(self.state.max_in_flight, self.state.in_flight)
        try:
            try:
                body = orjson.loads(await request.read())
            except orjson.JSONDecodeError:
                return _error(400, "invalid_request_error", "body is not JSON")
            status, out, headers = await self.respond(body, request.headers, online=True)
            return web.Response(body=orjson.dumps(out), status=status, content_type="application/json",
                                headers=headers)
        finally:
            self.state.track(-1)

    # --- Message Batches ---------------------------------------------------------------------

    def public(self, batch: dict[str, Any], base: str) -> dict[str, Any]:
        out = {k: v for k, v in batch.items() if not k.startswith("_")}
        if batch["processing_status"] == "ended":
            out["results_url"] = f"{base}/v1/messages/batches/{batch['id']}/results"
        return out

    async def process(self, batch: dict[str, Any], requests: list[dict[str, Any]], headers: Any, expire: bool) -> None:
        await asyncio.sleep(self.cfg.batch_delay_s)
        keep = int(len(requests) * self.cfg.batch_expire_keep) if expire else len(requests)
        counts, lines = batch["request_counts"], []
        for i, r in enumerate(requests):
            if i and i % 200 == 0:
                await asyncio.sleep(0)
            cid = r["custom_id"]
            counts["processing"] -= 1
            if batch["processing_status"] == "canceling":
                lines.append({"custom_id": cid, "result": {"type": "canceled"}})
                counts["canceled"] += 1
                continue
            if i >= keep:
                lines.append({"custom_id": cid, "result": {"type": "expired"}})
                counts["expired"] += 1
                continue
            params = r["params"]
            text = next((it["content"] for it in reversed(_chat_items(params.get("messages") or []))
                         if it["role"] == "user"), "") if isinstance(params.get("messages"), list) else ""
            if m := _BATCH_ERROR.search(text):
                self.state.attempts[f"abatch|{text}"] += 1
                if self.state.attempts[f"abatch|{text}"] <= int(m.group(1)):
                    lines.append({"custom_id": cid, "result": {"type": "errored", "error": error_body(
                        "api_error", "Internal server error")}})
                    counts["errored"] += 1
                    continue
            status, out, _ = await self.respond(params, headers, online=False)
            if status == 200:
                lines.append({"custom_id": cid, "result": {"type": "succeeded", "message": out}})
                counts["succeeded"] += 1
            else:
                lines.append({"custom_id": cid, "result": {"type": "errored", "error": out}})
                counts["errored"] += 1
        batch["_results"] = b"".join(orjson.dumps(x) + b"\n" for x in lines[::-1])  # no order promised
        batch["processing_status"] = "ended"
        batch["ended_at"] = datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")

    async def create_batch(self, request: web.Request) -> web.Response:
        if request.headers.get("anthropic-version") not in VERSIONS:
            return _error(400, "invalid_request_error", "anthropic-version: header is required")
        try:
            body = orjson.loads(await request.read())
        except orjson.JSONDecodeError:
            return _error(400, "invalid_request_error", "body is not JSON")
        reqs = body.get("requests") if isinstance(body, dict) else None
        if not isinstance(reqs, list) or not reqs or len(reqs) > 100_000:
            return _error(400, "invalid_request_error", "requests: between 1 and 100000 requests")
        seen: set[str] = set()
        for i, r in enumerate(reqs):
            cid = r.get("custom_id") if isinstance(r, dict) else None
            if not isinstance(cid, str) or not _ID.match(cid):
                return _error(400, "invalid_request_error",
                              f"requests.{i}.custom_id: String should match pattern '^[a-zA-Z0-9_-]{{1,64}}$'")
            if cid in seen:
                return _error(400, "invalid_request_error", f"requests.{i}.custom_id: duplicate {cid!r}")
            if not isinstance(r.get("params"), dict):
                return _error(400, "invalid_request_error", f"requests.{i}.params: Field required")
            seen.add(cid)
        for cid in seen:
            self.state.batch_lines[cid] += 1
        self.state.batches_created += 1
        bid = f"msgbatch_{self.state.batches_created:06d}{self.rng.randrange(16 ** 6):06x}"
        now = datetime.now(timezone.utc)
        batch = {"id": bid, "type": "message_batch", "processing_status": "in_progress",
                 "request_counts": {"processing": len(reqs), "succeeded": 0, "errored": 0, "canceled": 0,
                                    "expired": 0},
                 "ended_at": None, "created_at": now.isoformat().replace("+00:00", "Z"),
                 "expires_at": (now + timedelta(hours=24)).isoformat().replace("+00:00", "Z"),
                 "cancel_initiated_at": None, "archived_at": None, "results_url": None}
        self.batches[bid] = batch
        expire = self.state.batches_created <= self.cfg.batch_expire
        headers = {"anthropic-version": request.headers.get("anthropic-version"), "x-api-key": "batch"}
        batch["_task"] = asyncio.ensure_future(self.process(batch, reqs, headers, expire))
        return web.json_response(self.public(batch, self._base(request)))

    def _base(self, request: web.Request) -> str:
        return f"{request.scheme}://{request.host}"

    async def get_batch(self, request: web.Request) -> web.Response:
        batch = self.batches.get(request.match_info["batch_id"])
        if batch is None:
            return _error(404, "not_found_error", "no such batch")
        return web.json_response(self.public(batch, self._base(request)))

    async def list_batches(self, request: web.Request) -> web.Response:
        """Newest first, ``limit`` per page, ``after_id`` to page on."""
        newest = [self.public(b, self._base(request)) for b in reversed(self.batches.values())]
        after = request.query.get("after_id")
        if after:
            ids = [b["id"] for b in newest]
            newest = newest[ids.index(after) + 1:] if after in ids else []
        limit = int(request.query["limit"]) if request.query.get("limit", "").isdigit() else 20
        page = newest[:max(1, min(1000, limit))]
        return web.json_response({"data": page, "has_more": len(newest) > len(page),
                                  "first_id": page[0]["id"] if page else None,
                                  "last_id": page[-1]["id"] if page else None})

    async def cancel_batch(self, request: web.Request) -> web.Response:
        batch = self.batches.get(request.match_info["batch_id"])
        if batch is None:
            return _error(404, "not_found_error", "no such batch")
        if batch["processing_status"] == "in_progress":
            batch["processing_status"] = "canceling"
            batch["cancel_initiated_at"] = datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")
        return web.json_response(self.public(batch, self._base(request)))

    async def results(self, request: web.Request) -> web.Response:
        batch = self.batches.get(request.match_info["batch_id"])
        if batch is None or batch["processing_status"] != "ended":
            return _error(404 if batch is None else 400, "not_found_error" if batch is None
                          else "invalid_request_error", "no results (yet)")
        return web.Response(body=batch["_results"], content_type="application/x-jsonl")

    def routes(self) -> list[web.RouteDef]:
        return [web.post("/v1/messages", self.messages), web.post("/v1/messages/batches", self.create_batch),
                web.get("/v1/messages/batches", self.list_batches),
                web.get("/v1/messages/batches/{batch_id}", self.get_batch),
                web.post("/v1/messages/batches/{batch_id}/cancel", self.cancel_batch),
                web.get("/v1/messages/batches/{batch_id}/results", self.results)]
