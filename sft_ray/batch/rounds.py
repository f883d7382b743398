"""The rounds: rejection sampling's (each round sends what every open prompt still needs) and agent
episodes' (one model turn per round)."""

from __future__ import annotations

import asyncio
from typing import Any, Awaitable, Callable

from sft_ray.backends.base import GenerationRequest, GenerationResult
from sft_ray.backends.batchapi import BatchStatus
from sft_ray.batch.collect import Collector
from sft_ray.batch.record import BatchRecorder
from sft_ray.batch.samples import Samples
from sft_ray.batch.submit import Submitter
from sft_ray.config import RejectionConfig, RunConfig
from sft_ray.driver import Session
from sft_ray.environments import build_environment
from sft_ray.rollout import run_agent_sample, stamp_source
from sft_ray.runfolder.batches import BatchEntry, BatchLog
from sft_ray.runfolder.completion import prompt_draws
from sft_ray.runfolder.layout import Key
from sft_ray.runfolder.state import FolderState


def refill(samples: Samples, log: BatchLog, state: FolderState, rejection: RejectionConfig | None) -> None:
    """The samples to send now: without rejection sampling, every sample not done, in no open
    batch, not failed for good; with it, the next round's samples of each open prompt: as many as it
    still needs to reach ``target_passing``, at most ``max_samples`` in all, failures with attempts
    left first."""
    in_flight = log.in_flight_keys()
    skip = state.skip()
    if rejection is None:
        for key in list(samples.pending):
            if key in skip or key in in_flight:
                del samples.pending[key]
        return
    busy = {rid for rid, _ in in_flight} | {rid for rid, _ in samples.pending}
    draws = prompt_draws(set(samples.rows), state)
    for rid in samples.rows:
        if rid in busy:
            continue
        d = draws.get(rid)
        if d is not None and d.finished(rejection.target_passing, rejection.max_samples):
            continue
        passing, drawn = (d.passing, d.drawn) if d else (0, 0)
        retry = list(d.retry) if d else []
        need = min(rejection.target_passing - passing, rejection.max_samples - drawn)
        nxt = d.next if d else 0
        keys = retry[:need] + list(range(nxt, nxt + max(0, need - len(retry))))
        for k in keys:
            samples.pending[(rid, k)] = None


class Episodes:
    """Agent episodes, one model turn per round: up to model.batch.max_requests x max_in_flight episodes run on
    the driver at once; when every one of them waits on its next model call, those calls go in one
    round of batches, and the answers let each episode run its tool calls and come back with its
    next call (or finish). Episodes live in this process only: batches a killed run left open are
    abandoned (recorded so), and their episodes start again from the first turn."""

    def __init__(self, cfg: RunConfig, samples: Samples, log: BatchLog, state: FolderState, session: Session,
                 submitter: Submitter, collector: Collector, recorder: BatchRecorder,
                 rejection: RejectionConfig | None) -> None:
        self.rejection = rejection
        self.cfg, self.samples, self.log, self.state, self.session = cfg, samples, log, state, session
        self.submitter, self.collector, self.recorder = submitter, collector, recorder
        self.poll_interval_s = cfg.model.batch.poll_interval_s

    async def run(self) -> None:
        for entry in self.log.open():
            self.log.collected(entry, "abandoned", {})
        environment = build_environment(self.cfg.environment.model_dump())
        environment.model_name = self.samples.model_name
        await environment.start()
        limits = self.submitter.provider.limits
        try:
            while not self.session.record.stopped:
                refill(self.samples, self.log, self.state, self.rejection)
                if not self.samples.pending:
                    break
                chunk = self.samples.take(limits.max_requests * self.submitter.max_open_batches)
                await self.episodes(environment, chunk)
                skip = self.state.skip()
                for key in chunk:  # failed episodes with attempts left run again
                    if key not in skip:
                        self.samples.pending[key] = None
        finally:
            await environment.close()

    async def episodes(self, environment: Any, keys: list[Key]) -> None:
        """Run these episodes to their end, their model calls in rounds; write each as it ends."""
        waiting: dict[Key, tuple[GenerationRequest, asyncio.Future]] = {}
        finished: list[tuple[Key, dict[str, Any]]] = []
        live = len(keys)
        wake = asyncio.Event()
        loop = asyncio.get_running_loop()

        def caller(key: Key) -> Callable[[GenerationRequest], Awaitable[GenerationResult]]:
            async def call_model(request: GenerationRequest) -> GenerationResult:
                future = loop.create_future()
                waiting[key] = (request, future)
                wake.set()
                return await future
            return call_model

        async def episode(key: Key) -> None:
            nonlocal live
            try:
                rid, k = key
                row, sample, source = self.samples.prompt(key)
                # No agent.timeout_s: each model turn waits for a whole batch.
                rollout = await run_agent_sample(caller(key), environment, self.cfg.agent.max_steps, None,
                                                 self.cfg.verifier.type == "nemo_gym", self.samples.model_name,
                                                 None, row, rid, k, sample.prompt, sample.tools, sample.params)
                stamp_source(rollout, source)
                finished.append((key, rollout))
            finally:
                live -= 1
                wake.set()

        tasks = [asyncio.ensure_future(episode(key)) for key in keys]
        turn = 0
        try:
            while live:
                await wake.wait()
                wake.clear()
                if len(waiting) < live:
                    continue  # some episodes are still running tools
                calls = dict(waiting)
                waiting.clear()
                ended, finished[:] = list(finished), []
                await self.recorder.write(ended)
                turn += 1
                answers = await self.turn({key: request for key, (request, _) in calls.items()}, turn)
                for key, (_, future) in calls.items():
                    future.set_result(answers[key])
            await asyncio.gather(*tasks)
        finally:
            for t in tasks:
                t.cancel()
        await self.recorder.write(finished)

    async def turn(self, calls: dict[Key, GenerationRequest], turn: int) -> dict[Key, GenerationResult]:
        """One round: every waiting episode's model call, in as many batches as the limits need,
        waited on until all ended; calls a batch never ran go again."""
        answers: dict[Key, GenerationResult] = {}
        todo = list(calls)
        base = max(0.01, self.poll_interval_s / 10)
        provider = self.submitter.provider
        while todo:
            lines = {key: provider.request_line(key, calls[key]) for key in todo}
            for keys in self.submitter.cut(todo, lines):
                data = b"".join(lines[k] + b"\n" for k in keys)
                n = max(self.log.entries, default=-1) + 1
                await self.submitter.send(keys, data, f"sft-ray-turn-{turn:03d}-{n:05d}.jsonl")

            async def keep(entry: BatchEntry, batch: BatchStatus) -> None:
                for key, result in (await self.collector.results(entry, batch)).items():
                    if result is not None:
                        answers[key] = result
                self.log.collected(entry, batch.status, batch.counts)

            wait = base
            while self.log.open():
                changed = await self.collector.poll(keep)
                wait = base if changed else min(self.poll_interval_s, wait * 1.5)
                if self.log.open():
                    await asyncio.sleep(wait)
            todo = [k for k in todo if k not in answers]
        return answers
