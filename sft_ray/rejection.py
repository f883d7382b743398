"""Rejection sampling (``rejection.target_passing``, ``rejection.max_samples``).

A prompt is sampled until ``target_passing`` of its samples pass (reward >=
``filter.min_reward``) or ``max_samples`` were drawn. The decision needs each
sample's reward as soon as it exists, so the generation actor that owns a prompt
scores its samples itself (:func:`draw_prompt`) and hands back all of them at once;
the score stage passes such rows through. The driver works out, from the run folder
alone, where each prompt stands (:func:`sft_ray.runfolder.completion.prompt_draws`), so a rerun continues every
prompt where it stopped and draws no sample twice: finished samples are in
``rollouts/``, answers that were not written yet in the journal.

Failures: a sample that fails (an infrastructure error, no reward) stops its prompt for
this run; a rerun retries that sample (its index) first, then goes on. A failure that is
final (``max_sample_attempts``) counts as drawn, so a prompt that always fails ends.
"""

from __future__ import annotations

import asyncio
from typing import Any, Awaitable, Callable

from sft_ray.runfolder.completion import PromptDraws

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

    def add(self, rid: str, rewards: list[float], failures: int, source: str | None) -> None:
        """One prompt: the rewards of its samples, and its failed samples (drawn, without a reward)."""
        n = len(rewards) + failures
        passing = sum(r >= self.threshold for r in rewards)
        self.prompts += 1
        self.drawn += n
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

    def result(self) -> dict[str, Any]:
        most = self.prompts * self.max_samples
        return {"target_passing": self.target, "max_samples": self.max_samples, "min_reward": self.threshold,
                "prompts": self.prompts, "reached_target": self.reached, "finished_below_target": self.below,
                "never_passed": len(self.never), "unfinished": self.unfinished, "samples_drawn": self.drawn,
                "samples_at_max": most, "samples_saved": most - self.drawn,
                "saved_fraction": round((most - self.drawn) / most, 4) if most else 0.0}
