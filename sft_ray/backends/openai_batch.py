"""The OpenAI Batch API over HTTP: upload a JSONL file, create a batch, poll it, download its results.

Endpoints (OpenAI's, also served by OpenAI-compatible gateways and ``sft-ray serve-mock``):
``POST /v1/files`` (multipart, ``purpose=batch``), ``POST /v1/batches``, ``GET /v1/batches/{id}``,
``GET /v1/files/{id}/content`` and ``POST /v1/batches/{id}/cancel``. Each call is retried on
connection errors, timeouts, 429 and 5xx with :mod:`sft_ray.backends.retry`'s backoff; any other
answer raises :class:`BatchAPIError` with the key and secret headers redacted.

A request line's body is built by :class:`~sft_ray.backends.openai.OpenAIBackend` (the same body an
online request sends); an output line is read back into a :class:`GenerationResult` by
:func:`parse_line`: an answer, or an error result with its class. ``custom_id`` is the sample key
(:func:`~sft_ray.runfolder.layout.batch_custom_id`), never a position: a provider keeps no order.

:class:`BatchClient` is the HTTP client of those endpoints; :class:`OpenAIBatchProvider` adapts it to the
batch loop's interface (:class:`~sft_ray.backends.batchapi.BatchProvider`).
"""

from __future__ import annotations

import asyncio
from contextlib import aclosing
from typing import Any, AsyncIterator

import aiohttp
import orjson

from sft_ray import errors
from sft_ray.backends import retry
from sft_ray.backends.base import GenerationRequest, GenerationResult, Redactor, Secret, error_result
from sft_ray.backends.batchapi import (
    BatchAPIError,
    BatchLimits,
    BatchProvider,
    BatchStatus,
)
from sft_ray.backends.openai import (
    BadResponse,
    OpenAIBackend,
    parse_chat,
    parse_responses,
    refused_param,
    refused_param_advice,
)
from sft_ray.runfolder.layout import Key, batch_custom_id, parse_batch_custom_id

ENDPOINTS = {"chat": "/v1/chat/completions", "responses": "/v1/responses"}
# Lines a batch never ran (it expired or was cancelled first): sent again, not counted as a failed attempt.
NOT_RUN = ("batch_expired", "batch_cancelled")
# The error codes a provider writes on lines that ran and failed, and the class each is.
_CODES = {"rate_limit_exceeded": errors.RATE_LIMIT, "token_limit_exceeded": errors.RATE_LIMIT,
          "invalid_request": errors.CLIENT_ERROR, "invalid_request_error": errors.CLIENT_ERROR,
          "context_length_exceeded": errors.CONTEXT_LENGTH, "timeout": errors.TIMEOUT}


def request_line(cid: str, endpoint: str, body: bytes) -> bytes:
    """One line of a batch input file (``body``: the request's JSON)."""
    return b'{"custom_id":' + orjson.dumps(cid) + b',"method":"POST","url":' + orjson.dumps(endpoint) \
        + b',"body":' + body + b"}"


def parse_line(line: dict[str, Any], api: str) -> GenerationResult | None:
    """An output or error file line as a result; None for a line the batch never ran (expired, cancelled)."""
    err = line.get("error")
    response = line.get("response")
    if isinstance(err, dict) and err:
        code = str(err.get("code") or "")
        if code in NOT_RUN:
            return None
        return error_result(_CODES.get(code, errors.SERVER_ERROR),
                            f"batch line error {code or 'unknown'}: {str(err.get('message') or '')[:300]}")
    if not isinstance(response, dict):
        return error_result(errors.BAD_RESPONSE, "batch line has neither a response nor an error")
    status, body = response.get("status_code"), response.get("body")
    if status != 200:
        text = orjson.dumps(body).decode()[:300] if body is not None else ""
        status = status if isinstance(status, int) else 0
        message = f"HTTP {status}: {text}"
        raw = orjson.dumps(body) if body is not None else b""
        param = refused_param(raw) if status in (400, 422) else None
        if param:
            message = f"{refused_param_advice(param, {'config_key': 'model'})} ({message})"
        return error_result(retry.classify_status(status, text), message)
    try:
        return parse_chat(body) if api == "chat" else parse_responses(body)
    except BadResponse as e:
        return error_result(errors.BAD_RESPONSE, str(e))


