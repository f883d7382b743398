"""The retry policy, written once: which failures are retried, and how long to wait.

Transports never retry by themselves; the hosted backend asks this module.
A small hand-written policy rather than ``tenacity``: we need the HTTP status
and the ``Retry-After`` header of each attempt to decide, and a classified
error result (not an exception) when retries run out.
"""

from __future__ import annotations

import email.utils
import random
import time

from sft_ray.errors import (  # noqa: F401 - re-exported: the backends name them retry.X
    AUTH_ERROR,
    BAD_RESPONSE,
    CLIENT_ERROR,
    CONNECTION_ERROR,
    CONTEXT_LENGTH,
    RATE_LIMIT,
    RETRYABLE,
    SERVER_ERROR,
    TIMEOUT,
)

_CONTEXT_HINTS = ("context length", "context_length", "maximum context", "too long", "max_model_len")


def classify_status(status: int, body: str = "") -> str:
    """The error class of a non-2xx HTTP status."""
    if status == 429:
        return RATE_LIMIT
    if status == 408:
        return TIMEOUT
    if status >= 500:
        return SERVER_ERROR
    if status in (401, 403):
        return AUTH_ERROR
    if status in (400, 413, 422) and any(h in body.lower() for h in _CONTEXT_HINTS):
        return CONTEXT_LENGTH
    return CLIENT_ERROR


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (delta-seconds or an HTTP date)."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def backoff_s(attempt: int, base_s: float, cap_s: float, retry_after_s: float | None = None,
              rng: random.Random | None = None) -> float:
    """Wait before retry number ``attempt`` (1-based).

    Exponential backoff with full jitter (spreads a burst of 429s over time),
    but never less than the server's ``Retry-After``; both capped by ``cap_s``.
    """
    r = (rng or random).random()
    wait = r * min(cap_s, base_s * (2 ** (attempt - 1)))
    if retry_after_s is not None:
        wait = max(wait, retry_after_s)
    return min(wait, cap_s)
