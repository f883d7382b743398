"""Hosted backend: any OpenAI-compatible ``/v1`` endpoint, Chat Completions or Responses.

One aiohttp session per generation actor, many requests in flight on it. The
transport does one attempt at a time; the loop in :meth:`OpenAIBackend.generate`
applies the policy in :mod:`sft_ray.backends.retry`.
"""

from __future__ import annotations

import asyncio
import functools
import re
import time
from typing import Any

import aiohttp
import orjson

from sft_ray import metrics
from sft_ray.backends import retry
from sft_ray.backends.base import Backend, GenerationRequest, GenerationResult, Redactor, Secret, error_result
from sft_ray.cost import estimate_tokens
from sft_ray.errors import BUDGET_EXHAUSTED
from sft_ray.messages import arguments_text, to_responses_input, tool_choice_to_responses, tool_to_responses
from sft_ray.ratelimit import Limiter, Permit
from sft_ray.rows import drop_params

# responses_create_params keys that Chat Completions understands under the same name.
_CHAT_KEYS = {"temperature", "top_p", "stop", "frequency_penalty", "presence_penalty", "logit_bias",
              "logprobs", "top_logprobs", "user", "reasoning_effort", "service_tier", "metadata", "store"}
# Responses API has no seed (nor top_k, Anthropic's and vLLM's); everything else in responses_create_params
# is passed through.
_RESPONSES_DROP = {"seed", "reasoning_effort", "top_k"}


@functools.cache
def _omittable() -> frozenset[str]:
    """What model.omit_params may name: the keys of responses_create_params. Imported here, when a
    request was refused, so that an actor's start does not import the config models (~0.4 s of CPU)."""
    from sft_ray.config import SamplingConfig

    return frozenset(SamplingConfig.model_fields)


# Requested output tokens that model.timeout_s covers alone; past them, timeout_per_1k_output_tokens_s adds time.
TIMEOUT_BASE_TOKENS = 1024
# OpenAI's words for a body field a model refuses: "Unsupported parameter: 'temperature' is not supported
# with this model." / "Unsupported value: 'temperature' does not support 0.7 with this model."
_UNSUPPORTED = re.compile(r"unsupported (?:parameter|value):?\s*'([A-Za-z_.]+)'", re.IGNORECASE)


def request_timeout_s(model: dict[str, Any], params: dict[str, Any]) -> float:
    """The whole-request deadline: ``timeout_s``, plus ``timeout_per_1k_output_tokens_s`` for every
    1000 output tokens the request asks for beyond :data:`TIMEOUT_BASE_TOKENS`."""
    base = float(model["timeout_s"])
    asked = params.get("max_output_tokens")
    per_1k = float(model.get("timeout_per_1k_output_tokens_s") or 0.0)
    if not isinstance(asked, int) or not per_1k:
        return base
    return base + per_1k * max(0, asked - TIMEOUT_BASE_TOKENS) / 1000


def refused_param(body: bytes) -> str | None:
    """The request field a 400 says the model does not support (OpenAI's ``param`` with code
    ``unsupported_parameter`` / ``unsupported_value``, or those words in the message), or None."""
    try:
        err = orjson.loads(body).get("error")
    except (orjson.JSONDecodeError, AttributeError):
        err = None
    if isinstance(err, dict) and str(err.get("code")) in ("unsupported_parameter", "unsupported_value") \
            and isinstance(err.get("param"), str) and err["param"]:
        return err["param"]
    m = _UNSUPPORTED.search(body[:2000].decode("utf-8", "replace"))
    return m.group(1) if m else None


def refused_param_advice(param: str, model: dict[str, Any]) -> str:
    """What to set when the server refuses the body field ``param``, naming the config key."""
    section = model.get("config_key") or "model"
    if param in ("max_tokens", "max_completion_tokens"):
        other = "max_completion_tokens" if param == "max_tokens" else "max_tokens"
        return f"the model refuses '{param}': set {section}.max_tokens_field: {other}"
    if param in (model.get("extra_body") or {}):
        return f"the model refuses '{param}': remove it from {section}.extra_body"
    if param not in _omittable():
        return f"the model refuses the request field '{param}'"
    omit = list(dict.fromkeys([*(model.get("omit_params") or []), param]))
    return (f"the model refuses '{param}': set {section}.omit_params: [{', '.join(omit)}] "
            f"so it is never sent")


