"""Rejection sampling (``rejection.target_passing``, ``rejection.max_samples``).

A prompt is sampled until ``target_passing`` of its samples pass (reward >=
``filter.min_reward``) or ``max_samples`` were drawn. The decision needs each
sample's reward as soon as it exists, so the generation actor that owns a prompt
scores its samples itself (:func:`draw_prompt`) and hands back all of them at once;
the score stage passes such rows through. The driver works out, from the run folder
alone, where each prompt stands (:func:`sft_ray.runfolder.completion.prompt_draws`), so a
rerun continues every prompt where it stopped and draws no sample twice: finished samples
are in ``rollouts/``, answers that were not written yet in the journal. Phase 2 reports how
it went (:class:`sft_ray.finalize.stats.Tally`).

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
