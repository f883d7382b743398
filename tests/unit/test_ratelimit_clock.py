"""The rate limiter's arithmetic, alone: the GCRA clock, the budget's admission, token estimates
settled against reported usage, x-ratelimit-* headers, the AIMD concurrency controller and the
config sections. (Limits through the mock server and Ray actors: tests/e2e/test_ratelimit.py.)"""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from sft_ray import ratelimit
from sft_ray.config import ConfigError
from sft_ray.configload import load_config
from sft_ray.ratelimit import Aimd, SharedLimits, parse_reset, pause_from_headers


@pytest.fixture(autouse=True)
def clock(monkeypatch):
    """The limiter's clock, stopped: it moves only when a test moves it, so the arithmetic is exact
    however loaded the machine is (on a real clock, time passing between two reservations shifted
    the delays)."""
    now = SimpleNamespace(t=1000.0)
    monkeypatch.setattr(ratelimit, "time", SimpleNamespace(monotonic=lambda: now.t))
    return now


def test_reservations_pace_requests_at_the_limit():
    shared = SharedLimits({"requests": 600}, {}, {})  # 10 per second, half a second of burst
    delays = [shared.reserve("a", 1, 10, 10, {}, {})[0][0] for _ in range(100)]
    assert delays[:6] == pytest.approx([0] * 6, abs=1e-9)  # the burst: half a second's worth
    assert delays[6] == pytest.approx(0.1) and delays[99] == pytest.approx(99 / 10 - 0.5)  # then 10 per second
    assert all(b >= a for a, b in zip(delays, delays[1:]))
    # A batch of requests from one actor is spread the same way, not sent at once.
    batch = SharedLimits({"requests": 600}, {}, {}).reserve("a", 100, 1000, 1000, {}, {})[0]
    assert batch == pytest.approx(delays)


def test_idle_time_refills_the_burst_and_saves_up_no_more(clock):
    shared = SharedLimits({"requests": 600}, {}, {})
    for _ in range(20):
        shared.reserve("a", 1, 10, 10, {}, {})
    clock.t += 60  # a minute idle
    delays = [shared.reserve("a", 1, 10, 10, {}, {})[0][0] for _ in range(8)]
    assert delays[:6] == pytest.approx([0] * 6, abs=1e-9) and delays[6] == pytest.approx(0.1) and delays[7] == pytest.approx(0.2)


def test_reported_usage_corrects_the_token_estimate():
    shared = SharedLimits({"output_tokens": 60_000}, {}, {})  # 1000 per second
    assert shared.reserve("a", 1, 0, 3000, {}, {})[0] == [0]
    # The next request waits for the 3 s those 3000 tokens cost (minus the burst)...
    assert shared.reserve("a", 1, 0, 3000, {}, {})[0][0] == pytest.approx(2.5)
    # ... unless the first reported using 100 of its 3000: no wait for the 2900 it did not use.
    shared = SharedLimits({"output_tokens": 60_000}, {}, {})
    shared.reserve("a", 1, 0, 3000, {}, {})
    settled = {"est_requests": 1, "est_output_tokens": 3000, "output_tokens": 100, "requests": 1}
    assert shared.reserve("a", 1, 0, 3000, settled, {})[0] == [0]
    assert shared.stats()["output_tokens"] == 100 and shared.stats()["requests"] == 1


def test_budget_admits_what_fits_and_then_stops():
    shared = SharedLimits({}, {"max_requests": 10}, {})
    assert shared.reserve("a", 4, 40, 40, {}, {})[1:] == (4, None)
    assert shared.reserve("b", 4, 40, 40, {}, {})[1:] == (4, None)
    assert shared.reserve("a", 4, 40, 40, {}, {})[1:] == (2, "budget")
    assert shared.reserve("b", 1, 10, 10, {}, {})[1:] == (0, "budget")
    cost = SharedLimits({}, {"max_cost_usd": 1.0}, {"input_per_mtok": 0, "output_per_mtok": 10.0})
    # Each request may produce 10,000 output tokens ($0.10): ten fit in a dollar, counting those in flight.
    assert cost.reserve("a", 20, 0, 200_000, {}, {})[1] == 10


def test_ratelimit_headers():
    assert parse_reset("6m0s") == 360 and parse_reset("20ms") == pytest.approx(0.02)
    assert parse_reset("1.5s") == 1.5 and parse_reset("2") == 2 and parse_reset("soon") is None
    assert pause_from_headers({"x-ratelimit-remaining-requests": "0", "x-ratelimit-reset-requests": "1.2s"}, 10) == 1.2
    assert pause_from_headers({"x-ratelimit-remaining-tokens": "5", "x-ratelimit-reset-tokens": "3s"}, 10) == 3
    # With the per-minute limit known: only the time to refill what is missing (not the whole limit).
    assert pause_from_headers({"x-ratelimit-remaining-requests": "0", "x-ratelimit-limit-requests": "600",
                               "x-ratelimit-reset-requests": "6s"}, 10) == pytest.approx(0.1)
    assert pause_from_headers({"x-ratelimit-remaining-requests": "7"}, 10) == 0


def test_config_sections_and_their_errors():
    base = ["input=x", "output=y", "model.name=m"]
    cfg = load_config(None, base + ["num_samples_in_parallel=auto", "rate_limit.requests_per_minute=30000",
                                    "rate_limit.max_concurrency=256"])
    assert cfg.adaptive and cfg.max_requests_in_flight == 256 and cfg.rate_limit.per_minute() == {"requests": 30000.0}
    with pytest.raises(ConfigError, match="budget.max_cost_usd needs pricing"):
        load_config(None, base + ["budget.max_cost_usd=5"])
    with pytest.raises(ConfigError, match="num_samples_in_parallel"):
        load_config(None, base + ["num_samples_in_parallel=0"])
    with pytest.raises(ConfigError, match="rate_limit.requests_per_minut: unknown key"):
        load_config(None, base + ["rate_limit.requests_per_minut=5"])


def test_aimd_halves_once_per_round_trip_and_grows_back(clock):
    a = Aimd(4, 64)

    def done(congested=False, latency=0.1):
        a.in_flight += 1
        a.leave(congested, not congested, latency)

    for _ in range(20):
        done()
    assert a.limit == 24  # slow start: +1 per success, doubling per round trip
    done(congested=True)
    assert a.limit == 12
    done(congested=True)  # the same burst of 429s: one signal
    assert a.limit == 12
    clock.t += 0.12  # a round trip later
    done(congested=True)
    assert a.limit == 6 and a.cuts == 2
    for _ in range(6):
        done()
    assert a.limit == pytest.approx(7, abs=0.1)  # after the first cut: +1 per round trip
    before = a.limit
    done(latency=5.0)  # latency far above the best seen: the server is queueing, no growth
    assert a.limit == before
