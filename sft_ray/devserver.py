"""A local OpenAI-compatible server that echoes prompts, for trials, tests and benchmarks.

It answers ``POST /v1/chat/completions`` and ``POST /v1/responses`` with the
last user message as the reply, after an optional latency, and simulates what
hosted APIs do when they misbehave: 429 with ``Retry-After``, 500, hangs past
the client's timeout and malformed bodies, either at random rates or on
request through markers in the prompt:

- ``[[fail:500:N]]`` / ``[[fail:429:N]]`` / ``[[fail:timeout:N]]`` / ``[[fail:malformed:N]]``:
  the first N attempts of this prompt fail that way, later ones succeed;
- ``[[status:400]]``: always 400 (context length exceeded);
- ``[[echo_auth]]``: 401 whose body repeats the request's Authorization and ``api-key``
  headers (a careless server: the client must keep the keys out of its error text);
- ``[[echo_key_prefix]]``: 401 whose body quotes the first 24 characters of each of those
  headers' keys (as providers quote part of a wrong key);
- ``[[sleep:S]]``: answer after S more seconds (a long generation, for scaled timeouts).

A model whose name contains ``reasoning`` (``mock-reasoning``, ``mock-judge-reasoning``)
refuses what OpenAI's reasoning models refuse, with OpenAI's 400 body
(``code: unsupported_parameter``, ``param``): ``temperature`` and ``top_p``, and
``max_tokens`` in Chat Completions (it wants ``max_completion_tokens``).

As an agent model: a request that carries ``tools`` (Chat Completions nests them
under ``"function"``, Responses has them flat; both forms are read in both APIs)
is answered with tool calls until the conversation has tool results, then with a
final message holding those results verbatim (one per line). Markers in the last
user message steer it:

- ``[[tool:NAME {"arg": ...}]]``: call NAME with these arguments (several markers:
  several calls in one turn; NAME need not be among the tools). Without a marker it
  calls the first tool with its first required string property set to the user text
  (markers stripped);
- ``[[parallel:N]]``: N calls in one turn (the chosen calls repeated), distinct ids;
- ``[[steps:N]]``: keep calling tools for the first N model calls of the episode
  (default 1; 0: answer at once), to test ``max_steps``.

``MockConfig.tool_malformed_rate`` / ``tool_unknown_rate`` make a share of calls carry
arguments that are not JSON or a tool name that does not exist. In agent requests
the ``[[fail:...]]`` markers count attempts per model call of the episode.

A request for model ``mock-judge`` is answered as an LLM judge would (:func:`judge_reply`).

With ``requests_per_minute`` / ``tokens_per_minute`` set it enforces real limits, as
hosted APIs do: a token bucket per limit that refills continuously and holds
``limit_window_s`` seconds of refill; a request that finds a bucket short is answered
429 with ``Retry-After`` (seconds until it would fit) and every answer carries
``x-ratelimit-limit-*``, ``x-ratelimit-remaining-*`` and ``x-ratelimit-reset-*`` headers.
A request's tokens are its prompt words plus its output limit (``max_tokens``).

The Batch API (OpenAI's): ``POST /v1/files`` (multipart, ``purpose=batch``), ``GET
/v1/files/{id}/content``, ``POST /v1/batches``, ``GET /v1/batches`` (newest first),
``GET /v1/batches/{id}`` and ``POST /v1/batches/{id}/cancel``. A batch stays ``validating``
for ``batch_delay_s``, then its lines are answered as the online endpoints answer them
(same bodies, no latency or rate limits), in reverse order, into an output file (status 200)
and an error file (other statuses, and ``error`` lines); it ends ``completed``. A file
with a malformed line or a repeated ``custom_id`` fails the batch in validation. Markers:
``[[batch_error:N]]``: the first N batch attempts of this prompt get an ``error`` line
(``server_error``); ``[[fail:500:N]]`` gives a line with ``status_code`` 500. With
``batch_expire`` the first N batches run only ``batch_expire_keep`` of their lines and end
``expired`` (the rest get ``batch_expired`` error lines). ``GET /batch_stats`` counts
uploads, batches created and, per ``custom_id``, how often it was submitted.

``GET /stats`` reports requests served and the most requests ever in flight at
once, which the tests use to check the concurrency limit.
"""

from __future__ import annotations

import asyncio
import random
import re
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

import orjson
from aiohttp import web

from sft_ray.plugins import registered