class BatchClient:
    """The files and batches endpoints of one provider, for the driver's batch loop."""

    def __init__(self, model: dict[str, Any]) -> None:
        self.base = model["base_url"].rstrip("/")
        self.model = model
        secret = model.get("api_key")
        self._key = secret.get() if isinstance(secret, Secret) else None
        self._secret_headers = (model.get("secret_headers") or Secret({})).get() or {}
        self._redact = Redactor([self._key, *self._secret_headers.values()])  # whole keys and runs of them
        self._session: aiohttp.ClientSession | None = None
        self._policy = retry.Policy.of(model)

    def _auth_headers(self) -> dict[str, str]:
        """The headers that carry the key (and, for other APIs, their version)."""
        return {"Authorization": f"Bearer {self._key}"} if self._key else {}

    async def __aenter__(self) -> "BatchClient":
        headers = {**self.model.get("extra_headers", {}), **self._secret_headers, **self._auth_headers()}
        timeout = aiohttp.ClientTimeout(total=max(300.0, float(self.model["timeout_s"])),
                                        sock_connect=self.model["connect_timeout_s"])
        self._session = aiohttp.ClientSession(headers=headers, timeout=timeout)
        return self

    async def __aexit__(self, *exc: Any) -> None:
        if self._session is not None:
            await self._session.close()


    async def _call(self, method: str, path: str, what: str, form: Any = None, **kwargs: Any) -> bytes:
        """One API call with retries of transient failures; the body of its 2xx answer. ``form``: a
        function that makes the multipart body (a FormData is used once, so each attempt makes its own)."""
        session = self._session
        assert session is not None, "use `async with BatchClient(...)`"

        async def attempt(n: int) -> bytes | retry.Failure:
            try:
                async with session.request(method, self.base + path, data=form() if form else None,
                                           **kwargs) as resp:
                    raw = await resp.read()
                    if resp.status < 300:
                        return raw
                    # redacted whole, then cut: a key cut in two would no longer match
                    message = f"HTTP {resp.status}: {self._redact(raw.decode('utf-8', 'replace'))[:300]}"
                    return retry.Failure(retry.classify_status(resp.status, message), message,
                                         retry.parse_retry_after(resp.headers.get("Retry-After")))
            except (asyncio.TimeoutError, aiohttp.ClientError) as e:
                return retry.Failure(retry.CONNECTION_ERROR, f"{type(e).__name__}: {e}")

        outcome, attempts = await retry.run(attempt, self._policy)
        if isinstance(outcome, retry.Failure):
            raise BatchAPIError(self._redact(f"{what}: {outcome.message}"
                                             + (f" (after {attempts} attempts)" if attempts > 1 else "")))
        return outcome

    async def _json(self, method: str, path: str, what: str, **kwargs: Any) -> dict[str, Any]:
        raw = await self._call(method, path, what, **kwargs)
        try:
            data = orjson.loads(raw)
        except orjson.JSONDecodeError:
            data = None
        if not isinstance(data, dict) or not isinstance(data.get("id"), str):
            raise BatchAPIError(f"{what}: the answer is not a JSON object with an id")
        return data

    async def upload(self, content: bytes, filename: str) -> str:
        """Upload a batch input file; its file id."""

        def form() -> aiohttp.FormData:
            f = aiohttp.FormData()
            f.add_field("purpose", "batch")
            f.add_field("file", content, filename=filename, content_type="application/jsonl")
            return f

        return (await self._json("POST", "/files", f"uploading {filename}", form=form))["id"]

    async def create(self, file_id: str, endpoint: str, window: str, metadata: dict[str, str]) -> dict[str, Any]:
        """Create a batch from an uploaded file; the batch object."""
        body = {"input_file_id": file_id, "endpoint": endpoint, "completion_window": window, "metadata": metadata}
        return await self._json("POST", "/batches", f"creating a batch from {file_id}", json=body)

    async def get(self, batch_id: str) -> dict[str, Any]:
        return await self._json("GET", f"/batches/{batch_id}", f"polling batch {batch_id}")

    async def pages(self, path: str, cursor_param: str, max_pages: int,
                    limit: int = 100) -> AsyncIterator[list[Any] | None]:
        """A listing's pages, each page's ``data`` (a non-empty list), newest first: ``GET
        <path>?limit=<limit>``, then ``&<cursor_param>=<cursor>`` (the page's ``last_id``, else its last
        item's ``id``: OpenAI's ``after``, Anthropic's ``after_id``) while ``has_more``, at most
        ``max_pages`` pages. An empty page ends it; a page that is not JSON is None, and ends it (the
        caller trusts nothing it found then)."""
        after = None
        for _ in range(max_pages):
            query = f"?limit={limit}" + (f"&{cursor_param}={after}" if after else "")
            raw = await self._call("GET", f"{path}{query}", "listing batches")
            try:
                page = orjson.loads(raw)
            except orjson.JSONDecodeError:
                yield None
                return
            data = page.get("data") if isinstance(page, dict) else None
            if not isinstance(data, list) or not data:
                return
            yield data
            if not page.get("has_more"):
                return
            last = page.get("last_id")
            after = last if isinstance(last, str) else data[-1].get("id") if isinstance(data[-1], dict) else None

    async def find(self, file_id: str, pages: int = 10) -> dict[str, Any] | None:
        """The most recent batch made from ``file_id`` (``GET /v1/batches``, newest first, up to ``pages``
        pages of 100), or None: a run killed between creating a batch and recording it finds it here."""
        async with aclosing(self.pages("/batches", "after", pages)) as listing:
            async for data in listing:
                for batch in data or ():
                    if isinstance(batch, dict) and batch.get("input_file_id") == file_id \
                            and isinstance(batch.get("id"), str):
                        return batch
        return None

    async def cancel(self, batch_id: str) -> dict[str, Any]:
        return await self._json("POST", f"/batches/{batch_id}/cancel", f"cancelling batch {batch_id}")

    async def content(self, file_id: str) -> bytes:
        return await self._call("GET", f"/files/{file_id}/content", f"downloading {file_id}")


