"""The driver loop's parts: what a run folder holds, the failure budget, completion,
progress, timing and the session record.

``pipeline.generate_phase`` composes them; each does one job and is tested on its own.
One rule (:meth:`Budget.exceeded`) decides both the early stop and the exit code, and
one count (:class:`Completion`) decides the exit code, ``complete`` in stats.json and
the ``_SUCCESS`` marker.
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterable

import orjson

from sft_ray import io, ratelimit
from sft_ray.resume import Key, count_failure, done_keys, load_failures
from sft_ray.rows import InputError
from sft_ray.stages.finalize import FAILED, ROLLOUTS
from sft_ray.stages.write import PartWriter

EXIT_OK, EXIT_USAGE, EXIT_INPUT, EXIT_BUDGET, EXIT_PENDING = 0, 1, 2, 3, 4
EXIT_SPENT = 5  # a spending budget (budget.*) stopped the run; resumable with a raised budget


class FolderState:
    """What the run folder says about each sample: done (a rollout), or failed in N runs."""

    def __init__(self, run_dir: str, max_attempts: int, pass_threshold: float | None = None) -> None:
        # With rejection sampling, the passing samples of each prompt (reward >= pass_threshold).
        self.pass_threshold = pass_threshold
        self.passing: Counter[str] = Counter()
        # Made by a run that holds the folder's lock: it may cut a torn last line (a killed run's).
        self.done: set[Key] = done_keys(run_dir, self.passing if pass_threshold is not None else None,
                                        pass_threshold or 0.0, repair=True)
        self.failed_runs: dict[Key, int] = load_failures(run_dir, self.done)
        self.max_attempts = max_attempts

    def is_final(self, key: Key) -> bool:
        """Done, or failed in ``max_attempts`` runs: not sent again."""
        return key in self.done or self.failed_runs.get(key, 0) >= self.max_attempts

    def skip(self) -> set[Key]:
        """Keys the read stage leaves out."""
        return self.done | {k for k, n in self.failed_runs.items() if n >= self.max_attempts}


def sample_keys(ids: Iterable[str], num_repeats: int) -> Iterable[Key]:
    for rid in ids:
        for k in range(num_repeats):
            yield (rid, k)


@dataclass
class Completion:
    """Every expected sample counted by its state in the run folder (never by subtraction).

    ``pending``: samples without a result (neither a rollout nor a failure record): work
    a stopped or killed run left undone. A failed sample has a result; ``failed_final``
    of them failed in ``max_sample_attempts`` runs, the others a rerun tries again.
    """

    expected: int = 0
    done: int = 0
    failed: int = 0
    failed_final: int = 0
    pending: int = 0
    bad_lines: int = 0

    @classmethod
    def count(cls, ids: Iterable[str], num_repeats: int, state: FolderState, bad_lines: int = 0) -> "Completion":
        c = cls(bad_lines=bad_lines)
        for key in sample_keys(ids, num_repeats):
            c.expected += 1
            if key in state.done:
                c.done += 1
            elif key in state.failed_runs:
                c.failed += 1
                c.failed_final += state.failed_runs[key] >= state.max_attempts
            else:
                c.pending += 1
        return c

    def verdict(self, budget: "Budget") -> tuple[int, str | None]:
        """(exit code, reason when not 0): the one rule for the exit code, ``complete`` and ``_SUCCESS``."""
        if self.pending:
            return EXIT_PENDING, (f"INCOMPLETE: {self.pending}/{self.expected} samples pending (not generated yet); "
                                  "rerun the same command to finish")
        if budget.exceeded(self.done, self.failed, final=True):
            return EXIT_BUDGET, (f"FAILED: {self.failed}/{self.expected} samples failed, over the budget "
                                 f"max_error_fraction={budget.max_fraction}; rerun the same command to retry them")
        return EXIT_OK, None

    @property
    def todo(self) -> int:
        """What a session sends: samples without a result, and failures with attempts left."""
        return self.pending + self.failed - self.failed_final

    def as_stats(self, budget: "Budget") -> dict[str, Any]:
        return {**asdict(self), "complete": self.verdict(budget)[0] == EXIT_OK}


@dataclass
class Budget:
    """The failure budget: the share of failed samples among those with a result, over the
    whole run folder. The same rule stops a session early (once ``min_rows`` samples have a
    result) and sets the exit code at the end."""

    max_fraction: float
    min_rows: int

    def exceeded(self, done: int, failed: int, final: bool = False) -> bool:
        n = done + failed
        if not n or (not final and n < self.min_rows):
            return False
        return failed / n > self.max_fraction


class Writers:
    """rollouts/ and failed/ part writers for one session. A failure record carries the runs
    it failed in; ``state`` follows what is written, so it stays the folder's state."""

    def __init__(self, run_dir: str, session: int, state: FolderState) -> None:
        self.ok = PartWriter(io.join(run_dir, ROLLOUTS), session)
        self.bad = PartWriter(io.join(run_dir, FAILED), session)
        self.state = state

    def write(self, keys: list[Key], lines: list[str], failed: list[bool],
              rewards: list[float | None] | None = None) -> tuple[int, int]:
        """Write one scored batch; raises :class:`InputError` for a bad input line (rows that never
        reached a model because their line is malformed: the read stage marks them)."""
        oks = [s.encode() for s, f in zip(lines, failed) if not f]
        bad_rows = [orjson.loads(s) for s, f in zip(lines, failed) if f]
        self.ok.write(oks)
        for row in bad_rows:
            if (row.get("error") or {}).get("type") == "bad_input":
                source, _, reason = row["error"]["message"].partition(": ")
                raise InputError(source, reason)
        runs = self.state.failed_runs
        self.bad.write([count_failure(row, runs) for row in bad_rows])
        threshold = self.state.pass_threshold
        for i, (key, f) in enumerate(zip(keys, failed)):
            if f:
                runs[key] = runs.get(key, 0) + 1
            else:
                self.state.done.add(key)
                runs.pop(key, None)
                reward = rewards[i] if rewards is not None else None
                if threshold is not None and reward is not None and reward >= threshold:
                    self.state.passing[key[0]] += 1
        return len(oks), len(bad_rows)

    def close(self) -> None:
        self.ok.close()
        self.bad.close()


