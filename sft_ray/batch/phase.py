"""The batch loop: one session's submitter, collector and rounds, driven until nothing is left to send
or wait for (or, with ``no_wait``, once everything is submitted)."""

from __future__ import annotations

import asyncio
import sys
import time
from typing import Callable

from sft_ray.backends.anthropic_batch import AnthropicBatchProvider
from sft_ray.backends.batchapi import BatchAPIError, BatchLimits, BatchProvider
from sft_ray.backends.openai_batch import OpenAIBatchProvider
from sft_ray.batch.collect import Collector
from sft_ray.batch.record import BatchRecorder, BatchWatch, Spending
from sft_ray.batch.rounds import Episodes, refill
from sft_ray.batch.samples import Samples
from sft_ray.batch.submit import Submitter
from sft_ray.config import RunConfig
from sft_ray.driver import Session
from sft_ray.rollout import model_wiring
from sft_ray.runfolder.batches import BatchLog
from sft_ray.runfolder.layout import BATCHES
from sft_ray.runfolder.manifest import Manifest, StopReason
from sft_ray.runfolder.parts import Writers
from sft_ray.runfolder.state import FolderState
from sft_ray.stages.read import InputPlan


def batch_provider(cfg: RunConfig) -> BatchProvider:
    """The Batch API adapter of the configured model, its key and secret headers read here."""
    bc = cfg.model.batch
    if cfg.model.backend == "anthropic":  # Message Batches: its limits are capped to Anthropic's there
        return AnthropicBatchProvider(model_wiring(cfg.model), BatchLimits(bc.max_requests, bc.max_bytes))
    return OpenAIBatchProvider(model_wiring(cfg.model), BatchLimits(bc.max_requests, bc.max_bytes), bc.completion_window)


class BatchPhase:
    """One session's batch loop; :meth:`run` returns when nothing is left to send or wait for
    (or, with ``no_wait``, once everything is submitted)."""

    def __init__(self, cfg: RunConfig, manifest: Manifest, inputs: InputPlan, state: FolderState,
                 session: Session, writers: Writers, say: Callable[[str], None], no_wait: bool,
                 out=sys.stderr, watch: BatchWatch | None = None) -> None:
        self.cfg, self.inputs, self.state, self.session = cfg, inputs, state, session
        self.say, self.no_wait = say, no_wait
        self.poll_interval_s = cfg.model.batch.poll_interval_s
        self.log = BatchLog(cfg.output)
        self.provider = batch_provider(cfg)
        self.samples = Samples(cfg, self.provider.model_name)
        self.rejection = cfg.rejection if cfg.rejection.active else None
        self.spending = Spending(cfg, manifest)
        self.recorder = BatchRecorder(cfg, state, session, writers, self.spending, watch)
        self.submitter = Submitter(self.provider, self.log, self.samples, session, self.spending, self.recorder,
                                   cfg.model.batch.max_in_flight,
                                   cfg.responses_create_params.model_dump().get("max_output_tokens"))
        self.collector = Collector(self.provider, self.log, self.samples, state, session, self.recorder,
                                   self.rejection is None, say, out)

    async def run(self) -> None:
        self.samples.load(self.inputs, self.state, everything=self.rejection is not None)
        async with self.provider:
            if self.cfg.environment.type != "none":
                await Episodes(self.cfg, self.samples, self.log, self.state, self.session, self.submitter,
                               self.collector, self.recorder, self.rejection).run()
            else:
                await self.run_samples()
        await self.recorder.close()
        open_ = self.log.open()
        if open_:
            n = sum(len(e.keys) for e in open_)
            self.say(f"{len(open_)} batch(es) holding {n} samples are at the provider (recorded in {BATCHES}); "
                     "rerun the same command to collect them")
            self.session.record["batches_open"] = len(open_)

    async def run_samples(self) -> None:
        """Single-turn samples (and rejection sampling's rounds)."""
        polled = False
        base = max(0.01, self.poll_interval_s / 10)
        wait = base
        while True:
            await self.submitter.submit_uploaded()
            if not self.session.record.stopped:
                refill(self.samples, self.log, self.state, self.rejection)
                await self.submitter.fill()
            if not self.log.open() or (self.no_wait and polled):
                break
            changed = await self.collector.poll()
            polled = True
            if self.no_wait:
                continue  # submit what the collected batches left to send, then return
            # Poll fast while batches move, then back off by half again up to poll_interval_s.
            wait = base if changed else min(self.poll_interval_s, wait * 1.5)
            if self.log.open():
                await asyncio.sleep(wait)


def batch_generate(cfg: RunConfig, manifest: Manifest, inputs: InputPlan, state: FolderState,
                   session: Session, writers: Writers, say: Callable[[str], None], no_wait: bool,
                   watch: BatchWatch | None = None) -> None:
    """Phase 1 through the Batch API (see :mod:`sft_ray.batch`); the session record gets its spend."""
    phase = BatchPhase(cfg, manifest, inputs, state, session, writers, say, no_wait, watch=watch)
    t0 = time.monotonic()
    try:
        asyncio.run(phase.run())
    except BatchAPIError as e:
        session.record.stop(StopReason.BATCH_API_ERROR, e)
        raise
    finally:
        session.record["spend"] = phase.spending.record()
        session.record["generate_wall_s"] = round(time.monotonic() - t0, 3)
