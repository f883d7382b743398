"""Hosted APIs at scale: rate limits across the cluster, adaptive concurrency, spend and budgets.

Three pieces, none of them active unless configured:

- :class:`SharedLimits`, one small Ray actor per run (no CPU), made by the driver. It
  holds the run's rate limits as GCRA reservations (a "virtual scheduling" token
  bucket per limit: requests, input, output and all tokens per minute), the money and
  tokens spent (all runs of the folder), and the budget. Generation actors on every
  node reserve permits from it in batches: one call carries every request that waited
  in that actor meanwhile, so the calls stay few at any rate.
- :class:`Limiter`, one per generation actor, inside the hosted backend: ``acquire``
  before each HTTP attempt (waits for a concurrency slot and the shared permits),
  ``report`` after it (settles the token estimate against the reported usage, feeds
  the concurrency controller, honours ``Retry-After`` and ``x-ratelimit-*``).
- :class:`Aimd`: with ``num_samples_in_parallel: auto``, each actor's concurrency grows
  while latency stays flat and halves on a 429 or a timeout (at most once per round
  trip), between 1 and the actor's share of ``rate_limit.max_concurrency``.

Hand-written rather than a library: the limits must be held across processes on
several machines through Ray, with per-request token amounts corrected after the
fact; the rate-limiting libraries on PyPI (aiolimiter, limits) pace one process.

Budgets are checked when a request asks for permits: one that could pass a budget
(counting what is in flight at its estimate) is refused, the sample is not written
(it stays pending), and the run stops taking new samples: ``stopped: budget``.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sft_ray.cost import CACHE_READ, CACHE_WRITE, cost_usd
from sft_ray.errors import RATE_LIMIT, TIMEOUT
from sft_ray.runfolder.manifest import Manifest, SessionRecord, StopReason

log = logging.getLogger(__name__)

BURST_S = 0.5  # seconds of each limit that may go out at once (keeps under a server's burst)
START_CONCURRENCY = 4  # per actor, with num_samples_in_parallel: auto
STATS_EVERY_S = 2.0


class BudgetExhausted(Exception):
    """The next request could pass the run's budget."""