ScoreBatches = Callable[[list[dict[str, Any]]], Iterable[dict[str, Any]]]


def recover_journal(run_dir: str, verifier: dict[str, Any], ids: set[str], state: FolderState,
                    writers: Writers, remote: ScoreBatches | None = None) -> int:
    """Score and write what the generation journal holds beyond the folder's results (what a
    killed run had generated but not yet written), calling no model. Returns how many.

    Scored here, in this process, unless ``remote`` is given: a function that takes the
    score stage's input batches and yields its output batches elsewhere (the pipeline's score
    actors, for a judge that runs an engine: :func:`sft_ray.pipeline.remote_scorer`)."""
    from sft_ray.journal import read_journal
    from sft_ray.stages.score import ScoreStage

    skip = state.skip()
    rows = [r for r in read_journal(run_dir, skip) if str(r["id"]) in ids]
    if not rows:
        return 0
    batches = [{"id": [r["id"] for r in chunk], "sample_index": [r["sample_index"] for r in chunk],
                "rollout": [orjson.dumps(r).decode() for r in chunk], "failed": [False] * len(chunk),
                "ready_at": [0.0] * len(chunk)}
               for chunk in (rows[i:i + 256] for i in range(0, len(rows), 256))]

    def write(out: dict[str, Any]) -> None:
        keys = [(str(rid), int(k)) for rid, k in zip(out["id"], out["sample_index"])]
        writers.write(keys, list(out["rollout"]), [bool(f) for f in out["failed"]], list(out["reward"]))

    if remote is not None:
        for out in remote(batches):
            write(out)
        return len(rows)
    scorer = ScoreStage(verifier)

    async def score_all() -> None:  # one event loop for every chunk: the stage's semaphore lives in it
        try:
            for batch in batches:
                write(await scorer(batch))
        finally:
            await scorer.close()  # the judge's connections, in the loop they belong to

    asyncio.run(score_all())
    return len(rows)