class OpenAIBatchProvider(BatchProvider):
    """OpenAI's Batch API as the batch loop's provider: files uploaded, then a batch made of each."""

    def __init__(self, model: dict[str, Any], limits: BatchLimits, completion_window: str) -> None:
        self.client = BatchClient(model)
        self.bodies = OpenAIBackend(model, 1)  # builds each request's body, as online requests are built
        self.model_name = getattr(self.bodies, "model_name", model.get("name"))
        self.api = model["api"]
        self.endpoint = ENDPOINTS[self.api]
        self.limits = limits
        self.window = completion_window

    async def __aenter__(self) -> "OpenAIBatchProvider":
        await self.client.__aenter__()
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.client.__aexit__(*exc)

    def request_line(self, key: Key, request: GenerationRequest) -> bytes:
        return request_line(batch_custom_id(key), self.endpoint, self.bodies.request_body(request))

    async def upload(self, data: bytes, filename: str) -> str:
        return await self.client.upload(data, filename)

    async def create(self, file_ref: str, data: bytes | None, n: int) -> BatchStatus:
        return batch_status(await self.client.create(file_ref, self.endpoint, self.window, {"sft_ray_batch": str(n)}))

    async def find(self, file_ref: str) -> BatchStatus | None:
        found = await self.client.find(file_ref)
        return batch_status(found) if found is not None else None

    async def status(self, batch_id: str) -> BatchStatus:
        return batch_status(await self.client.get(batch_id))

    async def result_lines(self, batch: BatchStatus) -> list[bytes]:
        return [line for fid in batch.results for line in (await self.client.content(fid)).splitlines()]

    def parse_result(self, line: bytes) -> tuple[Key, GenerationResult | None] | None:
        try:
            data = orjson.loads(line)
        except orjson.JSONDecodeError:
            return None
        key = parse_batch_custom_id(data.get("custom_id")) if isinstance(data, dict) else None
        return (key, parse_line(data, self.api)) if key is not None else None

    async def cancel(self, batch_id: str) -> None:
        await self.client.cancel(batch_id)


def request_counts(batch: dict[str, Any]) -> dict[str, int]:
    """A batch's ``request_counts`` (total, completed, failed), what of it is a count."""
    counts = batch.get("request_counts")
    return {str(k): v for k, v in counts.items() if type(v) is int} if isinstance(counts, dict) else {}


def batch_status(batch: dict[str, Any]) -> BatchStatus:
    """An OpenAI batch object as a :class:`BatchStatus`."""
    status = str(batch.get("status"))
    files = [fid for fid in (batch.get("output_file_id"), batch.get("error_file_id")) if isinstance(fid, str) and fid]
    refusal = None
    if status == "failed":
        refusal = orjson.dumps((batch.get("errors") or {}).get("data") or batch.get("errors")).decode()[:300]
    return BatchStatus(str(batch["id"]), status, request_counts(batch), files, refusal)
