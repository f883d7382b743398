"""What collects: every open batch polled, an ended one's results read back per sample, its answers
and failures written, and what it never ran sent again."""

from __future__ import annotations

import sys
import time
from typing import Awaitable, Callable

from sft_ray import errors
from sft_ray.backends.base import GenerationResult, error_result
from sft_ray.backends.batchapi import BatchProvider, BatchStatus
from sft_ray.batch.record import BatchRecorder
from sft_ray.batch.samples import Samples
from sft_ray.driver import Session
from sft_ray.runfolder.batches import BatchEntry, BatchLog
from sft_ray.runfolder.layout import Key
from sft_ray.runfolder.state import FolderState

OnEnd = Callable[[BatchEntry, BatchStatus], Awaitable[None]]


class Collector:
    """Polls the open batches and collects those that ended."""

    def __init__(self, provider: BatchProvider, log: BatchLog, samples: Samples, state: FolderState,
                 session: Session, recorder: BatchRecorder, resend_failures: bool, say: Callable[[str], None],
                 out=sys.stderr) -> None:
        self.provider, self.log, self.samples, self.state = provider, log, samples, state
        self.session, self.recorder, self.resend_failures = session, recorder, resend_failures
        self.say, self.out = say, out
        self.last_line = ""
        self.last_line_at = 0.0

    async def poll(self, on_end: OnEnd | None = None) -> bool:
        """Poll every submitted open batch once, hand those that ended to ``on_end`` (default:
        :meth:`collect`); whether any status moved."""
        changed = False
        parts = []
        for entry in self.log.open():
            if entry.batch_id is None:
                continue
            batch = await self.provider.status(entry.batch_id)
            counts = batch.counts
            parts.append(f"{entry.batch_id} {batch.status} {counts.get('completed', 0)}/"
                         f"{counts.get('total', len(entry.keys))}"
                         + (f" ({counts['failed']} failed)" if counts.get("failed") else ""))
            if batch.ended:
                await (on_end or self.collect)(entry, batch)
                changed = True
        line = "[sft-ray] batches: " + "; ".join(parts) + (f"; {self.session.record['written']} samples written"
                                                           f", {self.session.record['failed']} failed")
        now = time.monotonic()
        if line != self.last_line or now - self.last_line_at >= 60:
            changed = changed or line != self.last_line
            print(line, file=self.out, flush=True)
            self.last_line, self.last_line_at = line, now
        return changed

    async def collect(self, entry: BatchEntry, batch: BatchStatus) -> None:
        """Write an ended batch's answers and failures; what it never ran goes back to pending."""
        results = await self.results(entry, batch)
        done = self.state.done
        answered = [(k, r) for k, r in results.items() if r is not None and k not in done]
        await self.recorder.write([(k, self.samples.rollout(k, r)) for k, r in answered])
        self.log.collected(entry, batch.status, batch.counts)
        if self.resend_failures:  # failures with attempts left, and what the batch never ran, go in a later batch
            skip = self.state.skip()
            for key in entry.keys:
                if key not in skip:
                    self.samples.pending[key] = None
        if batch.status != "completed":
            left = len(entry.keys) - len(answered)
            self.say(f"batch {entry.batch_id} {batch.status}: {len(answered)} answers kept, {left} sample(s) sent again")

    async def results(self, entry: BatchEntry, batch: BatchStatus) -> dict[Key, GenerationResult | None]:
        """An ended batch's result per sample: an answer, a failure, or None (never run)."""
        mine = set(entry.keys)
        results: dict[Key, GenerationResult | None] = {}
        self.provider.expect(entry.keys)
        for raw in await self.provider.result_lines(batch):
            parsed = self.provider.parse_result(raw)
            if parsed is None:
                continue  # a torn or foreign line: its sample is sent again
            key, result = parsed
            if key not in mine or results.get(key) is not None:
                continue  # not one of this batch's samples (a careless server), or a repeat
            results[key] = result
        if batch.status == "failed" and not results:  # the provider refused the file itself
            results = {k: error_result(errors.CLIENT_ERROR, f"batch {entry.batch_id} failed: {batch.refusal}")
                       for k in entry.keys}
        return results