_MARK = re.compile(r"\[\[fail:(500|429|timeout|malformed):(\d+)\]\]")
_TOOL_MARK = re.compile(r"\[\[tool:([^\s\]]+)\s*(\{.*?\})?\]\]", re.S)
_PARALLEL = re.compile(r"\[\[parallel:(\d+)\]\]")
_STEPS = re.compile(r"\[\[steps:(\d+)\]\]")
_ANY_MARK = re.compile(r"\[\[.*?\]\]", re.S)
_SLEEP = re.compile(r"\[\[sleep:(\d+(?:\.\d+)?)\]\]")
_BATCH_ERROR = re.compile(r"\[\[batch_error:(\d+)\]\]")
UNKNOWN_TOOL = "no_such_tool"
# Other providers' APIs on the same app: import strings (their modules import this one) of
# ``register(app, cfg, state, rng)`` functions that add their routes.
PROVIDERS = {"anthropic": "sft_ray.devserver_anthropic:register"}  # /v1/messages, Message Batches


@dataclass
class MockConfig:
    latency_ms: float = 0.0
    error_rate: float = 0.0  # random 500s
    rate_limit_rate: float = 0.0  # random 429s
    timeout_rate: float = 0.0  # random hangs
    malformed_rate: float = 0.0  # random unparseable 200s
    tool_malformed_rate: float = 0.0  # share of tool calls whose arguments are not JSON
    tool_unknown_rate: float = 0.0  # share of tool calls naming a tool that does not exist
    retry_after_s: float = 0.05
    hang_s: float = 30.0
    seed: int = 0
    requests_per_minute: float = 0.0  # 0: no limit
    tokens_per_minute: float = 0.0  # 0: no limit
    limit_window_s: float = 60.0  # bucket capacity, in seconds of refill
    batch_delay_s: float = 0.0  # the Batch API: seconds a batch stays validating before it is processed
    batch_expire: int = 0  # the first N batches expire after finishing only part of their lines
    batch_expire_keep: float = 0.5  # the share of an expiring batch's lines that finish


class Bucket:
    """A token bucket: ``per_minute`` refill, ``window_s`` seconds of it as capacity (starts full)."""

    def __init__(self, per_minute: float, window_s: float) -> None:
        self.rate = per_minute / 60.0
        self.capacity = max(1.0, self.rate * window_s)
        self.level = self.capacity
        self.at = time.monotonic()

    def _refill(self) -> None:
        now = time.monotonic()
        self.level = min(self.capacity, self.level + (now - self.at) * self.rate)
        self.at = now

    def take(self, amount: float) -> float:
        """Take ``amount`` if it fits and return 0, else return the seconds until it would fit."""
        self._refill()
        if amount <= self.level:
            self.level -= amount
            return 0.0
        return (min(amount, self.capacity) - self.level) / self.rate


@dataclass
class MockState:
    requests: int = 0
    in_flight: int = 0
    max_in_flight: int = 0
    by_status: Counter = field(default_factory=Counter)
    attempts: Counter = field(default_factory=Counter)
    bodies: list = field(default_factory=list)  # last few request bodies, for tests
    keep_bodies: int = 0
    auth_headers: set = field(default_factory=set)
    rate_limited: int = 0  # 429s answered by the token buckets
    api_key_headers: set = field(default_factory=set)  # `api-key` header values seen (Azure-style keys)
    served: Counter = field(default_factory=Counter)  # successful answers per prompt, for tests
    tool_call_turns: int = 0  # answers that called tools
    tool_calls: int = 0  # tool calls emitted, in all
    busy_s: float = 0.0  # integral of in_flight over time: busy_s / wall = mean concurrency
    first_at: float = 0.0
    last_change: float = 0.0
    files: dict = field(default_factory=dict)  # Batch API: file id -> (purpose, content bytes)
    batches: dict = field(default_factory=dict)  # Batch API: batch id -> the batch object
    batch_lines: Counter = field(default_factory=Counter)  # custom_id -> times submitted in a batch
    uploads: int = 0
    batches_created: int = 0

    def track(self, delta: int) -> None:
        now = time.monotonic()
        if not self.first_at:
            self.first_at = self.last_change = now
        self.busy_s += self.in_flight * (now - self.last_change)
        self.last_change = now
        self.in_flight += delta