class SharedLimits:
    """The run-wide state; made as a Ray actor by :func:`start_session` (plain class: testable alone)."""

    def __init__(self, per_minute: dict[str, float], budget: dict[str, Any], pricing: dict[str, float],
                 spent_before: dict[str, float] | None = None, burst_s: float = BURST_S) -> None:
        self.interval = {k: 60.0 / v for k, v in per_minute.items() if v}
        self.tat = dict.fromkeys(self.interval, 0.0)  # "theoretical arrival time" per limit
        self.burst_s = burst_s
        self.budget = {k: v for k, v in (budget or {}).items() if v is not None}
        self.pricing = pricing or {}
        self.before = Counter({k: float(v) for k, v in (spent_before or {}).items()})
        self.session: Counter = Counter()  # requests, input_tokens, output_tokens, rate_limited, timeouts
        self.reserved: Counter = Counter()  # estimates of requests admitted and not yet settled
        self.pause_until = 0.0
        self.actors: dict[str, dict[str, float]] = {}
        self.stopped: str | None = None
        self.t0 = time.monotonic()

    # -- budget -----------------------------------------------------------------------------
    def _would_fit(self, n: int, est_in: float, est_out: float) -> bool:
        spent = self.before + self.session
        return not over_spending_budget(self.budget, self.pricing, spent["requests"] + self.reserved["requests"] + n,
                                        spent["input_tokens"] + self.reserved["input_tokens"] + est_in,
                                        spent["output_tokens"] + self.reserved["output_tokens"] + est_out,
                                        spent[CACHE_WRITE], spent[CACHE_READ])

    def _admit(self, n: int, est_in: float, est_out: float) -> int:
        if self.stopped:
            return 0
        if not self.budget or self._would_fit(n, est_in, est_out):
            return n
        lo, hi = 0, n  # the most of this batch that fit, at the batch's mean estimate
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if self._would_fit(mid, est_in * mid / n, est_out * mid / n):
                lo = mid
            else:
                hi = mid - 1
        self.stopped = StopReason.SPENDING_BUDGET.text()
        return lo

    # -- settling ---------------------------------------------------------------------------
    def _settle(self, s: dict[str, float]) -> None:
        """Take back the estimates of finished requests and count what they really used."""
        now = time.monotonic()
        for k in ("requests", "input_tokens", "output_tokens"):
            self.reserved[k] -= s.get("est_" + k, 0.0)
        for k in ("requests", "input_tokens", "output_tokens", "rate_limited", "timeouts", "reasoning_tokens",
                  CACHE_WRITE, CACHE_READ):
            if s.get(k):
                self.session[k] += s[k]
        # Tokens that were reserved but not used (or used beyond the estimate) move the limits' clocks.
        d_in = s.get("input_tokens", 0.0) - s.get("est_input_tokens", 0.0)
        d_out = s.get("output_tokens", 0.0) - s.get("est_output_tokens", 0.0)
        for k, d in (("input_tokens", d_in), ("output_tokens", d_out), ("tokens", d_in + d_out)):
            if k in self.interval and d:
                self.tat[k] += d * self.interval[k]  # a refund left in the past gives no credit: see reserve
        if s.get("pause_s"):
            self.pause_until = max(self.pause_until, now + s["pause_s"])

    def reserve(self, actor: str, n: int, est_in: float, est_out: float, settled: dict[str, float],
                status: dict[str, float]) -> tuple[list[float], int, str | None]:
        """Permits for ``n`` requests with these total token estimates: (seconds each admitted
        request waits, how many were admitted (fewer once the budget is reached), why the run stopped)."""
        self._settle(settled)
        self.actors[actor] = status
        admitted = self._admit(n, est_in, est_out) if n else 0
        if not admitted:
            return [], 0, self.stopped
        a_in, a_out = est_in / n, est_out / n  # per request, at the batch's mean
        self.reserved.update({"requests": admitted, "input_tokens": a_in * admitted,
                              "output_tokens": a_out * admitted})
        now = time.monotonic()
        start = max(now, self.pause_until)
        amount = {"requests": 1.0, "input_tokens": a_in, "output_tokens": a_out, "tokens": a_in + a_out}
        delays = []
        for _ in range(admitted):
            # GCRA ("virtual scheduling"): a request may go once every limit's theoretical arrival
            # time is at most burst_s ahead; then each limit's clock advances by what it costs.
            send = max([start] + [t - self.burst_s for t in self.tat.values()])
            for k, interval in self.interval.items():
                self.tat[k] = max(self.tat[k], send) + amount[k] * interval
            delays.append(send - now)
        return delays, admitted, self.stopped

    def report(self, actor: str, settled: dict[str, float], status: dict[str, float]) -> str | None:
        """Settle without asking for permits (an actor with nothing waiting)."""
        self._settle(settled)
        self.actors[actor] = status
        return self.stopped

    def stats(self) -> dict[str, Any]:
        spent = self.before + self.session
        sent = self.session["requests"]
        return {
            "requests": int(sent), "input_tokens": int(self.session["input_tokens"]),
            "output_tokens": int(self.session["output_tokens"]),
            "reasoning_tokens": int(self.session["reasoning_tokens"]),
            "rate_limited": int(self.session["rate_limited"]), "timeouts": int(self.session["timeouts"]),
            "rate_limited_share": self.session["rate_limited"] / sent if sent else 0.0,
            CACHE_WRITE: int(self.session[CACHE_WRITE]), CACHE_READ: int(self.session[CACHE_READ]),
            "cost_usd": cost_usd(self.session["input_tokens"], self.session["output_tokens"], self.pricing,
                                 self.session[CACHE_WRITE], self.session[CACHE_READ]),
            "run_cost_usd": cost_usd(spent["input_tokens"], spent["output_tokens"], self.pricing,
                                     spent[CACHE_WRITE], spent[CACHE_READ]),
            "concurrency": int(sum(a.get("limit", 0) for a in self.actors.values())),
            "in_flight": int(sum(a.get("in_flight", 0) for a in self.actors.values())),
            "stopped": self.stopped, "wall_s": time.monotonic() - self.t0,
        }


