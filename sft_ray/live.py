"""The live view of a run: progress per sample, ``progress.json`` and ``report.html`` while it works.

A :class:`LiveView` thread on the driver asks the run's activity board (:mod:`sft_ray.activity`)
every :data:`POLL_S` seconds how many samples the generation actors have finished, so the
progress line, the stall watch and the metrics' gauges move per sample as actors finish them,
not per written batch. Every ``report.interval_s`` seconds it rewrites ``progress.json`` and a
live ``report.html`` in the run folder, each atomically (:func:`sft_ray.io.write_bytes`: a
temporary file renamed over the old one, so a reader never sees half a file). At the end
:func:`write_final` replaces both with the final ones, which agree with stats.json.
"""

from __future__ import annotations

import datetime
import json
import logging
import threading
import time
from collections import deque
from typing import Any, Callable

from sft_ray import io
from sft_ray.finalize.report_html import final_progress, render, render_live
from sft_ray.metrics import RunMetrics, advice
from sft_ray.runfolder.layout import PROGRESS, REPORT_HTML

log = logging.getLogger(__name__)

POLL_S = 2.0
SAMPLES_KEPT = 3  # recent rows of each kind (kept, failed by error class) the live report shows


def now_iso() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


def write_json(run_dir: str, doc: dict[str, Any]) -> None:
    io.write_bytes(io.join(run_dir, PROGRESS), (json.dumps(doc, indent=2) + "\n").encode())


class LiveView:
    """See the module doc. The driver calls :meth:`written` for each batch it writes; the thread
    does the rest until :meth:`close`."""

    def __init__(self, run_dir: str, title: str, expected: int, done_before: int, failed_before: int, todo: int,
                 unit: str, interval_s: float, metrics: RunMetrics, board: Any = None,
                 progress: Any = None, touch: Callable[[], None] | None = None,
                 say: Callable[[str], None] = print) -> None:
        self.run_dir, self.title, self.unit = run_dir, title, unit
        self.expected, self.done_before, self.failed_before, self.todo = expected, done_before, failed_before, todo
        self.interval_s, self.metrics, self.board = interval_s, metrics, board
        self.progress, self.touch, self.say = progress, touch, say
        self.t0 = time.monotonic()
        self.lock = threading.Lock()
        self.units_written = 0  # what progress counts (samples, or prompts), as written
        self.ok = self.failed = 0
        self.finished = 0  # as the actors report it
        self.in_flight = 0
        self.last_progress = time.monotonic()
        self.errors: dict[str, int] = {}
        self.rewards: list[float] = []
        self.recent: dict[str, deque] = {}
        self.stop = threading.Event()
        self.last_write = float("-inf")  # the first one at the first tick
        self.thread = threading.Thread(target=self._loop, name="sft-ray-live-view", daemon=True)
        self.thread.start()

    # -- the driver's thread --

    def written(self, units: int, ok: int, failed: int, rollouts: list[str], failed_flags: list[bool],
                rewards: list[float | None]) -> list[str]:
        """A batch just written: counts, rewards, the error classes of its failures, a few rows to show.
        Returns the failures' error classes."""
        import orjson

        classes = []
        with self.lock:
            self.units_written += units
            self.ok += ok
            self.failed += failed
            if units:
                self.last_progress = time.monotonic()
            self.rewards.extend(r for r in rewards if r is not None)
            for text, bad in zip(rollouts, failed_flags):
                if bad:
                    err = (orjson.loads(text).get("error") or {}).get("type") or "no_reward"
                    self.errors[err] = self.errors.get(err, 0) + 1
                    classes.append(err)
                    self._keep(f"failed: {err}", text)
                else:
                    self._keep("written", text)
        return classes

    def _keep(self, kind: str, text: str) -> None:
        q = self.recent.get(kind)
        if q is None:
            q = self.recent[kind] = deque(maxlen=SAMPLES_KEPT)
        q.append(text)

    # -- what is true now --

    def session_done(self) -> int:
        """Samples (prompts) this session finished: written, or reported finished by the actors."""
        return min(self.todo, max(self.units_written, self.finished))

    def snapshot(self) -> dict[str, Any]:
        """progress.json's document now."""
        with self.lock:
            n = self.session_done()
            elapsed = time.monotonic() - self.t0
            rate = n / elapsed if n and elapsed > 0 else 0.0
            eta = (self.todo - n) / rate if rate > 0 else None
            c = self.metrics.counts
            done = self.done_before + max(self.ok, n - self.failed) if self.unit == "samples" else (
                self.done_before + self.ok)
            return {
                "done": min(done, self.expected) if self.expected else done,
                "expected": self.expected,
                "failed": self.failed_before + self.failed,
                "unit": self.unit,
                "session": {"todo": self.todo, "finished": n, "written": self.ok, "failed": self.failed},
                "rate_per_s": round(rate, 3),
                "eta_s": round(eta, 1) if eta is not None else None,
                "spend": {"usd": round(c["cost_usd"], 6), "input_tokens": c["input_tokens"],
                          "output_tokens": c["output_tokens"], "requests": c["requests"]},
                "errors": dict(sorted(self.errors.items())),
                "stall_s": round(time.monotonic() - self.last_progress, 1),
                "timing": {"breakdown": self.metrics.breakdown(elapsed)},
                "advice": advice(self.metrics.busy),
                "updated_at": now_iso(),
                "final": False,
            }

    def write(self) -> None:
        """Rewrite progress.json and report.html (each atomically)."""
        doc = self.snapshot()
        with self.lock:
            rewards = list(self.rewards)
            recent = {k: list(q) for k, q in self.recent.items()}
        try:
            write_json(self.run_dir, doc)
            io.write_bytes(io.join(self.run_dir, REPORT_HTML),
                           render_live(doc, rewards, recent, self.title).encode())
        except OSError as e:  # the live view must never stop the run
            log.warning("could not write the live view: %s", e)

    # -- the thread --

    def _poll(self) -> None:
        if self.board is None:
            return
        got = self.board.progress()
        if got is None:
            return
        finished, in_flight, messages = got
        for line in messages:  # the actors' first-use lines, in sft-ray's voice
            self.say(f"[sft-ray] {line}")
        with self.lock:
            if finished > self.finished:
                self.last_progress = time.monotonic()
                if self.touch is not None:
                    self.touch()  # the stall watch speaks only when nothing finished
            self.finished = max(self.finished, finished)
            self.in_flight = in_flight

    def _loop(self) -> None:
        while not self.stop.wait(POLL_S):
            try:
                self._poll()
                doc = self.snapshot()
                self.metrics.live(self.todo, doc["session"]["finished"], self.in_flight, doc["stall_s"], doc["eta_s"])
                if self.progress is not None:
                    self.progress.advance(doc["session"]["finished"], doc["advice"])
                if time.monotonic() - self.last_write >= self.interval_s:
                    self.last_write = time.monotonic()
                    self.write()
            except Exception as e:  # a window on the run: log, never fail it
                log.warning("live view: %s: %s", type(e).__name__, e)

    def close(self) -> None:
        self.stop.set()
        self.thread.join()


def write_final(run_dir: str, stats: dict[str, Any], title: str) -> None:
    """progress.json and report.html as the run ends, from stats.json's numbers."""
    write_json(run_dir, final_progress(stats))
    io.write_bytes(io.join(run_dir, REPORT_HTML), render(stats, title).encode())