class Progress:
    """A progress bar with samples/s (prompts/s with rejection sampling) on a terminal; a log line every few seconds otherwise
    (so that `ray job logs` reads well)."""

    def __init__(self, total: int, out=sys.stderr, unit: str = "samples") -> None:
        self.total, self.out, self.unit = total, out, unit
        self.start = time.monotonic()
        self.last_line = 0.0
        self.bar = None
        if out.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit=unit, dynamic_ncols=True, file=out, smoothing=0.1)

    def update(self, n: int, done: int, failed: int, mean_reward: float | None) -> None:
        info = {"failed": failed}
        if mean_reward is not None:
            info["reward"] = f"{mean_reward:.3f}"
        info.update(ratelimit.progress_info(done, self.total))  # concurrency, share of 429s, cost
        if self.bar is not None:
            self.bar.update(n)
            self.bar.set_postfix(info, refresh=False)
            return
        now = time.monotonic()
        if now - self.last_line >= 10 or done >= self.total:
            self.last_line = now
            rate = done / max(now - self.start, 1e-9)
            pct = 100.0 * done / self.total if self.total else 100.0
            print(f"[sft-ray] {done}/{self.total} {self.unit} ({pct:.1f}%), {rate:.1f} {self.unit}/s, "
                  + ", ".join(f"{k} {v}" for k, v in info.items()), file=self.out, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class Timing:
    """Start-up, wall time after the first backend was ready, and the steady rate between
    10% and 90% done (what a long run sustains, without actor start-up and tail)."""

    def __init__(self, planned: int) -> None:
        self.planned = planned
        self.t0 = time.monotonic()
        self.first_rows_after_s: float | None = None
        self.first_ready: float | None = None  # epoch seconds when the first actor's backend was ready
        self.marks: dict[float, tuple[float, int]] = {}

    def batch(self, n: int, done_before: int, ready_at: float | None) -> None:
        now = time.monotonic()
        if ready_at is not None and (self.first_ready is None or ready_at < self.first_ready):
            self.first_ready = ready_at
        if self.first_rows_after_s is None:
            self.first_rows_after_s = round(now - self.t0, 3)  # start-up: actors, engines, first answers
        for q in (0.1, 0.9):
            if done_before < q * self.planned <= done_before + n:
                self.marks[q] = (now, done_before + n)

    def record(self) -> dict[str, float]:
        out = {"generate_wall_s": round(time.monotonic() - self.t0, 3)}
        if self.first_rows_after_s is not None:
            out["first_rows_after_s"] = self.first_rows_after_s
        if self.first_ready is not None:
            out["generate_after_ready_s"] = round(max(1e-3, time.time() - self.first_ready), 3)
        if len(self.marks) == 2 and self.marks[0.9][0] > self.marks[0.1][0]:
            (t1, n1), (t2, n2) = self.marks[0.1], self.marks[0.9]
            out["steady_samples_per_s"] = round((n2 - n1) / (t2 - t1), 2)
        return out


class Session:
    """This run's record in run.json: what it planned, wrote and why it stopped."""

    def __init__(self, manifest: dict[str, Any], planned: int) -> None:
        self.number = len(manifest["sessions"])
        self.record: dict[str, Any] = {"session": self.number, "started_at": time.time(), "planned": planned,
                                       "written": 0, "failed": 0, "output_tokens": 0, "generate_wall_s": 0.0,
                                       "stopped": None}
        manifest["sessions"].append(self.record)
        self.reward_sum, self.reward_n = 0.0, 0

    @property
    def finished(self) -> int:
        return self.record["written"] + self.record["failed"]

    def add(self, ok: int, failed: int, tokens: int, rewards: list[float | None]) -> None:
        self.record["written"] += ok
        self.record["failed"] += failed
        self.record["output_tokens"] += tokens
        rs = [r for r in rewards if r is not None]
        self.reward_sum += sum(rs)
        self.reward_n += len(rs)

    @property
    def mean_reward(self) -> float | None:
        return self.reward_sum / self.reward_n if self.reward_n else None