class Aimd:
    """Additive-increase / multiplicative-decrease concurrency for one actor.

    Slow start (+1 per success, doubling per round trip) until the first congestion
    signal, then +1 per round trip (``+1/limit`` per success). A 429 or a timeout halves
    the limit, at most once per round trip (the replies of one burst are one signal).
    No increase while latency is more than twice the best seen (the server is queueing).
    """

    def __init__(self, start: int, ceiling: int) -> None:
        self.ceiling = max(1, ceiling)
        self.limit = float(min(max(1, start), self.ceiling))
        self.in_flight = 0
        self.slow_start = True
        self.best_latency = float("inf")
        self.last_cut = 0.0
        self.cuts = 0
        self._waiters: list[asyncio.Future] = []

    async def enter(self) -> None:
        while self.in_flight >= int(self.limit):
            fut = asyncio.get_running_loop().create_future()
            self._waiters.append(fut)
            try:
                await fut
            except asyncio.CancelledError:
                if fut in self._waiters:
                    self._waiters.remove(fut)
                raise
        self.in_flight += 1

    def leave(self, congested: bool, ok: bool, latency_s: float) -> None:
        self.in_flight -= 1
        now = time.monotonic()
        if congested:
            if now - self.last_cut > max(latency_s, 0.05):
                self.limit = max(1.0, self.limit / 2)
                self.last_cut, self.slow_start = now, False
                self.cuts += 1
        elif ok:
            self.best_latency = min(self.best_latency, latency_s)
            if latency_s <= 2 * self.best_latency + 0.05:
                self.limit = min(self.ceiling, self.limit + (1.0 if self.slow_start else 1.0 / self.limit))
        free = int(self.limit) - self.in_flight  # a woken waiter checks again, so waking too many is harmless
        while free > 0 and self._waiters:
            fut = self._waiters.pop(0)
            if not fut.done():
                fut.set_result(None)
                free -= 1


@dataclass
class Permit:
    est_input_tokens: float
    est_output_tokens: float
    started: float = 0.0
    refused: str | None = None  # why no request may be sent (the budget)
    headers: Any = None  # the response's headers, set by the transport when it has them
    settled: bool = field(default=False, repr=False)


_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h)")


def parse_reset(value: str | None) -> float | None:
    """``x-ratelimit-reset-*`` values: "1s", "6m0s", "20ms", "0.5s" or plain seconds."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    parts = _DURATION.findall(value)
    if not parts:
        return None
    scale = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
    return sum(float(n) * scale[u] for n, u in parts)


def _number(value: Any) -> float | None:
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


def from_anthropic_headers(headers: Any, now: float | None = None) -> dict[str, str]:
    """Anthropic's ``anthropic-ratelimit-{requests,tokens}-{limit,remaining,reset}`` as the
    ``x-ratelimit-*`` headers the limiter reads: limits per minute as OpenAI's, the reset an
    RFC 3339 time turned into seconds from now."""
    out: dict[str, str] = {}
    if not headers:
        return out
    for kind in ("requests", "tokens"):
        for part in ("limit", "remaining"):
            value = headers.get(f"anthropic-ratelimit-{kind}-{part}")
            if value is not None:
                out[f"x-ratelimit-{part}-{kind}"] = value
        reset = headers.get(f"anthropic-ratelimit-{kind}-reset")
        if reset:
            try:
                when = datetime.fromisoformat(reset.replace("Z", "+00:00")).timestamp()
            except ValueError:
                continue
            out[f"x-ratelimit-reset-{kind}"] = f"{max(0.0, when - (time.time() if now is None else now)):.3f}"
    return out


def pause_from_headers(headers: Any, est_tokens: float) -> float:
    """Seconds to hold new requests that the server's ``x-ratelimit-*`` headers ask for, when less
    than one request (or fewer tokens than a request needs) remains: the time the per-minute
    ``x-ratelimit-limit-*`` takes to refill what is missing, else until ``x-ratelimit-reset-*``
    (which OpenAI gives as the time to refill the whole limit: longer than needed)."""
    if not headers:
        return 0.0
    wait = 0.0
    for kind, need in (("requests", 1.0), ("tokens", est_tokens)):
        left = _number(headers.get(f"x-ratelimit-remaining-{kind}"))
        if left is None or left >= need:
            continue
        per_minute = _number(headers.get(f"x-ratelimit-limit-{kind}"))
        if per_minute:
            wait = max(wait, (need - left) * 60.0 / per_minute)
        else:
            wait = max(wait, parse_reset(headers.get(f"x-ratelimit-reset-{kind}")) or 0.0)
    return wait


def pace_from_headers(headers: Any, current: float) -> float:
    """Seconds between requests while the server's request limit is nearly used up (less than 5%
    of its per-minute ``x-ratelimit-limit-requests`` remains): its own rate; 0 once it recovers.
    Used when no limits are configured, so `auto` alone also settles at the server's rate."""
    if not headers:
        return current
    left = _number(headers.get("x-ratelimit-remaining-requests"))
    per_minute = _number(headers.get("x-ratelimit-limit-requests"))
    if left is None or not per_minute:
        return current
    return 60.0 / per_minute if left < max(2.0, 0.05 * per_minute) else 0.0


