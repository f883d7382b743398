"""The retry policy: classification, Retry-After parsing, backoff bounds."""

from __future__ import annotations

import email.utils
import random

from sft_ray.backends import retry


def test_classify_status():
    assert retry.classify_status(429) == retry.RATE_LIMIT
    assert retry.classify_status(503) == retry.SERVER_ERROR
    assert retry.classify_status(408) == retry.TIMEOUT
    assert retry.classify_status(401) == retry.AUTH_ERROR
    assert retry.classify_status(400, "This model's maximum context length is 4096") == retry.CONTEXT_LENGTH
    assert retry.classify_status(400, "bad field") == retry.CLIENT_ERROR
    assert retry.RATE_LIMIT in retry.RETRYABLE and retry.CLIENT_ERROR not in retry.RETRYABLE


def test_retry_after_seconds_and_dates():
    assert retry.parse_retry_after("2") == 2.0
    assert retry.parse_retry_after("0.5") == 0.5
    assert retry.parse_retry_after(None) is None
    assert retry.parse_retry_after("soon") is None
    now = 1_700_000_000.0
    date = email.utils.formatdate(now + 30, usegmt=True)
    assert abs(retry.parse_retry_after(date, now=now) - 30) < 1.01


def test_backoff_is_jittered_exponential_capped_and_honours_retry_after():
    rng = random.Random(0)
    waits = [retry.backoff_s(a, 1.0, 8.0, rng=rng) for a in range(1, 8) for _ in range(50)]
    assert all(0 <= w <= 8.0 for w in waits)
    assert len({round(w, 6) for w in waits}) > 100  # jittered
    assert max(retry.backoff_s(1, 1.0, 8.0, rng=rng) for _ in range(50)) <= 1.0
    assert retry.backoff_s(1, 0.1, 60, retry_after_s=5, rng=rng) >= 5
    assert retry.backoff_s(1, 0.1, 3, retry_after_s=5, rng=rng) == 3


def test_the_one_retry_loop_retries_what_is_retryable_and_stops_on_the_rest():
    import asyncio

    policy = retry.Policy(max_retries=3, base_s=0.001, cap_s=0.01)
    seen: list[int] = []

    def attempts(*outcomes):
        async def attempt(n: int):
            seen.append(n)
            return outcomes[n - 1]
        return attempt

    # Retryable failures, then an answer: the answer and how many attempts it took.
    seen.clear()
    assert asyncio.run(retry.run(attempts(retry.Failure(retry.RATE_LIMIT, "429"),
                                          retry.Failure(retry.SERVER_ERROR, "500"), b"ok"), policy)) == (b"ok", 3)
    # A failure that is not retryable ends the loop at once.
    seen.clear()
    out, n = asyncio.run(retry.run(attempts(retry.Failure(retry.CLIENT_ERROR, "400"), b"never"), policy))
    assert (out.kind, n, seen) == (retry.CLIENT_ERROR, 1, [1])
    # Out of attempts: the last failure, with its value, after 1 + max_retries attempts.
    seen.clear()
    out, n = asyncio.run(retry.run(attempts(*[retry.Failure(retry.TIMEOUT, f"t{i}", value=i) for i in range(9)]),
                                   policy))
    assert (out.message, out.value, n, seen) == ("t3", 3, 4, [1, 2, 3, 4])
    # The policy from a config section, its defaults where the section has none.
    p = retry.Policy.of({"max_retries": 0, "base_retry_wait_s": 2}, cap_s=10)
    assert (p.max_retries, p.base_s, p.cap_s) == (0, 2.0, 10.0)
