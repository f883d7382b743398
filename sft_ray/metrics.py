"""A run's metrics: Prometheus through Ray's own metrics system, and where the time goes.

Every number is counted where it is certain and exported from one process, the driver:

- in a generation actor, each sample carries a small :class:`Telemetry` (its model requests by
  status with their latency and the tokens the API reported, its tool calls, the seconds spent
  in model calls, waiting for a concurrency permit and in tools). Backends add to the sample's
  telemetry through a context variable (:func:`model_attempt`), so no backend signature
  changes; the stage sends the telemetry with the sample's row (the ``telemetry`` column) and
  the score stage adds its verifier seconds;
- the driver records the telemetry of each row when it writes the row (:class:`RunMetrics`),
  so the counters advance with rollouts/ and failed/ and, at the end of a fresh run, equal
  stats.json's done, failed, requests, tokens and billed cost exactly. An actor that Ray Data
  tears down at the end of the run loses nothing: nothing is counted in it.

:class:`RunMetrics` exports through ``ray.util.metrics`` (Counter, Gauge, Histogram), so the
series appear wherever a cluster's Prometheus scrapes Ray: Ray prefixes each name with ``ray_``
and labels it with the process (``WorkerId``); every series has a ``run`` tag (the run folder's
name). Every metric is exported from the start of a run, at 0 when nothing happened, so a
dashboard never shows "no data" for a quiet run. The same object sums the time breakdown
(stats.json ``timing.breakdown``, :func:`advice`).
"""

from __future__ import annotations

import contextvars
import logging
import os
import time
from contextlib import contextmanager
from typing import Any, Iterator

import orjson

from sft_ray import errors
from sft_ray.cost import CACHE_READ, CACHE_WRITE, cost_usd

log = logging.getLogger(__name__)

# Names before Ray's `ray_` prefix; the dashboard (deploy/grafana/sft-ray.json) queries them as scraped.
SAMPLES = "sft_ray_samples_total"
SAMPLES_PASSED = "sft_ray_samples_passed_total"
REQUESTS = "sft_ray_model_requests_total"
TOKENS = "sft_ray_tokens_total"
COST = "sft_ray_cost_usd_total"
IN_FLIGHT = "sft_ray_requests_in_flight"
LATENCY = "sft_ray_model_latency_seconds"
TOOL_CALLS = "sft_ray_tool_calls_total"
VERIFIER = "sft_ray_verifier_seconds"
REWARD = "sft_ray_reward"
ROWS_WRITTEN = "sft_ray_rows_written_total"
EXPECTED = "sft_ray_samples_expected"
FINISHED = "sft_ray_samples_finished"
ETA = "sft_ray_eta_seconds"
STALL = "sft_ray_stall_seconds"
BUSY = "sft_ray_busy_seconds_total"
SAMPLE_ERRORS = "sft_ray_sample_errors_total"

REQUEST_STATUSES = ("ok", "rate_limited", "server_error", "timeout", "error")
# Error classes a failed sample's series starts with (at 0); any other class gets its series when it first happens.
ERROR_CLASSES = tuple(sorted(errors.INFRASTRUCTURE | {errors.INTERNAL_ERROR, errors.VERIFIER_ERROR, errors.BAD_INPUT}))
TOOL_STATUSES = ("ok", "error")
TOKEN_KINDS = ("input", "output")
BREAKDOWN = ("model_s", "permit_wait_s", "tool_s", "verifier_s", "write_s", "engine_load_s")

LATENCY_BOUNDS = [0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300]
VERIFIER_BOUNDS = [0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30, 60]
REWARD_BOUNDS = [0.1 * i for i in range(1, 11)]


def request_status(kind: str | None) -> str:
    """A model request's status label from its error class (None: it succeeded)."""
    if kind is None:
        return "ok"
    return {errors.RATE_LIMIT: "rate_limited", errors.SERVER_ERROR: "server_error",
            errors.TIMEOUT: "timeout"}.get(kind, "error")


# ---- a generation actor's side ----

