"""OpenAI's online endpoints: ``POST /v1/chat/completions``, ``POST /v1/responses``, ``GET /v1/models``,
answered by echoing (or as the agent model, or the judge), with a reasoning model's refusals."""

from __future__ import annotations

import asyncio
import re
import time

import orjson
from aiohttp import web

from sft_ray.devserver.agent import _last_user_text, agent_turn, tool_call_answer
from sft_ray.devserver.core import Mock
from sft_ray.devserver.judge import judge_reply
from sft_ray.devserver.state import simulate_latency

_SLEEP = re.compile(r"\[\[sleep:(\d+(?:\.\d+)?)\]\]")


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


class OpenAIRoutes:
    """The online endpoints; :meth:`answer` is also what the Batch API answers each line with."""

    def __init__(self, mock: Mock) -> None:
        self.mock, self.cfg, self.state, self.rng, self.buckets = mock, mock.cfg, mock.state, mock.rng, mock.buckets

    async def handle(self, request: web.Request, api: str) -> web.Response:
        self.state.requests += 1
        self.state.track(+1)
        self.state.max_in_flight = max(self.state.max_in_flight, self.state.in_flight)
        try:
            return await self.answer(api, orjson.loads(await request.read()), request.headers, online=True)
        finally:
            self.state.track(-1)

    async def answer(self, api: str, body: dict, headers, online: bool) -> web.Response:
        """The answer to one request body (online, or a line of a batch: no latency, no rate limits)."""
        if self.state.keep_bodies:
            self.state.bodies = (self.state.bodies + [body])[-self.state.keep_bodies:]
        refused = refused_by_reasoning_model(api, body)
        if refused is not None:
            self.state.by_status[400] += 1
            return refused
        msgs = body.get("messages") if api == "chat" else body.get("input")
        text = _last_user_text(msgs)
        call_no = self.state.requests
        turn = agent_turn(body, msgs, text, self.cfg, self.rng, call_no)
        if self.cfg.latency_ms and online:
            await simulate_latency(self.cfg)
        if m := _SLEEP.search(text):
            await asyncio.sleep(float(m.group(1)))
        auth = headers.get("Authorization", "")
        self.state.auth_headers.add(auth)
        self.state.api_key_headers.add(headers.get("api-key", ""))
        auth += " " + headers.get("api-key", "")
        key = f"{text}|{body.get('seed')}|{body.get('temperature')}"
        limit = (body.get("max_tokens") or body.get("max_completion_tokens")) if api == "chat" \
            else body.get("max_output_tokens")
        limit_headers: dict[str, str] = {}
        if self.buckets and online:
            n_prompt = sum(len(_last_user_text([m]).split()) for m in msgs) if isinstance(msgs, list) else 0
            refused, limit_headers = self.mock.rate_limited(n_prompt + (limit or 0))
            if refused is not None:
                self.state.by_status[429] += 1
                return refused
        failed = await self.mock.failure(text, key if turn is None else f"{key}|step{turn.step}", auth)
        if failed is not None:
            self.state.by_status[failed.status] += 1
            return failed
        n_in = sum(len(_last_user_text([m]).split()) for m in msgs) if isinstance(msgs, list) else len(text.split())
        self.state.by_status[200] += 1
        self.state.served[text] += 1
        if turn is not None and turn.calls:
            self.state.tool_call_turns += 1
            self.state.tool_calls += len(turn.calls)
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

    async def chat(self, request: web.Request) -> web.Response:
        return await self.handle(request, "chat")

    async def responses(self, request: web.Request) -> web.Response:
        return await self.handle(request, "responses")

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": "mock-echo", "object": "model"}]})

    def routes(self) -> list[web.RouteDef]:
        return [web.post("/v1/chat/completions", self.chat), web.post("/v1/responses", self.responses),
                web.get("/v1/models", self.models)]