def _last_user_text(messages) -> str:
    for m in reversed(messages if isinstance(messages, list) else []):
        if isinstance(m, dict) and m.get("role") == "user":
            c = m.get("content")
            if isinstance(c, list):
                return "".join(p.get("text", "") for p in c if isinstance(p, dict))
            return c or ""
    return messages if isinstance(messages, str) else ""


# --- the agent model: which tools to call, or the final answer -------------------------------


@dataclass
class AgentTurn:
    """This model call's answer in an agent conversation: tool calls, or a final text."""

    step: int  # 1-based number of this model call in the episode (tool-call turns so far + 1)
    calls: list[dict]  # {"id", "name", "arguments": JSON string (or not, when malformed)}; empty: final
    final: str = ""


def _text_of(content) -> str:
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict))
    if content is None or isinstance(content, str):
        return content or ""
    return orjson.dumps(content).decode()


def _tool_specs(tools) -> list[dict]:
    """Function tools as ``{"name", "parameters"}``, from either API's form (nested or flat)."""
    specs = []
    for t in tools if isinstance(tools, list) else []:
        if isinstance(t, dict):
            f = t["function"] if isinstance(t.get("function"), dict) else t
            if f.get("name"):
                specs.append({"name": f["name"], "parameters": f.get("parameters") or {}})
    return specs


def _episode(items) -> tuple[int, list[str]]:
    """Tool-call turns and tool outputs since the last user message, in either API's form.

    Consecutive Responses ``function_call`` items are one turn (how NeMo Gym and the
    Chat conversion lay out a parallel turn); a Chat assistant message with ``tool_calls``
    is one turn.
    """
    turns, outputs, prev_call = 0, [], False
    for it in items if isinstance(items, list) else []:
        if not isinstance(it, dict):
            continue
        is_call = it.get("type") == "function_call"
        if it.get("role") == "user":
            turns, outputs = 0, []
        elif (is_call and not prev_call) or (it.get("role") == "assistant" and it.get("tool_calls")):
            turns += 1
        elif it.get("role") == "tool":
            outputs.append(_text_of(it.get("content")))
        elif it.get("type") == "function_call_output":
            outputs.append(_text_of(it.get("output")))
        prev_call = is_call
    return turns, outputs


def _forced_tool(tool_choice) -> str | None:
    if isinstance(tool_choice, dict):
        f = tool_choice["function"] if isinstance(tool_choice.get("function"), dict) else tool_choice
        return f.get("name")
    return None


def _default_args(spec: dict, text: str) -> dict:
    """The first required string property (or the first string property) set to ``text``."""
    props = spec["parameters"].get("properties") or {}
    for name in list(spec["parameters"].get("required") or []) + list(props):
        if isinstance(props.get(name), dict) and props[name].get("type") == "string":
            return {name: text}
    return {}


def agent_turn(body: dict, items, text: str, cfg: MockConfig, rng: random.Random, call_no: int) -> AgentTurn | None:
    """The agent's answer to a request with tools; None for a request without tools (echo)."""
    specs = _tool_specs(body.get("tools"))
    if not specs:
        return None
    turns, outputs = _episode(items)
    steps = int(m.group(1)) if (m := _STEPS.search(text)) else 1
    if turns >= steps or body.get("tool_choice") == "none":
        return AgentTurn(step=turns + 1, calls=[], final="\n".join(outputs) if outputs else text)
    planned: list[tuple[str, str]] = []
    for name, args in _TOOL_MARK.findall(text):
        try:  # a marker's arguments are sent as compact JSON, or as written when they are not JSON
            planned.append((name, orjson.dumps(orjson.loads(args)).decode() if args else "{}"))
        except orjson.JSONDecodeError:
            planned.append((name, args))
    if not planned:
        forced = _forced_tool(body.get("tool_choice"))
        spec = next((t for t in specs if t["name"] == forced), specs[0])
        plain = _ANY_MARK.sub("", text).strip()
        planned = [(spec["name"], orjson.dumps(_default_args(spec, plain)).decode())]
    if m := _PARALLEL.search(text):
        planned = [planned[i % len(planned)] for i in range(int(m.group(1)))]
    calls = []
    for i, (name, args) in enumerate(planned):
        if cfg.tool_malformed_rate and rng.random() < cfg.tool_malformed_rate:
            args = args[:-1]  # cut the closing brace: no longer JSON
        if cfg.tool_unknown_rate and rng.random() < cfg.tool_unknown_rate:
            name = UNKNOWN_TOOL
        calls.append({"id": f"call_{call_no}_{i}", "name": name, "arguments": args})
    return AgentTurn(step=turns + 1, calls=calls)