class Telemetry:
    """One sample's model requests, tool calls and busy seconds (see the module doc)."""

    __slots__ = ("requests", "latencies", "input_tokens", "output_tokens", "billed_input", "billed_output",
                 "cache_write", "cache_read", "model_s", "permit_wait_s", "tool_s", "tools", "attempts")

    def __init__(self) -> None:
        self.requests: dict[str, int] = {}
        self.latencies: list[float] = []
        self.input_tokens = self.output_tokens = 0
        self.billed_input = self.billed_output = 0.0
        self.cache_write = self.cache_read = 0  # prompt caching (Anthropic): priced apart (sft_ray/cost.py)
        self.model_s = self.permit_wait_s = self.tool_s = 0.0
        self.tools: dict[str, int] = {}
        self.attempts = 0

    def attempt(self, kind: str | None, latency_s: float, usage: dict[str, Any] | None,
                est_input_tokens: float = 0.0) -> None:
        """One model request (an HTTP attempt, or one engine call): its error class (None: ok),
        seconds, the usage the API reported, and the request's input-token estimate. What it is
        billed follows the rate limiter's rule (sft_ray/ratelimit.py): the reported usage, else,
        for a failure other than a 429, the input estimate."""
        status = request_status(kind)
        self.requests[status] = self.requests.get(status, 0) + 1
        self.latencies.append(round(latency_s, 4))
        self.attempts += 1
        if usage:
            inp, out = int(usage.get("input_tokens") or 0), int(usage.get("output_tokens") or 0)
            self.input_tokens += inp
            self.output_tokens += out
            self.billed_input += inp
            self.billed_output += out
            self.cache_write += int(usage.get(CACHE_WRITE) or 0)
            self.cache_read += int(usage.get(CACHE_READ) or 0)
        elif kind != errors.RATE_LIMIT:
            self.billed_input += est_input_tokens

    def tool(self, ok: bool, seconds: float) -> None:
        status = "ok" if ok else "error"
        self.tools[status] = self.tools.get(status, 0) + 1
        self.tool_s += seconds

    def as_json(self) -> str:
        out: dict[str, Any] = {}
        if self.attempts:
            out.update(req=self.requests, lat=self.latencies, inp=self.input_tokens, out=self.output_tokens,
                       bin=self.billed_input, bout=self.billed_output)
        if self.cache_write or self.cache_read:
            out.update(cw=self.cache_write, cr=self.cache_read)
        for k in ("model_s", "permit_wait_s", "tool_s"):
            v = getattr(self, k)
            if v:
                out[k] = round(v, 6)
        if self.tools:
            out["tools"] = self.tools
        return orjson.dumps(out).decode()


_CURRENT: contextvars.ContextVar[Telemetry | None] = contextvars.ContextVar("sft_ray_telemetry", default=None)


@contextmanager
def sample_telemetry() -> Iterator[Telemetry]:
    """The telemetry of the sample running in this block (and in the tasks it starts)."""
    t = Telemetry()
    token = _CURRENT.set(t)
    try:
        yield t
    finally:
        _CURRENT.reset(token)


def current() -> Telemetry | None:
    return _CURRENT.get()


def model_attempt(kind: str | None, latency_s: float, usage: dict[str, Any] | None,
                  est_input_tokens: float = 0.0) -> None:
    """A backend's report of one request, counted on the sample in flight (nothing outside one:
    a judge's requests are the verifier's, not the model's)."""
    t = _CURRENT.get()
    if t is not None:
        t.attempt(kind, latency_s, usage, est_input_tokens)


# ---- the driver's side ----