def close_session_now(session: aiohttp.ClientSession | None) -> None:
    """Shut an aiohttp session's sockets synchronously: at actor teardown Ray Data leaves no
    loop to await ``close()`` on (``connector._close()`` is the synchronous half of it)."""
    if session is not None and not session.closed:
        connector = session.connector
        session.detach()
        if connector is not None:
            connector._close()


class BadResponse(Exception):
    """The server answered 2xx with a body we cannot read."""


def _chat_message(m: dict[str, Any]) -> dict[str, Any]:
    """A transcript message as Chat Completions takes it (our extra keys removed)."""
    if m["role"] == "tool":
        return {"role": "tool", "tool_call_id": m["tool_call_id"], "content": m.get("content") or ""}
    return {k: v for k, v in m.items() if k not in ("reasoning_content", "thinking_blocks")}


def chat_body(name: str | None, req: GenerationRequest, send_seed: bool,
              max_tokens_field: str = "max_tokens") -> dict[str, Any]:
    body: dict[str, Any] = {"model": name, "messages": [_chat_message(m) for m in req.messages]}
    for k, v in req.params.items():
        if k in _CHAT_KEYS:
            body[k] = v
        elif k == "max_output_tokens":
            body[max_tokens_field] = v
        elif k == "reasoning" and isinstance(v, dict) and v.get("effort"):
            body["reasoning_effort"] = v["effort"]  # the Responses API's nested form
        elif k == "seed" and send_seed:
            body["seed"] = v
    if req.tools:
        body["tools"] = req.tools
        if req.tool_choice is not None:
            body["tool_choice"] = req.tool_choice
        if req.parallel_tool_calls is not None:
            body["parallel_tool_calls"] = req.parallel_tool_calls
    return body


def responses_body(name: str | None, req: GenerationRequest) -> dict[str, Any]:
    body = {k: v for k, v in req.params.items() if k not in _RESPONSES_DROP}
    if "reasoning_effort" in req.params and "reasoning" not in body:
        body["reasoning"] = {"effort": req.params["reasoning_effort"]}
    body["model"] = name
    body["input"] = to_responses_input(req.messages)
    if req.tools:
        body["tools"] = [tool_to_responses(t) for t in req.tools]
        if req.tool_choice is not None:
            body["tool_choice"] = tool_choice_to_responses(req.tool_choice)
        if req.parallel_tool_calls is not None:
            body["parallel_tool_calls"] = req.parallel_tool_calls
    return body


def _usage(usage: Any, inp_key: str, out_key: str) -> dict[str, int]:
    usage = usage or {}
    inp, out = int(usage.get(inp_key) or 0), int(usage.get(out_key) or 0)
    return {"input_tokens": inp, "output_tokens": out, "total_tokens": inp + out}


def parse_chat(data: Any) -> GenerationResult:
    try:
        choice = data["choices"][0]
        message = choice["message"]
        calls = [{"id": c.get("id") or f"call_{i}", "name": c["function"]["name"],
                  "arguments": arguments_text(c["function"].get("arguments"))}
                 for i, c in enumerate(message.get("tool_calls") or [])]
        reasoning = message.get("reasoning_content") or message.get("reasoning")
        return GenerationResult(text=message.get("content") or "", finish_reason=choice.get("finish_reason"),
                                usage=_usage(data.get("usage"), "prompt_tokens", "completion_tokens"),
                                tool_calls=calls, reasoning=reasoning if isinstance(reasoning, str) else None)
    except (KeyError, IndexError, TypeError, AttributeError, ValueError) as e:
        raise BadResponse(f"unexpected chat completion body ({type(e).__name__}: {e})") from None


