"""The retry policy and the one retry loop: which failures are retried, how long to wait, and the
loop that does it.

Transports never retry by themselves: each makes one attempt and says how it went; :func:`run`
repeats it. Every caller (the hosted backend, the Batch API's client, NeMo Gym's environment, and any
backend added later) uses it like this::

    policy = retry.Policy.of(model)          # max_retries, base_retry_wait_s, max_retry_wait_s

    async def attempt(n: int) -> bytes | retry.Failure:
        ...                                  # one try; n = 1, 2, ...
        if resp.status >= 300:
            return retry.Failure(retry.classify_status(resp.status, text), f"HTTP {resp.status}: {text}",
                                 retry.parse_retry_after(resp.headers.get("Retry-After")))
        return body                          # anything but a Failure ends the loop

    outcome, attempts = await retry.run(attempt, policy)
    if isinstance(outcome, retry.Failure):   # not retryable, or out of attempts
        ...                                  # the caller's error: a classified result, an exception

A :class:`Failure` is retried when its class is in :data:`RETRYABLE` (connection errors, timeouts,
429, 5xx) and attempts are left, after :func:`backoff_s` (exponential with full jitter, never less
than the server's ``Retry-After``, capped).

A small hand-written policy rather than ``tenacity``: we need the HTTP status and the ``Retry-After``
header of each attempt to decide, and a classified error result (not an exception) when retries run out.
"""

from __future__ import annotations

import asyncio
import email.utils
import random
import time
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Mapping, TypeVar

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


@dataclass
class Failure:
    """One attempt that failed: its error class (:mod:`sft_ray.errors`), a message, the server's
    ``Retry-After`` (seconds) when it sent one, and ``value``: what the caller wants back should this
    be the last attempt (e.g. a 5xx answer it passes on)."""

    kind: str
    message: str
    retry_after_s: float | None = None
    value: Any = None


@dataclass
class Policy:
    """How many times to retry and how long to wait: ``max_retries`` retries after the first attempt,
    the first wait ``base_s`` (doubling), no wait over ``cap_s``."""

    max_retries: int = 6
    base_s: float = 0.5
    cap_s: float = 60.0
    rng: random.Random = field(default_factory=random.Random)

    @classmethod
    def of(cls, settings: Mapping[str, Any], max_retries: int = 6, base_s: float = 0.5,
           cap_s: float = 60.0) -> "Policy":
        """From a config section's ``max_retries``, ``base_retry_wait_s`` and ``max_retry_wait_s`` (the
        arguments: their defaults where the section has none)."""
        return cls(int(settings.get("max_retries", max_retries)), float(settings.get("base_retry_wait_s", base_s)),
                   float(settings.get("max_retry_wait_s", cap_s)))


T = TypeVar("T")


async def run(attempt: Callable[[int], Awaitable["T | Failure"]], policy: Policy,
              retryable: Callable[[Failure], bool] = lambda f: f.kind in RETRYABLE) -> tuple["T | Failure", int]:
    """Call ``attempt(n)`` for n = 1, 2, ... until it returns anything but a :class:`Failure`, or a
    failure that is not ``retryable``, or ``1 + policy.max_retries`` attempts were made; wait
    :func:`backoff_s` between attempts. Returns (the last outcome, the number of attempts)."""
    attempts = 1 + policy.max_retries
    for n in range(1, attempts + 1):
        outcome = await attempt(n)
        if not isinstance(outcome, Failure) or not retryable(outcome) or n == attempts:
            return outcome, n
        await asyncio.sleep(backoff_s(n, policy.base_s, policy.cap_s, outcome.retry_after_s, policy.rng))
    raise AssertionError("unreachable")