def _ray_metrics(run: str) -> dict[str, Any]:
    from ray.util.metrics import Counter, Gauge, Histogram

    tags = {"run": run}

    def counter(name: str, doc: str, *keys: str) -> Any:
        return Counter(name, doc, tag_keys=("run", *keys)).set_default_tags(tags)

    def gauge(name: str, doc: str, *keys: str) -> Any:
        return Gauge(name, doc, tag_keys=("run", *keys)).set_default_tags(tags)

    def hist(name: str, doc: str, bounds: list[float]) -> Any:
        return Histogram(name, doc, boundaries=bounds, tag_keys=("run",)).set_default_tags(tags)

    return {
        SAMPLES: counter(SAMPLES, "Samples written: done (rollouts/) or failed (failed/)", "status"),
        SAMPLES_PASSED: counter(SAMPLES_PASSED, "Samples written with a reward >= filter.min_reward"),
        REQUESTS: counter(REQUESTS, "Model requests (HTTP attempts, retries included) by status", "status"),
        TOKENS: counter(TOKENS, "Model tokens as the API reported them in usage", "kind"),
        COST: counter(COST, "USD billed for the model's requests at the run's pricing"),
        IN_FLIGHT: gauge(IN_FLIGHT, "Model requests in flight in the generation actors"),
        LATENCY: hist(LATENCY, "Seconds per model request", LATENCY_BOUNDS),
        TOOL_CALLS: counter(TOOL_CALLS, "Tool calls of agent episodes by status", "status"),
        VERIFIER: hist(VERIFIER, "Verifier seconds per scored sample (its batch's time shared over its rows)",
                       VERIFIER_BOUNDS),
        REWARD: hist(REWARD, "Rewards of the samples written", REWARD_BOUNDS),
        ROWS_WRITTEN: counter(ROWS_WRITTEN, "Lines appended to rollouts/ and failed/"),
        EXPECTED: gauge(EXPECTED, "Samples (prompts with rejection sampling) this session has to finish"),
        FINISHED: gauge(FINISHED, "Samples (prompts) this session has finished, as the actors finish them"),
        ETA: gauge(ETA, "Seconds until this session is done at the current rate (-1: not known yet)"),
        STALL: gauge(STALL, "Seconds since a sample last finished"),
        BUSY: counter(BUSY, "Seconds spent, summed over concurrent calls, by part (timing.breakdown)", "part"),
        SAMPLE_ERRORS: counter(SAMPLE_ERRORS, "Samples written to failed/, by error class", "error"),
    }


def _zero(metric: Any, tags: dict[str, str] | None = None) -> None:
    # Counter.inc refuses 0, but a series must exist from the start (a dashboard shows 0, not
    # "no data", for a run where nothing failed): record 0 through the metric's own record path.
    metric._record(0.0, tags=tags)


