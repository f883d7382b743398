"""What every provider's routes share: the settings, the counters, the token buckets and the
simulated failures of one mock server (:class:`Mock`), and its own ``/stats``."""

from __future__ import annotations

import asyncio
import random
import re

from aiohttp import web

from sft_ray.devserver.state import Bucket, MockConfig, MockState

_MARK = re.compile(r"\[\[fail:(500|429|timeout|malformed):(\d+)\]\]")


class Mock:
    """One mock server's shared parts: settings, counters, the random source, the token buckets."""

    def __init__(self, cfg: MockConfig, state: MockState) -> None:
        self.cfg, self.state = cfg, state
        self.rng = random.Random(cfg.seed)
        self.buckets = {name: Bucket(limit, cfg.limit_window_s) for name, limit in
                        (("requests", cfg.requests_per_minute), ("tokens", cfg.tokens_per_minute)) if limit}

    def rate_limited(self, tokens: float) -> tuple[web.Response | None, dict[str, str]]:
        """Take this request's share of every bucket: (a 429 or None, the x-ratelimit-* headers)."""
        need = {"requests": 1.0, "tokens": tokens}
        waits = {name: b.take(need[name]) for name, b in self.buckets.items()}
        if any(waits.values()):  # give back what was taken: the request is refused whole
            for name, b in self.buckets.items():
                if not waits[name]:
                    b.level += need[name]
        headers = {}
        for name, b in self.buckets.items():
            headers[f"x-ratelimit-limit-{name}"] = f"{b.rate * 60:.0f}"  # per minute, as OpenAI sends it
            headers[f"x-ratelimit-remaining-{name}"] = f"{max(0.0, b.level):.0f}"
            headers[f"x-ratelimit-reset-{name}"] = f"{(b.capacity - b.level) / b.rate:.3f}s"
        wait = max(waits.values(), default=0.0)
        if not wait:
            return None, headers
        self.state.rate_limited += 1
        return web.json_response({"error": {"message": "rate limit reached", "type": "rate_limit_error"}},
                                 status=429, headers={**headers, "Retry-After": f"{wait:.3f}"}), headers

    async def failure(self, text: str, key: str, auth: str) -> web.Response | None:
        """A simulated failure for this attempt, or None to answer normally."""
        m = _MARK.search(text)
        kind = None
        if m:
            self.state.attempts[key] += 1
            if self.state.attempts[key] <= int(m.group(2)):
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
            r = self.rng.random()
            for name, rate in (("500", self.cfg.error_rate), ("429", self.cfg.rate_limit_rate),
                               ("timeout", self.cfg.timeout_rate), ("malformed", self.cfg.malformed_rate)):
                if r < rate:
                    kind = name
                    break
                r -= rate
        if kind == "500":
            return web.json_response({"error": {"message": "internal error"}}, status=500)
        if kind == "429":
            return web.json_response({"error": {"message": "rate limited"}}, status=429,
                                     headers={"Retry-After": f"{self.cfg.retry_after_s:g}"})
        if kind == "timeout":
            await asyncio.sleep(self.cfg.hang_s)
        if kind == "malformed":
            return web.Response(body=b'{"choices": [{"message": ', content_type="application/json")
        return None

    async def stats(self, request: web.Request) -> web.Response:
        state = self.state
        span = state.last_change - state.first_at
        return web.json_response({"requests": state.requests, "max_in_flight": state.max_in_flight,
                                  "mean_in_flight": state.busy_s / span if span > 0 else 0.0,
                                  "tool_call_turns": state.tool_call_turns, "tool_calls": state.tool_calls,
                                  "by_status": {str(k): v for k, v in state.by_status.items()},
                                  "rate_limited": state.rate_limited, "span_s": span})

    def routes(self) -> list[web.RouteDef]:
        return [web.get("/stats", self.stats)]
