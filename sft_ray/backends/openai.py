"""Hosted backend: any OpenAI-compatible ``/v1`` endpoint, Chat Completions or Responses.

One aiohttp session per generation actor, many requests in flight on it. The
transport does one attempt at a time; the loop in :meth:`OpenAIBackend.generate`
applies the policy in :mod:`sft_ray.backends.retry`.
"""

from __future__ import annotations

import asyncio
import random
from typing import Any

import aiohttp
import orjson

from sft_ray.backends import retry
from sft_ray.backends.base import Backend, GenerationRequest, GenerationResult, Secret, error_result
from sft_ray.errors import BUDGET_EXHAUSTED
from sft_ray.ratelimit import Limiter, Permit

# responses_create_params keys that Chat Completions understands under the same name.
_CHAT_KEYS = {"temperature", "top_p", "stop", "frequency_penalty", "presence_penalty", "logit_bias",
              "logprobs", "top_logprobs", "user", "tools", "tool_choice", "parallel_tool_calls"}
# Responses API has no seed; everything else in responses_create_params is passed through.
_RESPONSES_DROP = {"seed"}


class BadResponse(Exception):
    """The server answered 2xx with a body we cannot read."""


def chat_body(name: str | None, req: GenerationRequest, send_seed: bool) -> dict[str, Any]:
    body: dict[str, Any] = {"model": name, "messages": req.messages}
    for k, v in req.params.items():
        if k in _CHAT_KEYS:
            body[k] = v
        elif k == "max_output_tokens":
            body["max_tokens"] = v
        elif k == "seed" and send_seed:
            body["seed"] = v
    return body


def responses_body(name: str | None, req: GenerationRequest) -> dict[str, Any]:
    body = {k: v for k, v in req.params.items() if k not in _RESPONSES_DROP}
    body["model"] = name
    body["input"] = req.messages
    return body


def parse_chat(data: Any) -> GenerationResult:
    try:
        choice = data["choices"][0]
        text = choice["message"].get("content") or ""
        usage = data.get("usage") or {}
        inp, out = int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0)
        return GenerationResult(text=text, finish_reason=choice.get("finish_reason"),
                                usage={"input_tokens": inp, "output_tokens": out, "total_tokens": inp + out})
    except (KeyError, IndexError, TypeError, AttributeError, ValueError) as e:
        raise BadResponse(f"unexpected chat completion body ({type(e).__name__}: {e})") from None


def parse_responses(data: Any) -> GenerationResult:
    try:
        texts = [part["text"] for item in data["output"] if item.get("type") == "message"
                 for part in item.get("content") or [] if part.get("type") == "output_text"]
        status = data.get("status", "completed")
        reason = (data.get("incomplete_details") or {}).get("reason")
        finish = "stop" if status == "completed" else ("length" if reason == "max_output_tokens" else reason or status)
        usage = data.get("usage") or {}
        inp, out = int(usage.get("input_tokens") or 0), int(usage.get("output_tokens") or 0)
        return GenerationResult(text="".join(texts), finish_reason=finish,
                                usage={"input_tokens": inp, "output_tokens": out, "total_tokens": inp + out})
    except (KeyError, TypeError, AttributeError, ValueError) as e:
        raise BadResponse(f"unexpected responses body ({type(e).__name__}: {e})") from None