class RunMetrics:
    """The driver's metrics of one run (tag ``run``), and the time breakdown. Without Ray's
    metrics (``enabled`` False) it only sums the breakdown."""

    def __init__(self, run: str, pricing: dict[str, Any] | None, min_reward: float | None,
                 enabled: bool = True) -> None:
        self.run, self.pricing, self.min_reward = run, pricing or {}, min_reward
        self.busy = {k: 0.0 for k in BREAKDOWN}
        self.counts = {"done": 0, "failed": 0, "passed": 0, "requests": 0, "input_tokens": 0, "output_tokens": 0,
                       "cost_usd": 0.0, "rows_written": 0}
        self.m: dict[str, Any] = {}
        if enabled:
            try:
                self.m = _ray_metrics(run)
            except Exception as e:  # metrics are a window on the run, never a reason to fail it
                log.warning("metrics are off: %s: %s", type(e).__name__, e)
            else:
                self._zero_all()

    def _zero_all(self) -> None:
        m = self.m
        for s in ("done", "failed"):
            _zero(m[SAMPLES], {"status": s})
        for s in REQUEST_STATUSES:
            _zero(m[REQUESTS], {"status": s})
        for k in TOKEN_KINDS:
            _zero(m[TOKENS], {"kind": k})
        for s in TOOL_STATUSES:
            _zero(m[TOOL_CALLS], {"status": s})
        for part in BREAKDOWN:
            _zero(m[BUSY], {"part": part})
        for e in ERROR_CLASSES:
            _zero(m[SAMPLE_ERRORS], {"error": e})
        for name in (SAMPLES_PASSED, COST, ROWS_WRITTEN):
            _zero(m[name])
        for name in (IN_FLIGHT, EXPECTED, FINISHED, STALL):
            m[name].set(0)
        m[ETA].set(-1)
        # Histograms have no zero: their series appear with the first observation.

    def _inc(self, name: str, value: float, tags: dict[str, str] | None = None) -> None:
        if self.m and value > 0:
            self.m[name].inc(value, tags=tags)

    def written(self, ok: int, failed: int, rewards: list[float | None], telemetry: list[str | None],
                write_s: float, error_classes: list[str] = ()) -> None:
        """A batch the driver has just written: ``ok`` to rollouts/, ``failed`` to failed/ (with
        their ``error_classes``); each row's telemetry (None for rows without: journal recovery)."""
        for e in error_classes:
            self._inc(SAMPLE_ERRORS, 1, {"error": e})
        self.counts["done"] += ok
        self.counts["failed"] += failed
        self.counts["rows_written"] += ok + failed
        self.busy["write_s"] += write_s
        self._inc(SAMPLES, ok, {"status": "done"})
        self._inc(SAMPLES, failed, {"status": "failed"})
        self._inc(ROWS_WRITTEN, ok + failed)
        self._inc(BUSY, write_s, {"part": "write_s"})
        passed = 0
        for r in rewards:
            if r is None:
                continue
            if self.min_reward is not None and r >= self.min_reward:
                passed += 1
            if self.m:
                self.m[REWARD].observe(float(r))
        self.counts["passed"] += passed
        self._inc(SAMPLES_PASSED, passed)
        for text in telemetry:
            if text:
                self._row(orjson.loads(text))

    def _row(self, t: dict[str, Any]) -> None:
        for status, n in (t.get("req") or {}).items():
            self.counts["requests"] += n
            self._inc(REQUESTS, n, {"status": status})
        inp, out = int(t.get("inp") or 0), int(t.get("out") or 0)
        self.counts["input_tokens"] += inp
        self.counts["output_tokens"] += out
        self._inc(TOKENS, inp, {"kind": "input"})
        self._inc(TOKENS, out, {"kind": "output"})
        cw, cr = int(t.get("cw") or 0), int(t.get("cr") or 0)
        if cw or cr:  # prompt caching: its tokens counted and priced apart, as in stats.json
            self.counts[CACHE_WRITE] = self.counts.get(CACHE_WRITE, 0) + cw
            self.counts[CACHE_READ] = self.counts.get(CACHE_READ, 0) + cr
            self._inc(TOKENS, cw, {"kind": "cache_write"})
            self._inc(TOKENS, cr, {"kind": "cache_read"})
        cost = cost_usd(float(t.get("bin") or 0), float(t.get("bout") or 0), self.pricing, cw, cr)
        self.counts["cost_usd"] += cost
        self._inc(COST, cost)
        if self.m:
            for s in t.get("lat") or ():
                self.m[LATENCY].observe(float(s))
            if "verifier_s" in t:
                self.m[VERIFIER].observe(float(t["verifier_s"]))
        for status, n in (t.get("tools") or {}).items():
            self._inc(TOOL_CALLS, n, {"status": status})
        for part in ("model_s", "permit_wait_s", "tool_s", "verifier_s", "engine_load_s"):
            v = float(t.get(part) or 0.0)
            if v:
                self.busy[part] += v
                self._inc(BUSY, v, {"part": part})

    def live(self, expected: int, finished: int, in_flight: int, stall_s: float, eta_s: float | None) -> None:
        """What the live view sees every few seconds."""
        if not self.m:
            return
        self.m[EXPECTED].set(expected)
        self.m[FINISHED].set(finished)
        self.m[IN_FLIGHT].set(in_flight)
        self.m[STALL].set(round(stall_s, 1))
        self.m[ETA].set(round(eta_s, 1) if eta_s is not None else -1)

    def breakdown(self, wall_s: float) -> dict[str, float]:
        """stats.json ``timing.breakdown``: each part's seconds summed over concurrent calls, and the wall."""
        return {**{k: round(v, 3) for k, v in self.busy.items()}, "wall_s": round(wall_s, 3)}