class Limiter:
    """The per-actor side: see the module docstring. Made by the hosted backend from its
    model dict (``model["limits"]``, set by the driver); None there means no limiter."""

    def __init__(self, shared: Any, adaptive: bool, ceiling: int) -> None:
        self.shared = shared
        self.aimd = Aimd(START_CONCURRENCY, ceiling) if adaptive else None
        self.key = uuid.uuid4().hex[:8]
        self.stopped: str | None = None
        self._waiting: list[tuple[Permit, asyncio.Future]] = []
        self._settled: Counter = Counter()
        self._pump: asyncio.Task | None = None
        self._last_report = 0.0
        self._pause_until = 0.0  # without a shared actor: Retry-After and x-ratelimit-* held here
        self._pace_s = 0.0
        self._next_send = 0.0

    @classmethod
    def from_model(cls, model: dict[str, Any], requests_per_actor: int) -> "Limiter | None":
        spec = model.get("limits")
        if not spec:
            return None
        return cls(spec.get("shared"), bool(spec.get("adaptive")), requests_per_actor)

    def _status(self) -> dict[str, float]:
        if self.aimd is None:
            return {}
        return {"limit": int(self.aimd.limit), "in_flight": self.aimd.in_flight}

    async def acquire(self, est_input_tokens: float, est_output_tokens: float) -> Permit:
        """Wait for a concurrency slot and the shared permits for one HTTP attempt. A permit
        with ``refused`` set means the budget is spent: send nothing (no slot is held)."""
        permit = Permit(float(est_input_tokens), float(est_output_tokens))
        if self.stopped:
            permit.refused = self.stopped
            return permit
        if self.aimd is not None:
            await self.aimd.enter()
        while (wait := self._pause_until - time.monotonic()) > 0:
            await asyncio.sleep(wait)
        if self._pace_s:  # the server said it is at its request limit: one request per its interval
            now = time.monotonic()
            send = max(now, self._next_send)
            self._next_send = send + self._pace_s
            if send > now:
                await asyncio.sleep(send - now)
        if self.shared is not None:
            fut = asyncio.get_running_loop().create_future()
            self._waiting.append((permit, fut))
            if self._pump is None or self._pump.done():
                self._pump = asyncio.ensure_future(self._run_pump())
            try:
                await fut
            except BudgetExhausted as e:
                permit.refused = str(e)
                if self.aimd is not None:
                    self.aimd.leave(False, False, 0.0)
                return permit
        permit.started = time.monotonic()
        return permit

    async def _run_pump(self) -> None:
        loop = asyncio.get_running_loop()
        while self._waiting:
            batch, self._waiting = self._waiting, []
            settled, self._settled = dict(self._settled), Counter()
            est_in = sum(p.est_input_tokens for p, _ in batch)
            est_out = sum(p.est_output_tokens for p, _ in batch)
            try:
                delays, admitted, stopped = await self.shared.reserve.remote(
                    self.key, len(batch), est_in, est_out, settled, self._status())
            except Exception as e:  # the shared actor is gone (the driver ended): send nothing more
                log.warning("rate limiter unreachable (%s); no new requests from this actor", type(e).__name__)
                delays, admitted, stopped = [], 0, StopReason.LIMITER_UNREACHABLE.text()
            self._last_report = time.monotonic()
            if stopped:
                self.stopped = stopped
            for _, fut in batch[admitted:]:
                if not fut.done():
                    fut.set_exception(BudgetExhausted(f"stopped: {stopped}"))
            for (_, fut), delay in zip(batch[:admitted], delays):
                if delay > 0:
                    loop.call_later(delay, _release, [fut])
                else:
                    _release([fut])

    def report(self, permit: Permit, kind: str | None, usage: dict[str, int] | None,
               retry_after: float | None = None) -> None:
        """After an HTTP attempt: ``kind`` is its error class (None: success), ``usage`` the
        reported tokens, ``retry_after`` the server's Retry-After; ``permit.headers`` the
        response headers when the transport set them."""
        if permit.refused or permit.settled:
            return
        permit.settled = True
        latency = time.monotonic() - permit.started
        congested = kind in (RATE_LIMIT, TIMEOUT)
        if self.aimd is not None:
            self.aimd.leave(congested, kind is None, latency)
        pause = max((retry_after or 0.0) if kind == RATE_LIMIT else 0.0,
                    pause_from_headers(permit.headers, permit.est_input_tokens + permit.est_output_tokens))
        if self.shared is None:  # no shared limits: this actor follows what the server says
            self._pause_until = max(self._pause_until, time.monotonic() + pause)
            self._pace_s = pace_from_headers(permit.headers, self._pace_s)
            return
        s = self._settled
        s.update({"est_requests": 1, "est_input_tokens": permit.est_input_tokens,
                  "est_output_tokens": permit.est_output_tokens, "requests": 1})
        if usage:
            s["input_tokens"] += usage.get("input_tokens", 0)
            s["output_tokens"] += usage.get("output_tokens", 0)
            s["reasoning_tokens"] += usage.get("reasoning_tokens", 0)
            s[CACHE_WRITE] += usage.get(CACHE_WRITE, 0)
            s[CACHE_READ] += usage.get(CACHE_READ, 0)
        elif kind not in (RATE_LIMIT,):
            # No usage reported (a failure): count the estimate, as the provider may have billed it.
            s["input_tokens"] += permit.est_input_tokens
        if kind == RATE_LIMIT:
            s["rate_limited"] += 1
        elif kind == TIMEOUT:
            s["timeouts"] += 1
        if pause:
            s["pause_s"] = max(s.get("pause_s", 0.0), pause)
        # With nothing waiting, no reservation will carry this soon: settle now (the totals
        # must be complete when the run ends, for the budget of the next run).
        if not self._waiting:
            self.flush()

    def flush(self) -> None:
        """Send what is settled now."""
        if self.shared is not None and self._settled:
            settled, self._settled = dict(self._settled), Counter()
            self._last_report = time.monotonic()
            try:
                self.shared.report.remote(self.key, settled, self._status())
            except Exception as e:  # the shared actor is gone: the run is ending
                log.debug("could not settle with the rate limiter: %s", e)


