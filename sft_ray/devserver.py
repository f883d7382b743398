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
  headers (a careless server: the client must keep the keys out of its error text).

With ``requests_per_minute`` / ``tokens_per_minute`` set it enforces real limits, as
hosted APIs do: a token bucket per limit that refills continuously and holds
``limit_window_s`` seconds of refill; a request that finds a bucket short is answered
429 with ``Retry-After`` (seconds until it would fit) and every answer carries
``x-ratelimit-limit-*``, ``x-ratelimit-remaining-*`` and ``x-ratelimit-reset-*`` headers.
A request's tokens are its prompt words plus its output limit (``max_tokens``).

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

_MARK = re.compile(r"\[\[fail:(500|429|timeout|malformed):(\d+)\]\]")


@dataclass
class MockConfig:
    latency_ms: float = 0.0
    error_rate: float = 0.0  # random 500s
    rate_limit_rate: float = 0.0  # random 429s
    timeout_rate: float = 0.0  # random hangs
    malformed_rate: float = 0.0  # random unparseable 200s
    retry_after_s: float = 0.05
    hang_s: float = 30.0
    seed: int = 0
    requests_per_minute: float = 0.0  # 0: no limit
    tokens_per_minute: float = 0.0  # 0: no limit
    limit_window_s: float = 60.0  # bucket capacity, in seconds of refill


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
    busy_s: float = 0.0  # integral of in_flight over time: busy_s / wall = mean concurrency
    first_at: float = 0.0
    last_change: float = 0.0

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
            body = orjson.loads(await request.read())
            if state.keep_bodies:
                state.bodies = (state.bodies + [body])[-state.keep_bodies:]
            msgs = body.get("messages") if api == "chat" else body.get("input")
            text = _last_user_text(msgs)
            if cfg.latency_ms:
                await asyncio.sleep(cfg.latency_ms / 1000)
            auth = request.headers.get("Authorization", "")
            state.auth_headers.add(auth)
            state.api_key_headers.add(request.headers.get("api-key", ""))
            auth += " " + request.headers.get("api-key", "")
            limit = body.get("max_tokens") if api == "chat" else body.get("max_output_tokens")
            limit_headers: dict[str, str] = {}
            if buckets:
                n_prompt = sum(len(_last_user_text([m]).split()) for m in msgs) if isinstance(msgs, list) else 0
                refused, limit_headers = rate_limited(n_prompt + (limit or 0))
                if refused is not None:
                    state.by_status[429] += 1
                    return refused
            failed = await failure(text, f"{text}|{body.get('seed')}|{body.get('temperature')}", auth)
            if failed is not None:
                state.by_status[failed.status] += 1
                return failed
            words = text.split()
            truncated = bool(limit) and len(words) > limit
            reply = " ".join(words[:limit]) if truncated else text
            n_in = sum(len(_last_user_text([m]).split()) for m in msgs) if isinstance(msgs, list) else len(words)
            n_out = min(len(words), limit or len(words))
            state.by_status[200] += 1
            state.served[text] += 1
            if api == "chat":
                out = {"id": f"chatcmpl-{state.requests}", "object": "chat.completion", "created": int(time.time()),
                       "model": body.get("model"),
                       "choices": [{"index": 0, "message": {"role": "assistant", "content": reply},
                                    "finish_reason": "length" if truncated else "stop"}],
                       "usage": {"prompt_tokens": n_in, "completion_tokens": n_out, "total_tokens": n_in + n_out}}
            else:
                out = {"id": f"resp_{state.requests}", "object": "response", "model": body.get("model"),
                       "status": "incomplete" if truncated else "completed",
                       "incomplete_details": {"reason": "max_output_tokens"} if truncated else None,
                       "output": [{"type": "message", "role": "assistant",
                                   "content": [{"type": "output_text", "text": reply}]}],
                       "usage": {"input_tokens": n_in, "output_tokens": n_out, "total_tokens": n_in + n_out}}
            return web.Response(body=orjson.dumps(out), content_type="application/json", headers=limit_headers)
        finally:
            state.track(-1)

    async def chat(request: web.Request) -> web.Response:
        return await handle(request, "chat")

    async def responses(request: web.Request) -> web.Response:
        return await handle(request, "responses")

    async def stats(request: web.Request) -> web.Response:
        span = state.last_change - state.first_at
        return web.json_response({"requests": state.requests, "max_in_flight": state.max_in_flight,
                                  "mean_in_flight": state.busy_s / span if span > 0 else 0.0,
                                  "by_status": {str(k): v for k, v in state.by_status.items()},
                                  "rate_limited": state.rate_limited, "span_s": span})

    async def models(request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": "mock-echo", "object": "model"}]})

    app = web.Application(client_max_size=64 << 20)
    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_post("/v1/responses", responses)
    app.router.add_get("/v1/models", models)
    app.router.add_get("/stats", stats)
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
