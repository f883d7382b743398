"""Anthropic's Message Batches as the batch loop's provider (:class:`AnthropicBatchProvider`).

``POST /v1/messages/batches`` takes the requests inline (``{"requests": [{custom_id, params}]}``, at most
100,000 requests and 256 MB), so there are no files: :meth:`~AnthropicBatchProvider.upload` only names
the file (its reference records the time and the number of requests), and
:meth:`~AnthropicBatchProvider.create` sends its bytes. ``GET /v1/messages/batches/{id}`` is polled until
``processing_status: ended``; the JSONL at its ``results_url`` has one line per request, ``succeeded``
(the message), ``errored`` (the API's error), ``canceled`` or ``expired`` (never run: sent again).

Custom ids must match ``^[a-zA-Z0-9_-]{1,64}$`` whatever the row ids are: a sample ``(id, k)`` is
``<k>_<id in unpadded base64url>`` when that fits, else ``<k>-<hash of the id>``, (:func:`~sft_ray.runfolder.layout.anthropic_custom_id`), which the adapter maps
back from the keys the loop names before parsing (:meth:`~AnthropicBatchProvider.expect`).

Message Batches have no metadata to find a batch by: a run killed after ``create`` and before the batch
was recorded finds it by listing the batches made since the upload was recorded with the same number of
requests (:meth:`~AnthropicBatchProvider.find`); a batch adopted by mistake would hold none of the
entry's custom ids, and its samples would be sent again.

Request bodies are :class:`~sft_ray.backends.anthropic.AnthropicBackend`'s (the body an online request
sends); answers are read by :func:`~sft_ray.backends.anthropic.parse_message`. HTTP, retries and the listing's
pages are the OpenAI adapter's :class:`~sft_ray.backends.openai_batch.BatchClient`, with Anthropic's headers.
"""

from __future__ import annotations

import time
from contextlib import aclosing
from datetime import datetime
from typing import Any
from urllib.parse import urlsplit

import orjson

from sft_ray import errors
from sft_ray.backends.anthropic import DEFAULT_BASE_URL, AnthropicBackend, parse_message
from sft_ray.backends.base import GenerationRequest, GenerationResult, error_result
from sft_ray.backends.batchapi import BatchAPIError, BatchLimits, BatchProvider, BatchStatus
from sft_ray.backends.openai import BadResponse
from sft_ray.backends.openai_batch import BatchClient
from sft_ray.runfolder.layout import Key, anthropic_custom_id, parse_anthropic_custom_id

MAX_REQUESTS = 100_000  # Anthropic's limits on one batch
MAX_BYTES = 256_000_000
_ENVELOPE = len(b'{"requests":[]}')
# The API's error types, as error classes (a batch line's `errored` result).
_TYPES = {"invalid_request_error": errors.CLIENT_ERROR, "authentication_error": errors.AUTH_ERROR,
          "permission_error": errors.AUTH_ERROR, "not_found_error": errors.CLIENT_ERROR,
          "request_too_large": errors.CLIENT_ERROR, "rate_limit_error": errors.RATE_LIMIT,
          "api_error": errors.SERVER_ERROR, "overloaded_error": errors.SERVER_ERROR, "timeout_error": errors.TIMEOUT}


def provider_limits(max_requests: int, max_bytes: int) -> BatchLimits:
    """The configured limits within Anthropic's (the bytes less the request envelope)."""
    return BatchLimits(min(max_requests, MAX_REQUESTS), min(max_bytes, MAX_BYTES - _ENVELOPE))


def parse_result_line(data: Any) -> GenerationResult | None:
    """A results line's ``result`` as a result; None for a request the batch never ran."""
    result = data.get("result") if isinstance(data, dict) else None
    kind = result.get("type") if isinstance(result, dict) else None
    if kind in ("canceled", "expired"):
        return None
    if kind == "succeeded":
        try:
            return parse_message(result.get("message"))
        except BadResponse as e:
            return error_result(errors.BAD_RESPONSE, str(e))
    if kind == "errored":
        err = result.get("error")
        inner = err.get("error") if isinstance(err, dict) and isinstance(err.get("error"), dict) else err
        etype = str((inner or {}).get("type") or "unknown") if isinstance(inner, dict) else "unknown"
        message = str((inner or {}).get("message") or "")[:300] if isinstance(inner, dict) else ""
        kind_ = _TYPES.get(etype, errors.SERVER_ERROR)
        if kind_ == errors.CLIENT_ERROR and "too long" in message:
            kind_ = errors.CONTEXT_LENGTH
        return error_result(kind_, f"batch request errored: {etype}: {message}")
    return error_result(errors.BAD_RESPONSE, f"batch result of unknown type {kind!r}")


class AnthropicBatchClient(BatchClient):
    """:class:`BatchClient`'s requests and retries with Anthropic's headers and root."""

    def __init__(self, model: dict[str, Any]) -> None:
        super().__init__({**model, "base_url": model.get("base_url") or DEFAULT_BASE_URL})

    def _auth_headers(self) -> dict[str, str]:
        headers = {"anthropic-version": self.model.get("anthropic_version") or "2023-06-01",
                   "content-type": "application/json"}
        if self._key:
            headers["x-api-key"] = self._key
        return headers