def _release(futs: list[asyncio.Future]) -> None:
    for fut in futs:
        if not fut.done():
            fut.set_result(None)


# -- the driver's side -----------------------------------------------------------------------

def needs_shared(cfg: Any) -> bool:
    return bool(cfg.rate_limit.per_minute() or cfg.budget.active()
                or cfg.pricing.input_per_mtok or cfg.pricing.output_per_mtok)


def over_spending_budget(budget: dict[str, Any], pricing: dict[str, float], requests: float,
                         input_tokens: float, output_tokens: float, cache_write_tokens: float = 0.0,
                         cache_read_tokens: float = 0.0) -> bool:
    """Whether this much spent, all sessions together, passes the spending budget (``budget.*``; a
    limit that is None or absent is no limit): the one rule of the online limiter and the Batch API's loop.
    The cache token counts are prompt caching's (Anthropic), priced apart from ``input_tokens``."""
    b = {k: v for k, v in budget.items() if v is not None}
    return bool(("max_requests" in b and requests > b["max_requests"])
                or ("max_output_tokens" in b and output_tokens > b["max_output_tokens"])
                or ("max_cost_usd" in b and cost_usd(input_tokens, output_tokens, pricing, cache_write_tokens,
                                                     cache_read_tokens) > b["max_cost_usd"]))