# What to change when a part takes most of the time (the progress line's and the report's advice).
_ADVICE = {
    "model_s": ("model calls take", "raise num_samples_in_parallel (or resources.generate_actors)"),
    "permit_wait_s": ("waiting for a concurrency permit takes", "raise num_samples_in_parallel"),
    "tool_s": ("tool calls take", "make the tools faster or raise num_samples_in_parallel"),
    "verifier_s": ("the verifier takes", "raise resources.score_actors"),
    "write_s": ("writing the run folder takes", "put the run folder on faster storage"),
    "engine_load_s": ("loading engines takes", "give each engine more rows (fewer, longer runs)"),
}


def advice(breakdown: dict[str, float]) -> str | None:
    """"model calls take 92% of the time: raise num_samples_in_parallel", naming the part that
    takes the largest share of the busy time; None before anything was timed."""
    parts = {k: float(breakdown.get(k) or 0.0) for k in BREAKDOWN}
    total = sum(parts.values())
    if total <= 0:
        return None
    top = max(parts, key=lambda k: parts[k])
    what, fix = _ADVICE[top]
    share = 100 * parts[top] / total
    return f"{what} {share:.0f}% of the time: {fix}"


def engine_load_telemetry(seconds: float) -> str:
    """The telemetry of an actor's first returned row: how long its backend took to start."""
    return orjson.dumps({"engine_load_s": round(seconds, 3)}).decode()


def merge(telemetry: str | None, **extra: float) -> str:
    """``telemetry`` (a row's JSON) with ``extra`` seconds added. A row with none (journal recovery's
    rows: an all-null column reaches a batch as NaN or an empty value, not as None) starts from zero."""
    t = orjson.loads(telemetry) if isinstance(telemetry, (str, bytes)) and telemetry else {}
    for k, v in extra.items():
        t[k] = round(float(t.get(k) or 0.0) + v, 6)
    return orjson.dumps(t).decode()


EXPORT_WAIT_S = 180.0  # the longest a local run waits for its final values to reach the export port


def exported(port: int, run: str, name: str = ROWS_WRITTEN) -> float | None:
    """The sum over processes of ``name`` (as Ray exports it: ``ray_`` prefixed) for run ``run`` on the
    local node's export port, or None while the port or the series is not there."""
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
            body = r.read(64 << 20).decode("utf-8", "replace")  # Ray's export is far smaller; a flood is cut
    except OSError:
        return None
    return series_sum(body, "ray_" + name, run)


def series_sum(body: str, sample: str, run: str) -> float | None:
    """The sum of ``sample``'s values for run ``run`` in a Prometheus text exposition, or None when it
    holds none or is not one (another program on the port, a half-written answer)."""
    from prometheus_client.parser import text_string_to_metric_families

    try:
        values = [s.value for fam in text_string_to_metric_families(body) for s in fam.samples
                  if s.name == sample and s.labels.get("run") == run]
    except ValueError:
        return None
    return sum(values) if values else None


def linger(seconds: float, say: Any = None, *, port: int | None = None, run: str = "", rows: int = 0,
           wait_s: float = EXPORT_WAIT_S) -> None:
    """Keep the driver (and Ray) up until its final values are exported and scraped: with ``port``
    (the local node's export port), first until the port shows this run's ``rows`` written (Ray
    exports every 10 s by default, later on a loaded machine: waiting for the values themselves
    holds however late they come, at most ``wait_s``), then ``seconds`` more for a scraper to read them."""
    if port is not None:
        end = time.monotonic() + wait_s
        while (got := exported(port, run)) is None or got < rows:
            if time.monotonic() > end:
                if say is not None:
                    say(f"metrics: the final values had not reached the export port {port} after {wait_s:g} s "
                        f"({got} of {rows} rows counted there); a scrape may miss the last ones")
                break
            time.sleep(0.5)
    if seconds > 0:
        if say is not None:
            say(f"metrics: keeping Ray up {seconds:g} s so that the final values are scraped (metrics.linger_s)")
        time.sleep(seconds)


def run_tag(run_dir: str) -> str:
    """The ``run`` tag: the run folder's name."""
    return os.path.basename(run_dir.rstrip("/")) or run_dir