class OpenAIBackend(Backend):
    """Chat Completions or Responses over HTTP, with retries, timeouts and error classes."""

    def __init__(self, model: dict[str, Any], max_in_flight: int) -> None:
        super().__init__(model, max_in_flight)
        self.api = model.get("api", "chat")
        self.url = model["base_url"].rstrip("/") + ("/chat/completions" if self.api == "chat" else "/responses")
        secret = model.get("api_key")  # a Secret read from api_key_env on the driver; never logged
        self._key = secret.get() if secret is not None else None
        # [config] extra_headers_env values, read on the driver; sent, never logged (see _redact).
        self._secret_headers = (model.get("secret_headers") or Secret({})).get() or {}
        self._session: aiohttp.ClientSession | None = None
        self.limiter = Limiter.from_model(model, max_in_flight)  # [config] rate limits, auto concurrency, budget
        self._rng = random.Random()

    async def start(self) -> None:
        headers = {"Content-Type": "application/json", **self.model.get("extra_headers", {}), **self._secret_headers}
        if self._key:
            headers["Authorization"] = f"Bearer {self._key}"
        timeout = aiohttp.ClientTimeout(total=self.model["timeout_s"], sock_connect=self.model["connect_timeout_s"])
        connector = aiohttp.TCPConnector(limit=self.max_in_flight, ttl_dns_cache=300)
        self._session = aiohttp.ClientSession(headers=headers, timeout=timeout, connector=connector,
                                              json_serialize=lambda o: orjson.dumps(o).decode())

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    def close_now(self) -> None:
        if self._session is not None and not self._session.closed:
            connector = self._session.connector
            self._session.detach()
            if connector is not None:
                # _close() shuts the sockets synchronously; close() would return an awaitable
                # that nobody is left to await when Ray Data tears the actor down.
                connector._close()

    def _redact(self, text: str) -> str:
        for secret in (self._key, *self._secret_headers.values()):
            text = text.replace(secret, "***") if secret else text
        return text

    def _body(self, req: GenerationRequest) -> bytes:
        if self.api == "chat":
            body = chat_body(self.model.get("name"), req, self.model.get("send_seed", True))
        else:
            body = responses_body(self.model.get("name"), req)
        body.update(self.model.get("extra_body") or {})
        return orjson.dumps(body)

    async def _attempt(self, payload: bytes, permit: Permit | None = None,
                       ) -> tuple[GenerationResult | None, str | None, str, float | None]:
        """One HTTP attempt: (result, error class, message, Retry-After seconds)."""
        assert self._session is not None, "start() was not called"
        try:
            async with self._session.post(self.url, data=payload) as resp:
                raw = await resp.read()
                if permit is not None:
                    permit.headers = resp.headers  # [config] x-ratelimit-* for the limiter
                if resp.status >= 400:
                    text = raw[:300].decode("utf-8", "replace")
                    return (None, retry.classify_status(resp.status, text), f"HTTP {resp.status}: {text}",
                            retry.parse_retry_after(resp.headers.get("Retry-After")))
                try:
                    data = orjson.loads(raw)
                except orjson.JSONDecodeError:
                    return None, retry.BAD_RESPONSE, f"HTTP {resp.status}: body is not JSON", None
                try:
                    result = parse_chat(data) if self.api == "chat" else parse_responses(data)
                except BadResponse as e:
                    return None, retry.BAD_RESPONSE, str(e), None
                return result, None, "", None
        except asyncio.TimeoutError:
            return None, retry.TIMEOUT, f"no complete response within {self.model['timeout_s']} s", None
        except aiohttp.ClientConnectionError as e:
            return None, retry.CONNECTION_ERROR, f"{type(e).__name__}: {e}", None
        except aiohttp.ClientError as e:
            return None, retry.BAD_RESPONSE, f"{type(e).__name__}: {e}", None

    async def generate(self, request: GenerationRequest) -> GenerationResult:
        payload = self._body(request)
        max_attempts = 1 + int(self.model.get("max_retries", 6))
        for attempt in range(1, max_attempts + 1):
            permit = None
            if self.limiter is not None:  # [config] waits for shared permits and a slot; refused: budget spent
                permit = await self.limiter.acquire(len(payload) / 4, request.params.get("max_output_tokens") or 1024)
                if permit.refused:
                    return error_result(BUDGET_EXHAUSTED, permit.refused, attempts=attempt)
            result, kind, message, retry_after = await self._attempt(payload, permit)
            if permit is not None:  # [config]
                self.limiter.report(permit, kind, result.usage if result else None, retry_after)
            if result is not None:
                result.attempts = attempt
                return result
            if kind not in retry.RETRYABLE or attempt == max_attempts:
                suffix = f" (after {attempt} attempts)" if attempt > 1 else ""
                return error_result(kind, self._redact(message) + suffix, attempts=attempt)
            await asyncio.sleep(retry.backoff_s(attempt, self.model["base_retry_wait_s"],
                                                self.model["max_retry_wait_s"], retry_after, self._rng))
        raise AssertionError("unreachable")