def start_session(cfg: Any, manifest: Manifest) -> "RunLimits":
    """Make this run's shared limits actor (driver, after ``ray.init``), when anything needs it."""
    from sft_ray.config import HostedModelConfig  # the driver's: actors never import the config models

    if not isinstance(cfg.model, HostedModelConfig) or not needs_shared(cfg):
        return RunLimits(None, cfg.adaptive)
    import ray

    actor = ray.remote(num_cpus=0, max_restarts=0)(SharedLimits).options(
        name=f"sft-ray-limits-{uuid.uuid4().hex[:8]}", max_concurrency=1)
    return RunLimits(actor.remote(cfg.rate_limit.per_minute(), cfg.budget.model_dump(), cfg.pricing.model_dump(),
                                  manifest.spent_before()), cfg.adaptive)


class RunLimits:
    """One run's limits on the driver: the shared actor (None when nothing needs it) and whether
    concurrency is adaptive. The orchestrator hands :meth:`actor_spec` to the generate stage and
    the object to the progress line, and calls :meth:`end` when the session ends."""

    def __init__(self, shared: Any = None, adaptive: bool = False) -> None:
        self.shared, self.adaptive = shared, adaptive
        self.last: dict[str, Any] = {}
        self.polled = 0.0

    def actor_spec(self) -> dict[str, Any] | None:
        """What the generation actors get as ``model["limits"]`` (None: no limiter)."""
        if self.shared is None and not self.adaptive:
            return None
        return {"shared": self.shared, "adaptive": self.adaptive}

    def poll(self, timeout_s: float = 0.5) -> dict[str, Any]:
        """The shared stats, asked at most every few seconds (the last answer otherwise)."""
        if self.shared is None:
            return {}
        now = time.monotonic()
        if now - self.polled >= STATS_EVERY_S:
            self.polled = now
            try:
                import ray

                self.last = ray.get(self.shared.stats.remote(), timeout=timeout_s)
            except Exception:  # slow answer: show the last one
                pass
        return self.last

    def progress_info(self, done: int, total: int) -> dict[str, str]:
        """Extra fields for the progress line: concurrency, 429 share, cost and its projection."""
        st = self.poll()
        info: dict[str, str] = {}
        if not st:
            return info
        if self.adaptive:
            info["concurrency"] = str(st["concurrency"])
        if st["requests"]:
            info["429"] = f"{100 * st['rate_limited_share']:.1f}%"
        if st["cost_usd"]:
            info["cost"] = f"${st['cost_usd']:.4f}"
            if 0 < done < total:
                info["projected"] = f"${st['cost_usd'] * total / done:.2f}"
        return info

    def end(self, record: SessionRecord) -> None:
        """Put this run's spend (and a budget stop) in its session record; drop the shared actor."""
        shared, self.shared = self.shared, None
        if shared is None:
            return
        import ray

        try:
            st = ray.get(shared.stats.remote(), timeout=30)
        except Exception as e:
            log.warning("could not read the run's spend from the rate limiter: %s", e)
            st = self.last
        if st:
            record["spend"] = {k: st[k] for k in ("requests", "input_tokens", "output_tokens", "reasoning_tokens",
                                                   CACHE_WRITE, CACHE_READ, "rate_limited", "timeouts", "cost_usd")
                               if st.get(k) or k not in (CACHE_WRITE, CACHE_READ)}
            record.stop_first(st.get("stopped"))
        try:
            ray.kill(shared)
        except Exception:
            pass