def tool_call_answer(api: str, body: dict, calls: list[dict], call_no: int, n_in: int) -> dict:
    """A tool-calling answer: Chat ``tool_calls`` (content null) or Responses ``function_call`` items."""
    n_out = sum(len(c["arguments"].split()) + 1 for c in calls)
    if api == "chat":
        tool_calls = [{"id": c["id"], "type": "function", "function": {"name": c["name"], "arguments": c["arguments"]}}
                      for c in calls]
        return {"id": f"chatcmpl-{call_no}", "object": "chat.completion", "created": int(time.time()),
                "model": body.get("model"),
                "choices": [{"index": 0, "message": {"role": "assistant", "content": None, "tool_calls": tool_calls},
                             "finish_reason": "tool_calls"}],
                "usage": {"prompt_tokens": n_in, "completion_tokens": n_out, "total_tokens": n_in + n_out}}
    output = [{"type": "function_call", "id": f"fc_{call_no}_{i}", "call_id": c["id"], "name": c["name"],
               "arguments": c["arguments"], "status": "completed"} for i, c in enumerate(calls)]
    return {"id": f"resp_{call_no}", "object": "response", "created_at": int(time.time()), "model": body.get("model"),
            "status": "completed", "incomplete_details": None, "output": output,
            "parallel_tool_calls": body.get("parallel_tool_calls", True),
            "tool_choice": body.get("tool_choice", "auto"), "tools": body.get("tools") or [],
            "usage": {"input_tokens": n_in, "output_tokens": n_out, "total_tokens": n_in + n_out}}



# --- a reasoning model's refusals ------------------------------------------------------------


def refused_by_reasoning_model(api: str, body: dict) -> web.Response | None:
    """OpenAI's 400 for a field its reasoning models do not take, or None (other models take all)."""
    if "reasoning" not in str(body.get("model", "")):
        return None
    for param in ("temperature", "top_p") + (("max_tokens",) if api == "chat" else ()):
        if param in body:
            hint = " Use 'max_completion_tokens' instead." if param == "max_tokens" else ""
            return web.json_response({"error": {
                "message": f"Unsupported parameter: '{param}' is not supported with this model.{hint}",
                "type": "invalid_request_error", "param": param, "code": "unsupported_parameter"}}, status=400)
    return None


# --- the mock judge --------------------------------------------------------------------------


def _tag(text: str, name: str) -> str | None:
    """The text of the first ``<name>`` block; with sft-ray's built-in judge templates, whose tags
    carry a per-call nonce (announced before any untrusted text), only ``<name-nonce>`` counts."""
    nonce = re.search(r"names end in -([0-9a-f]+)", text)
    if nonce:
        name = f"{name}-{nonce.group(1)}"
    m = re.search(rf"<{name}>\n?(.*?)\n?</{name}>", text, re.DOTALL)
    return m.group(1) if m else None


def judge_reply(text: str) -> str:
    """The mock judge: ``[[A=B]]`` when <reference> and <candidate> match (case and spaces aside),
    else ``[[A!=B]]``; with a <rubric>, ``Rating: [[N]]`` where the <response> says ``rate=N`` (else 10).
    ``[[judge:garbage]]`` in the answer gets a reply without a verdict."""
    answer = _tag(text, "candidate") or _tag(text, "response") or ""
    if "[[judge:garbage]]" in answer + (_tag(text, "reference") or ""):
        return "I cannot decide."
    if _tag(text, "rubric") is not None:
        m = re.search(r"rate=(\d+)", answer)
        return f"The response meets the rubric.\nRating: [[{m.group(1) if m else 10}]]"
    same = " ".join((_tag(text, "reference") or "").lower().split()) == " ".join(answer.lower().split())
    return "Checked both answers.\n" + ("[[A=B]]" if same else "[[A!=B]]")


# --- the server ----------------------------------------------------------------------------


