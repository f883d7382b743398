"""Rejection sampling (``rejection.target_passing``, ``rejection.max_samples``).

A prompt is sampled until ``target_passing`` of its samples pass (reward >=
``filter.min_reward``) or ``max_samples`` were drawn. The decision needs each
sample's reward as soon as it exists, so the generation actor that owns a prompt
scores its samples itself (:func:`draw_prompt`) and hands back all of them at once;
the score stage passes such rows through. The driver works out, from the run folder
alone, where each prompt stands (:func:`prompt_draws`), so a rerun continues every
prompt where it stopped and draws no sample twice: finished samples are in
``rollouts/``, answers that were not written yet in the journal.

Failures: a sample that fails (an infrastructure error, no reward) stops its prompt for
this run; a rerun retries that sample (its index) first, then goes on. A failure that is
final (``max_sample_attempts``) counts as drawn, so a prompt that always fails ends.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Awaitable, Callable, Iterable

import orjson

if TYPE_CHECKING:
    from sft_ray.driver import Completion, FolderState


@dataclass
class PromptDraws:
    """Where one prompt stands: its passing and drawn samples, the next unused sample index,
    and the failed samples a rerun tries again."""

    passing: int = 0
    done: int = 0  # samples with a rollout
    failed_final: int = 0  # samples whose failure is final
    next: int = 0  # first sample index never used
    retry: list[int] = field(default_factory=list)

    @property
    def drawn(self) -> int:
        return self.done + self.failed_final

    def finished(self, target: int, max_samples: int) -> bool:
        return self.passing >= target or self.drawn >= max_samples

    def to_json(self) -> str:
        return orjson.dumps({"passing": self.passing, "done": self.done, "failed_final": self.failed_final,
                             "next": self.next, "retry": self.retry}).decode()

    @classmethod
    def from_json(cls, text: str | None) -> "PromptDraws":
        return cls(**orjson.loads(text)) if text else cls()


def prompt_draws(ids: set[str], state: "FolderState") -> dict[str, PromptDraws]:
    """Each prompt of ``ids`` that has a sample in the run folder, and where it stands."""
    out: dict[str, PromptDraws] = {}

    def get(rid: str) -> PromptDraws | None:
        if rid not in ids:
            return None
        d = out.get(rid)
        if d is None:
            d = out[rid] = PromptDraws(passing=state.passing.get(rid, 0))
        return d

    for rid, k in state.done:
        d = get(rid)
        if d is not None:
            d.done += 1
            d.next = max(d.next, k + 1)
    for (rid, k), runs in state.failed_runs.items():
        d = get(rid)
        if d is not None:
            d.next = max(d.next, k + 1)
            if runs >= state.max_attempts:
                d.failed_final += 1
            else:
                d.retry.append(k)
    for d in out.values():
        d.retry.sort()
    return out


@dataclass
class DrawPlan:
    """What the read stage needs: which prompts to send, and where each started one stands."""

    started: dict[str, str]  # id -> PromptDraws JSON, for unfinished prompts that have samples
    finished: frozenset[str]

    @classmethod
    def make(cls, draws: dict[str, PromptDraws], target: int, max_samples: int) -> "DrawPlan":
        """From :func:`prompt_draws`."""
        finished = frozenset(r for r, d in draws.items() if d.finished(target, max_samples))
        started = {r: d.to_json() for r, d in draws.items() if r not in finished}
        return cls(started, finished)

    def open_prompts(self, ids: Iterable[str]) -> int:
        return sum(1 for r in ids if r not in self.finished)


def count_completion(ids: Iterable[str], draws: dict[str, PromptDraws], target: int, max_samples: int,
                     bad_lines: int = 0) -> "Completion":
    """The run's completion counted by prompt: ``pending`` is the prompts neither finished nor
    waiting on a failed sample's retry (work a stopped run left undone); ``failed`` the failed
    samples of unfinished prompts plus every final failure. A failure of a prompt that finished
    anyway is not needed and not counted. ``draws``: from :func:`prompt_draws`."""
    from sft_ray.driver import Completion

    c = Completion(bad_lines=bad_lines)
    for rid in ids:
        d = draws.get(rid) or PromptDraws()
        c.done += d.done
        c.failed += d.failed_final
        c.failed_final += d.failed_final
        if not d.finished(target, max_samples):
            c.failed += len(d.retry)
            c.pending += not d.retry
    c.expected = c.done + c.failed + c.pending
    return c


Sample = Callable[[int], Awaitable["dict[str, Any] | None"]]


async def draw_prompt(sample: Sample, draws: PromptDraws, target: int, max_samples: int,
                      threshold: float) -> list[tuple[int, dict[str, Any]]]:
    """Draw samples of one prompt until ``target`` pass or ``max_samples`` were drawn.

    ``sample(k)`` generates and scores sample ``k`` and returns its rollout (None when the
    spending budget refused to start it). At most the samples still needed are in flight at
    once, so the overshoot past ``target`` is at most what was in flight when it was reached.
    A failed sample, or a refused one, stops the prompt for this run. Failed samples with
    attempts left (``draws.retry``) are drawn again first, under their own index.
    """
    out: list[tuple[int, dict[str, Any]]] = []
    retry, nxt = list(draws.retry), draws.next
    passing, drawn = draws.passing, draws.drawn
    running: dict[asyncio.Future, int] = {}
    stop = False
    while True:
        while not stop and passing + len(running) < target and drawn + len(running) < max_samples:
            if retry:
                k = retry.pop(0)
            else:
                k, nxt = nxt, nxt + 1
            running[asyncio.ensure_future(sample(k))] = k
        if not running:
            return out
        finished, _ = await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
        for task in finished:
            k = running.pop(task)
            rollout = task.result()
            if rollout is None:  # refused by the spending budget: never drawn
                stop = True
                continue
            out.append((k, rollout))
            if rollout.get("error") is not None or rollout.get("reward") is None:
                stop = True  # no verdict: a rerun retries this sample, then goes on
                continue
            drawn += 1
            passing += rollout["reward"] >= threshold


class Tally:
    """The report's rejection section, counted prompt by prompt in finalize (streamed: only the
    prompts that never passed are kept, for ``never_passed.jsonl``)."""

    def __init__(self, target: int, max_samples: int, threshold: float) -> None:
        self.target, self.max_samples, self.threshold = target, max_samples, threshold
        self.prompts = self.reached = self.below = self.unfinished = self.drawn = 0
        self.never: list[dict[str, Any]] = []
        # Sound under sequential sampling: scored samples up to the first pass (by sample index: the draw
        # order) per prompt that passed, and each prompt's passing share of its scored samples.
        self.to_first_pass: dict[int, int] = {}
        self.share_sum, self.scored_prompts = 0.0, 0

    def add(self, rid: str, rewards: list[float], failures: int, source: str | None,
            indices: list[int] | None = None) -> None:
        """One prompt: the rewards of its samples (``indices``: their sample indices, the draw
        order), and its failed samples (drawn, without a reward)."""
        n = len(rewards) + failures
        passing = sum(r >= self.threshold for r in rewards)
        self.prompts += 1
        self.drawn += n
        if rewards:
            self.scored_prompts += 1
            self.share_sum += passing / len(rewards)
            order = [r for _, r in sorted(zip(indices, rewards))] if indices is not None else rewards
            first = next((i for i, r in enumerate(order, start=1) if r >= self.threshold), None)
            if first is not None:
                self.to_first_pass[first] = self.to_first_pass.get(first, 0) + 1
        if passing >= self.target:
            self.reached += 1
        elif n >= self.max_samples:
            self.below += 1
            if not passing:
                self.never.append({"id": rid, "source": source, "samples": n,
                                   "best_reward": max(rewards) if rewards else None})
        else:
            self.unfinished += 1

    def merge(self, other: "Tally") -> None:
        """Add another tally's prompts (one finalize worker's share)."""
        self.prompts += other.prompts
        self.reached += other.reached
        self.below += other.below
        self.unfinished += other.unfinished
        self.drawn += other.drawn
        self.never.extend(other.never)
        for k, v in other.to_first_pass.items():
            self.to_first_pass[k] = self.to_first_pass.get(k, 0) + v
        self.share_sum += other.share_sum
        self.scored_prompts += other.scored_prompts

    def result(self) -> dict[str, Any]:
        most = self.prompts * self.max_samples
        return {"target_passing": self.target, "max_samples": self.max_samples, "min_reward": self.threshold,
                "prompts": self.prompts, "reached_target": self.reached, "finished_below_target": self.below,
                "never_passed": len(self.never), "unfinished": self.unfinished, "samples_drawn": self.drawn,
                "samples_at_max": most, "samples_saved": most - self.drawn,
                "saved_fraction": round((most - self.drawn) / most, 4) if most else 0.0,
                "samples_to_first_pass": self._first_pass(),
                "passing_share_per_prompt": round(self.share_sum / self.scored_prompts, 4)
                if self.scored_prompts else None}

    def _first_pass(self) -> dict[str, Any]:
        """Over the prompts that passed: scored samples drawn up to and including the first passing one."""
        passed = sum(self.to_first_pass.values())
        total = sum(k * v for k, v in self.to_first_pass.items())
        return {"prompts": passed, "mean": round(total / passed, 4) if passed else None,
                "histogram": {str(k): v for k, v in sorted(self.to_first_pass.items())}}