def parse_responses(data: Any) -> GenerationResult:
    try:
        texts, calls, reasoning = [], [], []
        for item in data["output"]:
            kind = item.get("type")
            if kind == "message":
                texts += [p["text"] for p in item.get("content") or [] if p.get("type") == "output_text"]
            elif kind == "function_call":
                calls.append({"id": item["call_id"], "name": item["name"],
                              "arguments": arguments_text(item.get("arguments"))})
            elif kind == "reasoning":
                reasoning += [p.get("text", "") for p in (item.get("summary") or []) + (item.get("content") or [])
                              if isinstance(p, dict)]
        status = data.get("status", "completed")
        reason = (data.get("incomplete_details") or {}).get("reason")
        if status == "completed":
            finish = "tool_calls" if calls else "stop"
        else:
            finish = "length" if reason == "max_output_tokens" else reason or status
        return GenerationResult(text="".join(texts), finish_reason=finish,
                                usage=_usage(data.get("usage"), "input_tokens", "output_tokens"),
                                tool_calls=calls, reasoning="\n".join(reasoning) or None)
    except (KeyError, TypeError, AttributeError, ValueError) as e:
        raise BadResponse(f"unexpected responses body ({type(e).__name__}: {e})") from None


class OpenAIBackend(Backend):
    """Chat Completions or Responses over HTTP, with retries, timeouts and error classes."""

    def __init__(self, model: dict[str, Any], requests_per_actor: int) -> None:
        super().__init__(model, requests_per_actor)
        self.api = model.get("api", "chat")
        self.url = model["base_url"].rstrip("/") + ("/chat/completions" if self.api == "chat" else "/responses")
        secret = model.get("api_key")  # a Secret read from api_key_env on the driver; never logged
        self._key = secret.get() if secret is not None else None
        # extra_headers_env values, read on the driver; sent, never logged (see _redact).
        self._secret_headers = (model.get("secret_headers") or Secret({})).get() or {}
        self._redact = Redactor([self._key, *self._secret_headers.values()])
        self._session: aiohttp.ClientSession | None = None
        self.limiter = Limiter.from_model(model, requests_per_actor)  # rate limits, auto concurrency, budget
        self._policy = retry.Policy.of(model)

    def _auth_headers(self) -> dict[str, str]:
        """The headers that carry the key (and, for other APIs, their version)."""
        return {"Authorization": f"Bearer {self._key}"} if self._key else {}

    def _parse(self, data: Any) -> GenerationResult:
        """A 2xx body as a result; :class:`BadResponse` when it cannot be read."""
        return parse_chat(data) if self.api == "chat" else parse_responses(data)

    def _error_message(self, status: int, raw: bytes) -> str:
        """What a non-2xx answer says, redacted and cut."""
        text = self._redact(raw.decode("utf-8", "replace"))[:300]  # redact the whole body, then cut
        message = f"HTTP {status}: {text}"
        param = refused_param(raw) if status in (400, 422) else None
        if param:  # the advice first: row error messages are capped
            message = f"{refused_param_advice(param, self.model)} ({message})"
        return message

    def _limit_headers(self, headers: Any) -> Any:
        """The response headers the limiter reads (``x-ratelimit-*``)."""
        return headers

    async def start(self) -> None:
        headers = {"Content-Type": "application/json", **self.model.get("extra_headers", {}), **self._secret_headers,
                   **self._auth_headers()}
        timeout = aiohttp.ClientTimeout(total=self.model["timeout_s"], sock_connect=self.model["connect_timeout_s"])
        connector = aiohttp.TCPConnector(limit=self.requests_per_actor, ttl_dns_cache=300)
        self._session = aiohttp.ClientSession(headers=headers, timeout=timeout, connector=connector,
                                              json_serialize=lambda o: orjson.dumps(o).decode())

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    def close_now(self) -> None:
        close_session_now(self._session)

    def _omit(self, req: GenerationRequest) -> GenerationRequest:
        """The request without the keys ``omit_params`` names (tool_choice and parallel_tool_calls too)."""
        omit = self.model.get("omit_params")
        if not omit:
            return req
        return GenerationRequest(req.messages, drop_params(req.params, omit), req.request_id, req.tools,
                                 None if "tool_choice" in omit else req.tool_choice,
                                 None if "parallel_tool_calls" in omit else req.parallel_tool_calls)

    def request_body(self, req: GenerationRequest) -> bytes:
        """The JSON body this backend sends for ``req`` (``omit_params`` applied): a Batch API line's body too."""
        return self._body(self._omit(req))

    def _body(self, req: GenerationRequest) -> bytes:
        if self.api == "chat":
            body = chat_body(self.model.get("name"), req, self.model.get("send_seed", True),
                             self.model.get("max_tokens_field", "max_tokens"))
        else:
            body = responses_body(self.model.get("name"), req)
        body.update(self.model.get("extra_body") or {})
        return orjson.dumps(body)

    def _timeout_words(self, deadline: float, params: dict[str, Any]) -> str:
        section = self.model.get("config_key") or "model"
        if deadline == self.model["timeout_s"]:
            return f"{section}.timeout_s"
        return (f"{section}.timeout_s {self.model['timeout_s']:g} + "
                f"{self.model['timeout_per_1k_output_tokens_s']:g} s per 1000 of the "
                f"{params['max_output_tokens']} requested output tokens beyond {TIMEOUT_BASE_TOKENS}")

    async def _attempt(self, payload: bytes, permit: Permit | None = None, timeout_s: float | None = None,
                       timeout_words: str = "") -> tuple[GenerationResult | None, str | None, str, float | None]:
        """One HTTP attempt: (result, error class, message, Retry-After seconds)."""
        assert self._session is not None, "start() was not called"
        deadline = float(timeout_s if timeout_s is not None else self.model["timeout_s"])
        timeout = aiohttp.ClientTimeout(total=deadline, sock_connect=self.model["connect_timeout_s"])
        try:
            async with self._session.post(self.url, data=payload, timeout=timeout) as resp:
                raw = await resp.read()
                if permit is not None:
                    permit.headers = self._limit_headers(resp.headers)  # x-ratelimit-* for the limiter
                if resp.status >= 400:
                    message = self._error_message(resp.status, raw)
                    return (None, retry.classify_status(resp.status, message), message,
                            retry.parse_retry_after(resp.headers.get("Retry-After")))
                try:
                    data = orjson.loads(raw)
                except orjson.JSONDecodeError:
                    return None, retry.BAD_RESPONSE, f"HTTP {resp.status}: body is not JSON", None
                try:
                    result = self._parse(data)
                except BadResponse as e:
                    return None, retry.BAD_RESPONSE, str(e), None
                return result, None, "", None
        except asyncio.TimeoutError:
            return (None, retry.TIMEOUT, f"no complete response within {deadline:g} s"
                    + (f" ({timeout_words})" if timeout_words else ""), None)
        except aiohttp.ClientConnectionError as e:
            return None, retry.CONNECTION_ERROR, f"{type(e).__name__}: {e}", None
        except aiohttp.ClientError as e:
            return None, retry.BAD_RESPONSE, f"{type(e).__name__}: {e}", None

    async def generate(self, request: GenerationRequest) -> GenerationResult:
        request = self._omit(request)
        payload = self._body(request)
        deadline = request_timeout_s(self.model, request.params)
        words = self._timeout_words(deadline, request.params)

        async def attempt(n: int) -> GenerationResult | retry.Failure:
            permit = None
            if self.limiter is not None:  # waits for shared permits and a slot; refused: budget spent
                permit = await self.limiter.acquire(*estimate_tokens(len(payload),
                                                                     request.params.get("max_output_tokens")))
                if permit.refused:
                    return error_result(BUDGET_EXHAUSTED, permit.refused, attempts=n)
            t0 = time.monotonic()
            result, kind, message, retry_after = await self._attempt(payload, permit, deadline, words)
            # Counted on the sample in flight (sft_ray/metrics.py): status, seconds, reported usage, and the
            # input estimate the rate limiter bills a failure without usage at.
            metrics.model_attempt(kind, time.monotonic() - t0, result.usage if result else None,
                                  estimate_tokens(len(payload), request.params.get("max_output_tokens"))[0])
            if permit is not None:
                self.limiter.report(permit, kind, result.usage if result else None, retry_after)
            if result is not None:
                result.attempts = n
                return result
            return retry.Failure(str(kind), message, retry_after)

        outcome, attempts = await retry.run(attempt, self._policy)
        if isinstance(outcome, retry.Failure):
            suffix = f" (after {attempts} attempts)" if attempts > 1 else ""
            return error_result(outcome.kind, self._redact(outcome.message) + suffix, attempts=attempts)
        return outcome
