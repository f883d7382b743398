"""What the generation actors are doing, for the driver's stall warning.

The driver learns of progress only when a batch comes back; while none does (an engine
loading, a slow endpoint, a tool that hangs, an actor whose event loop is blocked) it cannot
see into the actors. So each generation actor keeps a :class:`Tracker` of what is in flight in
it (model calls, tool calls by name, each with its start, and its phase: starting its backend,
loading a vLLM engine) and sends a snapshot every :data:`REPORT_EVERY_S` seconds to a small
Ray actor of the run, the :class:`Board` (no CPU, one per run, made by the driver). When the
stall watch (:mod:`sft_ray.stall`) fires, the driver reads the board and says what each actor
is doing and for how long. Reports come from a thread of the actor, so they go on while its
event loop is blocked (an async tool that calls ``time.sleep``), and say so: a heartbeat task
on the loop shows how long the loop has not run. An actor whose last report is old is named
as stuck or gone.

Reports are fire-and-forget actor calls (a few hundred bytes every few seconds per actor); a
board that is gone costs the actors nothing but a failed call they ignore.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
import uuid
from contextlib import contextmanager
from typing import Any, Iterator

log = logging.getLogger(__name__)

REPORT_EVERY_S = 2.0
STALE_AFTER_S = 3 * REPORT_EVERY_S + 5  # a report older than this: the actor's process is stuck or gone


CRASH_LIMIT = 2  # a sample in flight when its actor died this many times is not run again in this run
CRASHED = object()  # what SampleGuard.run returns instead of running such a sample
# What the guard tracks: a sample key (id, sample_index), or (id, None) for a prompt whose draws run
# together (rejection sampling).
GuardKey = tuple[str, int | None]


class Board:
    """The run's collection point (a Ray actor): the last snapshot of each generation actor,
    and for each sample in flight how many times it was begun and not ended. A sample whose
    actor died while running it (a tool's ``os._exit``, a segfault, the OOM killer) stays
    "begun" here, since the board outlives the actors: see :class:`SampleGuard`."""

    def __init__(self) -> None:
        self.reports: dict[str, dict[str, Any]] = {}
        self.unfinished: dict[GuardKey, int] = {}
        self.finished_gone = 0  # samples finished by actors that closed (their reports dropped)
        self.messages: list[str] = []  # actors' lines for the driver to print, in order, from the
        self.lines_dropped = 0  # lines_dropped-th on (those before it the driver has received)

    def begin(self, keys: list[GuardKey]) -> list[int]:
        """How many earlier runs of each key never ended; the keys with none are marked running
        (a suspect is marked only while it runs: :meth:`SampleGuard.suspect`)."""
        priors = [self.unfinished.get(k, 0) for k in keys]
        for k, prior in zip(keys, priors):
            if prior == 0:
                self.unfinished[k] = 1
        return priors

    def end(self, keys: list[GuardKey]) -> None:
        for k in keys:
            n = self.unfinished.get(k, 0) - 1
            if n > 0:
                self.unfinished[k] = n
            else:
                self.unfinished.pop(k, None)

    def begin_suspect(self, key: GuardKey) -> int:
        prior = self.unfinished.get(key, 0)
        if prior < CRASH_LIMIT:
            self.unfinished[key] = prior + 1
        return prior

    def report(self, key: str, snapshot: dict[str, Any]) -> None:
        self.messages.extend(snapshot.pop("messages", None) or ())
        self.reports[key] = snapshot

    def drop(self, key: str) -> None:
        gone = self.reports.pop(key, None)
        if gone is not None:
            self.finished_gone += gone.get("finished", 0)

    def read(self) -> dict[str, dict[str, Any]]:
        return dict(self.reports)

    def progress(self, seen: int = 0) -> tuple[int, int, list[str]]:
        """Samples (prompts) finished by every actor, closed ones included, model calls in flight, and
        the actors' lines from the ``seen``-th on. The caller counts the lines it received, so a reply
        it stopped waiting for (a timeout on a loaded machine) loses none: they come again; the lines
        it has received are dropped here, so a chatty actor does not grow the board over a long run."""
        del self.messages[:max(0, seen - self.lines_dropped)]
        self.lines_dropped = max(self.lines_dropped, seen)
        return (self.finished_gone + sum(r.get("finished", 0) for r in self.reports.values()),
                sum(r.get("model_calls", 0) for r in self.reports.values()), list(self.messages))


# ---- the driver's side ----

class BoardHandle:
    """This run's board, made by the driver after ``ray.init`` (:func:`start_board`); its
    ``name`` is what the generation actors get (their ``activity`` argument)."""

    def __init__(self) -> None:
        import ray

        self.name = f"sft-ray-activity-{uuid.uuid4().hex[:8]}"
        self.lines_seen = 0  # the board's lines received so far (:meth:`progress`)
        self.actor = ray.remote(num_cpus=0, max_restarts=0)(Board).options(name=self.name,
                                                                           max_concurrency=1).remote()

    def read(self, timeout_s: float = 5.0) -> dict[str, dict[str, Any]] | None:
        """Every actor's last snapshot; None when the board did not answer."""
        try:
            import ray

            return ray.get(self.actor.read.remote(), timeout=timeout_s)
        except Exception as e:
            log.debug("the activity board did not answer: %s", e)
            return None

    def progress(self, timeout_s: float = 2.0) -> tuple[int, int, list[str]] | None:
        """(samples finished by the actors, model calls in flight, their lines to print)
        (:meth:`Board.progress`); None when the board did not answer."""
        try:
            import ray

            got = ray.get(self.actor.progress.remote(self.lines_seen), timeout=timeout_s)
            self.lines_seen += len(got[2])
            return got
        except Exception as e:
            log.debug("the activity board did not answer: %s", e)
            return None

    def describe(self) -> str:
        reports = self.read()
        if reports is None:
            return "(the actors' activity board did not answer in time)"
        return describe(reports)

    def end(self) -> None:
        try:
            import ray

            ray.kill(self.actor)
        except Exception as e:  # Ray already shut down
            log.debug("could not stop the activity board: %s", e)


def start_board() -> BoardHandle:
    """Make this run's board (driver, after ``ray.init``)."""
    return BoardHandle()


def _age(seconds: float) -> str:
    return f"{seconds:.0f} s"


def describe(reports: dict[str, dict[str, Any]], now: float | None = None) -> str:
    """One line per actor: its phase, its model calls and tool calls in flight and their age."""
    if not reports:
        return "no generation actor has reported yet (actors are being created or placed)"
    now = time.time() if now is None else now
    lines = []
    for key in sorted(reports):
        r = reports[key]
        late = now - r["at"]  # ages below are as of the report; add how old it is
        parts = []
        if r.get("phase"):
            parts.append(f"{r['phase']} for {_age(r['phase_s'] + late)}")
        if r.get("model_calls"):
            parts.append(f"{r['model_calls']} model call(s) in flight (oldest {_age(r['oldest_model_call_s'] + late)})")
        if r.get("tool_calls"):
            oldest = ", ".join(f"{name} {_age(age + late)}" for name, age in r.get("oldest_tool_calls", []))
            parts.append(f"{r['tool_calls']} tool call(s) in flight (oldest: {oldest})")
        if not parts:
            parts.append("idle: nothing in flight")
        line = f"  {key}: " + "; ".join(parts)
        if r.get("loop_blocked_s"):
            line += (f"; its event loop has not run for {_age(r['loop_blocked_s'] + late)}, so nothing else on "
                     "this actor moves (a sync call inside an `async def` tool, or a blocking backend?)")
        if late > STALE_AFTER_S:
            line += f" (its last report is {_age(late)} old: the actor is stuck or died)"
        lines.append(line)
    return "in flight:\n" + "\n".join(lines)


# ---- the actor's side ----

class Tracker:
    """What is in flight in this actor (see the module doc). Tracking is plain bookkeeping
    under a lock; a daemon thread reports it (so reports go on while the actor's event loop is
    blocked), and a heartbeat task on the loop lets a report say how long the loop has not run."""

    HEARTBEAT_S = 0.5

    def __init__(self, board: str | None, label: str) -> None:
        self.board_name = board
        self.key = f"{label} (pid {os.getpid()})"
        self.calls: dict[int, tuple[str, str, float]] = {}  # token -> (kind, name, start)
        self._next = 0
        self._lock = threading.Lock()
        self.phase: tuple[str, float] | None = None
        self._beat = time.monotonic()
        self._task: asyncio.Task | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self.done = 0  # samples (prompts) finished here, for progress per sample
        self._messages: list[str] = []  # lines for the driver to print (relayed with the next report)

    def say(self, text: str) -> None:
        """A line for the run's terminal, printed by the driver (without a board: here)."""
        if self.board_name is None:
            print(text, flush=True)
            return
        with self._lock:
            self._messages.append(text)

    def finished(self, n: int) -> None:
        """``n`` samples (prompts with rejection sampling) finished in this actor."""
        self.done += n

    @contextmanager
    def track(self, kind: str, name: str = "") -> Iterator[None]:
        """Count a ``model`` or ``tool`` call as in flight while the block runs."""
        with self._lock:
            self._next += 1
            token = self._next
            self.calls[token] = (kind, name, time.monotonic())
        try:
            yield
        finally:
            with self._lock:
                self.calls.pop(token, None)

    @contextmanager
    def in_phase(self, text: str) -> Iterator[None]:
        """Say what the actor is doing (``loading the vLLM engine ...``) while the block runs."""
        self.phase = (text, time.monotonic())
        try:
            yield
        finally:
            self.phase = None

    def snapshot(self) -> dict[str, Any]:
        now = time.monotonic()
        with self._lock:
            calls = list(self.calls.values())
            messages, self._messages = self._messages, []
        phase = self.phase
        model = [now - t for kind, _, t in calls if kind == "model"]
        tools = sorted(((name, now - t) for kind, name, t in calls if kind == "tool"), key=lambda x: -x[1])
        blocked = now - self._beat
        return {"at": time.time(), "phase": phase[0] if phase else None, "phase_s": now - phase[1] if phase else 0.0,
                "model_calls": len(model), "oldest_model_call_s": max(model, default=0.0), "finished": self.done, "messages": messages,
                "tool_calls": len(tools), "oldest_tool_calls": [(n, round(a, 1)) for n, a in tools[:3]],
                "loop_blocked_s": blocked if self._task is not None and blocked > 4 * self.HEARTBEAT_S else 0.0}

    def start(self) -> None:
        """Start the heartbeat (from the running loop) and the reporting thread; once, and
        nothing without a board."""
        if self.board_name is None or self._task is not None:
            return
        self._task = asyncio.ensure_future(self._heartbeat())
        self._thread = threading.Thread(target=self._report, name="sft-ray-activity", daemon=True)
        self._thread.start()

    async def _heartbeat(self) -> None:
        while True:
            self._beat = time.monotonic()
            await asyncio.sleep(self.HEARTBEAT_S)

    def _report(self) -> None:
        import ray

        try:
            board = ray.get_actor(self.board_name)
        except Exception as e:  # no board (the driver is gone): nothing to report to
            log.debug("no activity board %s: %s", self.board_name, e)
            return
        self._board = board
        while not self._stop.is_set():
            try:
                board.report.remote(self.key, self.snapshot())  # fire and forget
            except Exception as e:  # the board is gone: the run is ending
                log.debug("activity report failed: %s", e)
                return
            self._stop.wait(REPORT_EVERY_S)

    def close(self) -> None:
        self._stop.set()
        if self._task is not None:
            self._task.cancel()
        board = getattr(self, "_board", None)
        if board is not None:
            try:
                board.drop.remote(self.key)
            except Exception:  # teardown: nothing to raise to
                pass


class SampleGuard:
    """In a generation actor: makes a sample that keeps killing its actor a failure record
    instead of a crash loop.

    Ray Data restarts a dead actor and retries its batch without limit, so a sample that
    ends its process (a tool calling ``os._exit`` without ``environment.isolation: process``,
    a crash in native code) would crash the new actor too, for ever, and take its batch's
    other samples with it. The samples of a batch are marked begun on the run's
    :class:`Board` when the batch starts and ended when it is done (two board calls per batch);
    the board outlives the actors, so the samples of a batch whose actor died stay "begun".
    Those are suspects: each runs alone among suspects (one at a time per actor), marked begun
    only while it runs, so the next death points at one of them; a sample in flight at
    :data:`CRASH_LIMIT` deaths is not run again (``prior >= CRASH_LIMIT``: the caller writes
    its failure record, ``internal_error``, which counts toward ``max_sample_attempts`` like
    any failure). Without a board (the stage used outside the pipeline) nothing is guarded."""

    def __init__(self, board: str | None) -> None:
        self.board_name = board
        self._board: Any = None
        self._quarantine: asyncio.Lock | None = None

    def _handle(self) -> Any:
        if self._board is None and self.board_name is not None:
            import ray

            try:
                self._board = ray.get_actor(self.board_name)
            except Exception as e:  # no board: no guard
                log.debug("no activity board %s: %s", self.board_name, e)
                self.board_name = None
        return self._board

    async def begin(self, keys: list[GuardKey]) -> list[int]:
        """Each key's earlier unfinished runs (all 0 without a board); the 0s are now begun."""
        board = self._handle()
        if board is None or not keys:
            return [0] * len(keys)
        try:
            return await board.begin.remote(keys)
        except Exception as e:  # the board is gone (the run is ending): no guard
            log.debug("activity board did not answer: %s", e)
            return [0] * len(keys)

    async def end(self, keys: list[GuardKey]) -> None:
        """Mark keys ended, waiting for the board's answer (an actor about to exit, as after its
        engine died, must not lose it) unless the task is being torn down."""
        from sft_ray.environments.base import cancelled_from_outside

        board = self._handle()
        if board is None or not keys:
            return
        try:
            ref = board.end.remote(keys)
            if not cancelled_from_outside():
                await ref
        except Exception as e:  # the board is gone: nothing to tell
            log.debug("activity board did not answer: %s", e)

    async def suspect(self, key: GuardKey, make: Any) -> Any:
        """Run a suspect (a sample in flight at an earlier actor death) alone among suspects;
        :data:`CRASHED` when it has reached the limit meanwhile."""
        board = self._handle()
        if board is None:
            return await make()
        if self._quarantine is None:
            self._quarantine = asyncio.Lock()
        async with self._quarantine:
            try:
                if await board.begin_suspect.remote(key) >= CRASH_LIMIT:
                    return CRASHED
            except Exception as e:  # the board is gone: run it
                log.debug("activity board did not answer: %s", e)
                return await make()
            try:
                return await make()
            finally:
                await self.end([key])