def make_app(cfg: MockConfig, state: MockState) -> web.Application:
    rng = random.Random(cfg.seed)
    buckets = {name: Bucket(limit, cfg.limit_window_s) for name, limit in
               (("requests", cfg.requests_per_minute), ("tokens", cfg.tokens_per_minute)) if limit}

    def rate_limited(tokens: float) -> tuple[web.Response | None, dict[str, str]]:
        """Take this request's share of every bucket: (a 429 or None, the x-ratelimit-* headers)."""
        need = {"requests": 1.0, "tokens": tokens}
        waits = {name: b.take(need[name]) for name, b in buckets.items()}
        if any(waits.values()):  # give back what was taken: the request is refused whole
            for name, b in buckets.items():
                if not waits[name]:
                    b.level += need[name]
        headers = {}
        for name, b in buckets.items():
            headers[f"x-ratelimit-limit-{name}"] = f"{b.rate * 60:.0f}"  # per minute, as OpenAI sends it
            headers[f"x-ratelimit-remaining-{name}"] = f"{max(0.0, b.level):.0f}"
            headers[f"x-ratelimit-reset-{name}"] = f"{(b.capacity - b.level) / b.rate:.3f}s"
        wait = max(waits.values(), default=0.0)
        if not wait:
            return None, headers
        state.rate_limited += 1
        return web.json_response({"error": {"message": "rate limit reached", "type": "rate_limit_error"}},
                                 status=429, headers={**headers, "Retry-After": f"{wait:.3f}"}), headers

    async def failure(text: str, key: str, auth: str) -> web.Response | None:
        """A simulated failure for this attempt, or None to answer normally."""
        m = _MARK.search(text)
        kind = None
        if m:
            state.attempts[key] += 1
            if state.attempts[key] <= int(m.group(2)):
                kind = m.group(1)
        if "[[echo_auth]]" in text:
            return web.json_response({"error": {"message": f"invalid key in header: {auth}"}}, status=401)
        if "[[echo_key_prefix]]" in text:
            quoted = ", ".join(f"{part[:24]}..." for part in auth.split() if part != "Bearer")
            return web.json_response({"error": {"message": f"Incorrect API key provided: {quoted}"}}, status=401)
        if "[[status:400]]" in text:
            return web.json_response({"error": {"message": "This model's maximum context length is 8 tokens",
                                                "type": "invalid_request_error"}}, status=400)
        if kind is None:
            r = rng.random()
            for name, rate in (("500", cfg.error_rate), ("429", cfg.rate_limit_rate),
                               ("timeout", cfg.timeout_rate), ("malformed", cfg.malformed_rate)):
                if r < rate:
                    kind = name
                    break
                r -= rate
        if kind == "500":
            return web.json_response({"error": {"message": "internal error"}}, status=500)
        if kind == "429":
            return web.json_response({"error": {"message": "rate limited"}}, status=429,
                                     headers={"Retry-After": f"{cfg.retry_after_s:g}"})
        if kind == "timeout":
            await asyncio.sleep(cfg.hang_s)
        if kind == "malformed":
            return web.Response(body=b'{"choices": [{"message": ', content_type="application/json")
        return None

    async def handle(request: web.Request, api: str) -> web.Response:
        state.requests += 1
        state.track(+1)
        state.max_in_flight = max(state.max_in_flight, state.in_flight)
        try:
            return await answer(api, orjson.loads(await request.read()), request.headers, online=True)
        finally:
            state.track(-1)

    async def answer(api: str, body: dict, headers, online: bool) -> web.Response:
        """The answer to one request body (online, or a line of a batch: no latency, no rate limits)."""
        if state.keep_bodies:
            state.bodies = (state.bodies + [body])[-state.keep_bodies:]
        refused = refused_by_reasoning_model(api, body)
        if refused is not None:
            state.by_status[400] += 1
            return refused
        msgs = body.get("messages") if api == "chat" else body.get("input")
        text = _last_user_text(msgs)
        call_no = state.requests
        turn = agent_turn(body, msgs, text, cfg, rng, call_no)
        if cfg.latency_ms and online:
            await asyncio.sleep(cfg.latency_ms / 1000)
        if m := _SLEEP.search(text):
            await asyncio.sleep(float(m.group(1)))
        auth = headers.get("Authorization", "")
        state.auth_headers.add(auth)
        state.api_key_headers.add(headers.get("api-key", ""))
        auth += " " + headers.get("api-key", "")
        key = f"{text}|{body.get('seed')}|{body.get('temperature')}"
        limit = (body.get("max_tokens") or body.get("max_completion_tokens")) if api == "chat" \
            else body.get("max_output_tokens")
        limit_headers: dict[str, str] = {}
        if buckets and online:
            n_prompt = sum(len(_last_user_text([m]).split()) for m in msgs) if isinstance(msgs, list) else 0
            refused, limit_headers = rate_limited(n_prompt + (limit or 0))
            if refused is not None:
                state.by_status[429] += 1
                return refused
        failed = await failure(text, key if turn is None else f"{key}|step{turn.step}", auth)
        if failed is not None:
            state.by_status[failed.status] += 1
            return failed
        n_in = sum(len(_last_user_text([m]).split()) for m in msgs) if isinstance(msgs, list) else len(text.split())
        state.by_status[200] += 1
        state.served[text] += 1
        if turn is not None and turn.calls:
            state.tool_call_turns += 1
            state.tool_calls += len(turn.calls)
            out = tool_call_answer(api, body, turn.calls, call_no, n_in)
            return web.Response(body=orjson.dumps(out), content_type="application/json", headers=limit_headers)
        source = turn.final if turn is not None else text
        if str(body.get("model", "")).startswith("mock-judge"):
            source = judge_reply(text)
        words = source.split()
        truncated = bool(limit) and len(words) > limit
        reply = " ".join(words[:limit]) if truncated else source
        n_out = min(len(words), limit or len(words))
        if api == "chat":
            out = {"id": f"chatcmpl-{call_no}", "object": "chat.completion", "created": int(time.time()),
                   "model": body.get("model"),
                   "choices": [{"index": 0, "message": {"role": "assistant", "content": reply},
                                "finish_reason": "length" if truncated else "stop"}],
                   "usage": {"prompt_tokens": n_in, "completion_tokens": n_out, "total_tokens": n_in + n_out}}
        else:
            out = {"id": f"resp_{call_no}", "object": "response", "model": body.get("model"),
                   "status": "incomplete" if truncated else "completed",
                   "incomplete_details": {"reason": "max_output_tokens"} if truncated else None,
                   "output": [{"type": "message", "role": "assistant",
                               "content": [{"type": "output_text", "text": reply}]}],
                   "usage": {"input_tokens": n_in, "output_tokens": n_out, "total_tokens": n_in + n_out}}
        return web.Response(body=orjson.dumps(out), content_type="application/json", headers=limit_headers)

    async def chat(request: web.Request) -> web.Response:
        return await handle(request, "chat")

    async def responses(request: web.Request) -> web.Response:
        return await handle(request, "responses")

    async def stats(request: web.Request) -> web.Response:
        span = state.last_change - state.first_at
        return web.json_response({"requests": state.requests, "max_in_flight": state.max_in_flight,
                                  "mean_in_flight": state.busy_s / span if span > 0 else 0.0,
                                  "tool_call_turns": state.tool_call_turns, "tool_calls": state.tool_calls,
                                  "by_status": {str(k): v for k, v in state.by_status.items()},
                                  "rate_limited": state.rate_limited, "span_s": span})

    async def models(request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": "mock-echo", "object": "model"}]})

    # --- the Batch API: files and batches ---------------------------------------------------

    def api_error(status: int, message: str) -> web.Response:
        return web.json_response({"error": {"message": message, "type": "invalid_request_error"}}, status=status)

    async def upload(request: web.Request) -> web.Response:
        if request.content_type != "multipart/form-data":
            return api_error(400, "expected multipart/form-data with 'purpose' and 'file'")
        form = await request.post()
        part = form.get("file")
        if form.get("purpose") != "batch" or not hasattr(part, "file"):
            return api_error(400, "'purpose' must be 'batch' and 'file' a file")
        content = part.file.read()
        state.uploads += 1
        fid = f"file-{state.uploads:06d}{rng.randrange(16 ** 6):06x}"
        state.files[fid] = content
        return web.json_response({"id": fid, "object": "file", "bytes": len(content), "created_at": int(time.time()),
                                  "filename": part.filename, "purpose": "batch"})

    async def file_content(request: web.Request) -> web.Response:
        content = state.files.get(request.match_info["file_id"])
        if content is None:
            return api_error(404, "no such file")
        return web.Response(body=content, content_type="application/octet-stream")

    def batch_line(custom_id: str, status: int | None, body: dict | None, error: dict | None) -> bytes:
        response = None if status is None else {"status_code": status, "request_id": f"req_{rng.randrange(1 << 48):x}",
                                                "body": body}
        return orjson.dumps({"id": f"batch_req_{rng.randrange(1 << 48):x}", "custom_id": custom_id,
                             "response": response, "error": error})

    async def process(batch: dict, lines: list[dict], api: str, expire: bool) -> None:
        """Answer a batch's lines as the online endpoints would, after ``batch_delay_s``; an expiring
        batch answers only ``batch_expire_keep`` of them; lines come out in reverse order (a
        provider keeps no order)."""
        await asyncio.sleep(cfg.batch_delay_s)
        if batch["status"] == "validating":
            batch["status"], batch["in_progress_at"] = "in_progress", int(time.time())
        out, err = [], []
        keep = int(len(lines) * cfg.batch_expire_keep) if expire else len(lines)
        counts = batch["request_counts"]
        for i, line in enumerate(lines):
            if i and i % 200 == 0:
                await asyncio.sleep(0)  # let polls in
            cid = line.get("custom_id")
            if batch["status"] == "cancelling" or i >= keep:
                reason = "batch_cancelled" if batch["status"] == "cancelling" else "batch_expired"
                err.append(batch_line(cid, None, None, {"code": reason, "message": "This request could not be "
                                                        "executed before the batch ended."}))
                continue
            body = line.get("body") if isinstance(line.get("body"), dict) else {}
            text = _last_user_text(body.get("messages") if api == "chat" else body.get("input"))
            if m := _BATCH_ERROR.search(text):
                state.attempts[f"batch|{text}"] += 1
                if state.attempts[f"batch|{text}"] <= int(m.group(1)):
                    err.append(batch_line(cid, None, None, {"code": "server_error", "message": "The server had "
                                                            "an error processing this request."}))
                    counts["failed"] += 1
                    continue
            resp = await answer(api, body, {}, online=False)
            try:
                payload = orjson.loads(resp.body)
            except orjson.JSONDecodeError:  # a simulated malformed answer
                payload = {"error": {"message": "the model's answer was malformed"}}
                resp.set_status(500)
            (out if resp.status == 200 else err).append(batch_line(cid, resp.status, payload, None))
            counts["completed" if resp.status == 200 else "failed"] += 1
        batch["status"] = "finalizing"
        await asyncio.sleep(0)
        for name, data in (("output_file_id", out), ("error_file_id", err)):
            if data:
                fid = f"file-out{len(state.files):06d}"
                state.files[fid] = b"".join(d + b"\n" for d in data)
                batch[name] = fid
        end = "cancelled" if batch["status"] == "cancelling" else "expired" if keep < len(lines) else "completed"
        batch["status"], batch[f"{end}_at"] = end, int(time.time())

    async def create_batch(request: web.Request) -> web.Response:
        try:
            body = orjson.loads(await request.read())
        except orjson.JSONDecodeError:
            return api_error(400, "body is not JSON")
        endpoint = body.get("endpoint")
        content = state.files.get(body.get("input_file_id"))
        if endpoint not in ("/v1/chat/completions", "/v1/responses"):
            return api_error(400, "endpoint must be /v1/chat/completions or /v1/responses")
        if content is None:
            return api_error(400, "no such input_file_id")
        if body.get("completion_window") != "24h":
            return api_error(400, "completion_window must be '24h'")
        state.batches_created += 1
        bid = f"batch_{state.batches_created:06d}{rng.randrange(16 ** 6):06x}"
        batch = {"id": bid, "object": "batch", "endpoint": endpoint, "errors": None,
                 "input_file_id": body["input_file_id"], "completion_window": "24h", "status": "validating",
                 "output_file_id": None, "error_file_id": None, "created_at": int(time.time()),
                 "request_counts": {"total": 0, "completed": 0, "failed": 0}, "metadata": body.get("metadata")}
        state.batches[bid] = batch
        lines, seen = [], set()
        for n, raw in enumerate(content.splitlines(), 1):
            if not raw.strip():
                continue
            try:
                line = orjson.loads(raw)
            except orjson.JSONDecodeError:
                line = None
            problem = None
            if not isinstance(line, dict) or not isinstance(line.get("custom_id"), str):
                problem = "each line must be a JSON object with a string custom_id"
            elif line["custom_id"] in seen:
                problem = f"duplicate custom_id {line['custom_id']!r}"
            elif line.get("method") != "POST" or line.get("url") != endpoint:
                problem = f"method must be POST and url {endpoint}"
            if problem:  # the provider fails the whole batch in validation
                batch["status"], batch["failed_at"] = "failed", int(time.time())
                batch["errors"] = {"object": "list", "data": [{"code": "invalid_request", "message": problem,
                                                               "line": n}]}
                return web.json_response(batch)
            seen.add(line["custom_id"])
            state.batch_lines[line["custom_id"]] += 1
            lines.append(line)
        batch["request_counts"]["total"] = len(lines)
        expire = state.batches_created <= cfg.batch_expire
        api = "chat" if endpoint == "/v1/chat/completions" else "responses"
        batch["_task"] = asyncio.ensure_future(process(batch, lines[::-1], api, expire))
        return web.json_response({k: v for k, v in batch.items() if not k.startswith("_")})

    async def get_batch(request: web.Request) -> web.Response:
        batch = state.batches.get(request.match_info["batch_id"])
        if batch is None:
            return api_error(404, "no such batch")
        return web.json_response({k: v for k, v in batch.items() if not k.startswith("_")})

    async def list_batches(request: web.Request) -> web.Response:
        newest = [{k: v for k, v in b.items() if not k.startswith("_")} for b in reversed(state.batches.values())]
        after = request.query.get("after")
        if after:
            ids = [b["id"] for b in newest]
            newest = newest[ids.index(after) + 1:] if after in ids else []
        limit = max(1, min(100, int(request.query.get("limit", "20")) if request.query.get("limit", "").isdigit()
                           else 20))
        return web.json_response({"object": "list", "data": newest[:limit], "has_more": len(newest) > limit})

    async def cancel_batch(request: web.Request) -> web.Response:
        batch = state.batches.get(request.match_info["batch_id"])
        if batch is None:
            return api_error(404, "no such batch")
        if batch["status"] in ("validating", "in_progress"):
            batch["status"] = "cancelling"
        return web.json_response({k: v for k, v in batch.items() if not k.startswith("_")})

    async def batch_stats(request: web.Request) -> web.Response:
        return web.json_response({"uploads": state.uploads, "batches_created": state.batches_created,
                                  "lines_submitted": sum(state.batch_lines.values()),
                                  "most_submissions_of_one_custom_id": max(state.batch_lines.values(), default=0),
                                  "statuses": dict(Counter(b["status"] for b in state.batches.values()))})

    app = web.Application(client_max_size=512 << 20)  # a batch file may be up to 200 MB
    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_post("/v1/responses", responses)
    app.router.add_get("/v1/models", models)
    app.router.add_get("/stats", stats)
    app.router.add_post("/v1/files", upload)
    app.router.add_get("/v1/files/{file_id}/content", file_content)
    app.router.add_post("/v1/batches", create_batch)
    app.router.add_get("/v1/batches", list_batches)
    app.router.add_get("/v1/batches/{batch_id}", get_batch)
    app.router.add_post("/v1/batches/{batch_id}/cancel", cancel_batch)
    app.router.add_get("/batch_stats", batch_stats)
    for name in PROVIDERS:  # other providers' endpoints, each a module built on this one
        registered(PROVIDERS, name, "mock provider")(app, cfg, state, rng)
    return app


def serve(cfg: MockConfig, host: str = "127.0.0.1", port: int = 8000) -> None:
    """Serve until interrupted."""
    print(f"mock OpenAI-compatible server on http://{host}:{port}/v1", flush=True)
    web.run_app(make_app(cfg, MockState()), host=host, port=port, print=None, access_log=None)


class MockServer:
    """The server in a background thread, for tests: ``with MockServer(cfg) as s: s.url``."""

    def __init__(self, cfg: MockConfig | None = None, host: str = "127.0.0.1") -> None:
        self.cfg = cfg or MockConfig()
        self.state = MockState()
        self.host = host
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._started = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._runner = web.AppRunner(make_app(self.cfg, self.state), access_log=None)
        self._loop.run_until_complete(self._runner.setup())
        site = web.TCPSite(self._runner, self.host, 0)
        self._loop.run_until_complete(site.start())
        self.port = site._server.sockets[0].getsockname()[1]
        self._started.set()
        self._loop.run_forever()

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    def start(self) -> "MockServer":
        self._thread.start()
        self._started.wait(10)
        return self

    def stop(self) -> None:
        async def _shutdown() -> None:
            await self._runner.cleanup()

        asyncio.run_coroutine_threadsafe(_shutdown(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def __enter__(self) -> "MockServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
