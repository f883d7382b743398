"""The mock server's settings (:class:`MockConfig`), what it counts (:class:`MockState`), and its
rate-limit token bucket."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from dataclasses import dataclass, field


@dataclass
class MockConfig:
    latency_ms: float = 0.0
    error_rate: float = 0.0  # random 500s
    rate_limit_rate: float = 0.0  # random 429s
    timeout_rate: float = 0.0  # random hangs
    malformed_rate: float = 0.0  # random unparseable 200s
    tool_malformed_rate: float = 0.0  # share of tool calls whose arguments are not JSON
    tool_unknown_rate: float = 0.0  # share of tool calls naming a tool that does not exist
    retry_after_s: float = 0.05
    hang_s: float = 30.0
    seed: int = 0
    requests_per_minute: float = 0.0  # 0: no limit
    tokens_per_minute: float = 0.0  # 0: no limit
    limit_window_s: float = 60.0  # bucket capacity, in seconds of refill
    batch_delay_s: float = 0.0  # the Batch API: seconds a batch stays validating before it is processed
    batch_expire: int = 0  # the first N batches expire after finishing only part of their lines
    batch_expire_keep: float = 0.5  # the share of an expiring batch's lines that finish


async def simulate_latency(cfg: MockConfig) -> None:
    """Wait ``cfg.latency_ms`` from now, re-reading it as it waits: a test that lowers the latency
    mid-run releases the requests already waiting instead of leaving them to the old value."""
    start = time.monotonic()
    while (left := cfg.latency_ms / 1000 - (time.monotonic() - start)) > 0:
        await asyncio.sleep(min(left, 0.1))


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
    tool_call_turns: int = 0  # answers that called tools
    tool_calls: int = 0  # tool calls emitted, in all
    busy_s: float = 0.0  # integral of in_flight over time: busy_s / wall = mean concurrency
    first_at: float = 0.0
    last_change: float = 0.0
    files: dict = field(default_factory=dict)  # Batch API: file id -> (purpose, content bytes)
    batches: dict = field(default_factory=dict)  # Batch API: batch id -> the batch object
    batch_lines: Counter = field(default_factory=Counter)  # custom_id -> times submitted in a batch
    uploads: int = 0
    batches_created: int = 0

    def track(self, delta: int) -> None:
        now = time.monotonic()
        if not self.first_at:
            self.first_at = self.last_change = now
        self.busy_s += self.in_flight * (now - self.last_change)
        self.last_change = now
        self.in_flight += delta