def _when(value: Any) -> float | None:
    try:
        return datetime.fromisoformat(str(value).replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


class AnthropicBatchProvider(BatchProvider):
    """Message Batches for the batch loop (see the module docstring)."""

    stores_files = False

    def __init__(self, model: dict[str, Any], limits: BatchLimits) -> None:
        self.client = AnthropicBatchClient(model)
        self.bodies = AnthropicBackend(model, 1)  # builds each request's body, as online requests are built
        self.model_name = model.get("name")
        self.limits = provider_limits(limits.max_requests, limits.max_bytes)
        self.hashed: dict[str, Key] = {}

    async def __aenter__(self) -> "AnthropicBatchProvider":
        await self.client.__aenter__()
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.client.__aexit__(*exc)

    def _cid(self, key: Key) -> str:
        cid = anthropic_custom_id(key)
        if "_" not in cid:
            self.hashed[cid] = key
        return cid

    def request_line(self, key: Key, request: GenerationRequest) -> bytes:
        return b'{"custom_id":' + orjson.dumps(self._cid(key)) + b',"params":' + self.bodies.request_body(request) \
            + b"}"

    async def upload(self, data: bytes, filename: str) -> str:
        """No file to store: a name holding the time and the number of requests (what :meth:`find` needs)."""
        requests = data.count(b"\n")
        return f"{filename}@{time.time():.3f}#{requests}"

    async def create(self, file_ref: str, data: bytes | None, n: int) -> BatchStatus:
        if data is None:
            raise BatchAPIError(f"creating a batch of {file_ref}: Message Batches need the requests themselves")
        body = b'{"requests":[' + b",".join(line for line in data.splitlines() if line.strip()) + b"]}"
        return batch_status(await self.client._json("POST", "/v1/messages/batches", f"creating a batch of {file_ref}",
                                                    form=lambda: body))

    async def find(self, file_ref: str, pages: int = 5) -> BatchStatus | None:
        """The oldest batch created since ``file_ref`` was named with its number of requests, or None."""
        _, _, tail = file_ref.rpartition("@")
        stamp, _, count = tail.partition("#")
        try:
            since, total = float(stamp) - 5.0, int(count)
        except ValueError:
            return None
        found = None
        async with aclosing(self.client.pages("/v1/messages/batches", "after_id", pages)) as listing:
            async for data in listing:
                if data is None:
                    return None
                for batch in data:  # newest first: the last match is the oldest
                    if not isinstance(batch, dict) or not isinstance(batch.get("id"), str):
                        continue
                    created = _when(batch.get("created_at"))
                    if created is not None and created >= since and sum(request_counts(batch).values()) == total:
                        found = batch
        return batch_status(found) if found is not None else None

    async def status(self, batch_id: str) -> BatchStatus:
        return batch_status(await self.client._json("GET", f"/v1/messages/batches/{batch_id}",
                                                    f"polling batch {batch_id}"))

    async def result_lines(self, batch: BatchStatus) -> list[bytes]:
        url = batch.results[0] if batch.results else ""
        base = urlsplit(self.client.base)
        same_origin = (urlsplit(url).scheme, urlsplit(url).netloc) == (base.scheme, base.netloc)
        # The key goes only where it was meant to go: results_url on another host is read at the documented path.
        path = urlsplit(url).path if same_origin and url else f"/v1/messages/batches/{batch.id}/results"
        prefix = base.path.rstrip("/")
        path = path[len(prefix):] if prefix and path.startswith(prefix) else path
        raw = await self.client._call("GET", path, f"reading the results of batch {batch.id}")
        return raw.splitlines()

    def expect(self, keys: list[Key]) -> None:
        for key in keys:
            self._cid(key)

    def parse_result(self, line: bytes) -> tuple[Key, GenerationResult | None] | None:
        try:
            data = orjson.loads(line)
        except orjson.JSONDecodeError:
            return None
        key = parse_anthropic_custom_id(data.get("custom_id"), self.hashed) if isinstance(data, dict) else None
        return (key, parse_result_line(data)) if key is not None else None

    async def cancel(self, batch_id: str) -> None:
        await self.client._json("POST", f"/v1/messages/batches/{batch_id}/cancel", f"cancelling batch {batch_id}")


def request_counts(batch: dict[str, Any]) -> dict[str, int]:
    counts = batch.get("request_counts")
    return {str(k): v for k, v in counts.items() if type(v) is int} if isinstance(counts, dict) else {}


def batch_status(batch: dict[str, Any]) -> BatchStatus:
    """A Message Batch as a :class:`BatchStatus`: ``ended`` is ``completed``, or ``cancelled`` /
    ``expired`` when requests were canceled or expired (their samples are sent again)."""
    counts = request_counts(batch)
    status = str(batch.get("processing_status"))
    if status == "ended":
        status = "cancelled" if counts.get("canceled") else "expired" if counts.get("expired") else "completed"
    elif status == "canceling":
        status = "cancelling"
    shown = {"total": sum(counts.values()), "completed": counts.get("succeeded", 0),
             "failed": counts.get("errored", 0)}
    url = batch.get("results_url")
    return BatchStatus(str(batch["id"]), status, shown, [url] if isinstance(url, str) and url else [], None)
