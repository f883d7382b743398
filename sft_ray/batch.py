"""Phase 1 through a provider's Batch API (``model.batch.enabled``): the driver uploads the samples
to generate as JSONL files, creates batches, polls them and writes what comes back.

No Ray actor takes part: the driver builds each request body as an online request would
(:class:`~sft_ray.backends.openai.OpenAIBackend`), cuts the samples into files within
``model.batch.max_requests`` / ``max_bytes``, keeps up to ``model.batch.max_in_flight`` batches
submitted, and polls them (from a tenth of ``poll_interval_s``, backing off by half again while
nothing changes). A finished batch's answers become rollouts with the same builder, scorer
(:class:`~sft_ray.stages.score.ScoreStage`, or the score actors for a vLLM judge) and writers as
online answers, so ``rollouts/``, ``train/``, stats.json and the report have the same shape.

Durable: every upload and batch is in ``batches.jsonl`` (:mod:`sft_ray.runfolder.batches`) before
the driver submits or waits on it; a rerun of the same command polls the same batches and sends only
samples that are in no open batch. A line that ran and failed is a failure record with its error
class, sent again in a later batch while it has attempts left (``max_sample_attempts``); a line an
expired or cancelled batch never ran is sent again without counting an attempt; every answer a
batch finished is kept. ``no_wait``: submit, collect what already finished, and return.

Agent episodes (an environment is configured) go in rounds too, one model turn per round
(:meth:`BatchPhase.run_episodes`); they live in the driver's memory between rounds, so a rerun
abandons the batches a killed run left open and starts those episodes again.

With rejection sampling the batches go in rounds: each round sends, for every prompt that is not
finished and has no sample in an open batch, as many new samples as it still needs to reach
``rejection.target_passing`` (at most ``rejection.max_samples`` in all).
"""

from __future__ import annotations

import asyncio
import sys
import time
from typing import Any, Awaitable, Callable

import orjson

from sft_ray import errors
from sft_ray.backends.base import GenerationRequest, GenerationResult, Secret, error_result
from sft_ray.backends.openai import OpenAIBackend
from sft_ray.backends.openai_batch import (
    ENDPOINTS,
    TERMINAL,
    BatchAPIError,
    BatchClient,
    custom_id,
    parse_custom_id,
    parse_line,
    request_line,
)
from sft_ray.config import RunConfig, flat_dump
from sft_ray.cost import batch_prices, cost_usd
from sft_ray.driver import Session, remote_scorer
from sft_ray.environments import build_environment
from sft_ray.ratelimit import spent_before
from sft_ray.rows import InputError, drop_params, prompt_messages, prompt_tools, sampling_params
from sft_ray.runfolder.batches import BatchEntry, BatchLog
from sft_ray.runfolder.completion import Budget, prompt_draws
from sft_ray.runfolder.layout import BATCHES, Key
from sft_ray.runfolder.parts import Writers
from sft_ray.runfolder.state import FolderState
from sft_ray.scoring import verifier_payload
from sft_ray.stages.generate import build_rollout, run_agent_sample
from sft_ray.stages.read import InputPlan, read_samples
from sft_ray.stages.score import ScoreStage

SCORE_CHUNK = 1024  # rollouts scored and written at a time


def request_counts(batch: dict[str, Any]) -> dict[str, int]:
    """A batch's ``request_counts`` (total, completed, failed), what of it is a count."""
    counts = batch.get("request_counts")
    return {str(k): v for k, v in counts.items() if type(v) is int} if isinstance(counts, dict) else {}


class BatchPhase:
    """One session's batch loop; :meth:`run` returns when nothing is left to send or wait for
    (or, with ``no_wait``, once everything is submitted)."""

    def __init__(self, cfg: RunConfig, manifest: dict[str, Any], inputs: InputPlan, state: FolderState,
                 session: Session, writers: Writers, say: Callable[[str], None], no_wait: bool,
                 out=sys.stderr) -> None:
        self.cfg, self.inputs, self.state, self.session, self.writers = cfg, inputs, state, session, writers
        self.say, self.no_wait, self.out = say, no_wait, out
        self.bc = cfg.model.batch
        self.log = BatchLog(cfg.output)
        model = flat_dump(cfg.model)  # every backend's keys, as the backends read them
        model["api_key"] = Secret(cfg.model.api_key())
        model["secret_headers"] = Secret(cfg.model.secret_headers())
        self.model = model
        self.bodies = OpenAIBackend(model, 1)  # builds each request's body, as online requests are built
        self.model_name = getattr(self.bodies, "model_name", cfg.model.name)
        self.endpoint = ENDPOINTS[cfg.model.api]
        self.sampling = cfg.responses_create_params.model_dump()
        self.rows: dict[str, tuple[str, str]] = {}  # id -> (input line, file:line)
        self.pending: dict[Key, None] = {}  # samples to send, in input order
        self.rejection = cfg.rejection if cfg.rejection.active else None
        self.budget = Budget(cfg.max_error_fraction, cfg.min_rows_for_budget)
        self.pricing = batch_prices(cfg.pricing.model_dump())
        self.before = spent_before(manifest)
        self.spend = {"requests": 0, "input_tokens": 0, "output_tokens": 0, "batches": 0}
        self.remote = remote_scorer(cfg)
        self.scorer = ScoreStage(verifier_payload(cfg.verifier)) if self.remote is None else None
        self.last_line = ""
        self.last_line_at = 0.0

    # -- what to send ------------------------------------------------------------------------

    def load_rows(self) -> None:
        """The input rows of every sample not done (their text and source), read on the driver;
        a bad line stops the run as it does online. With rejection sampling every row (a prompt whose
        first sample is done may still need more)."""
        skip = self.state.skip() if self.rejection is None else set()
        for f in self.inputs.used():
            for cols in read_samples(f.path, self.cfg.num_repeats, self.cfg.read.skip_bad_lines, skip, f.rows,
                                     qualifier=f.qualifier, renamed=f.renamed, rename=self.cfg.read.rename or None,
                                     held=f.held):
                for rid, k, text, source, bad in zip(cols["id"], cols["sample_index"], cols["row"], cols["source"],
                                                     cols["bad"]):
                    if bad is not None:
                        src, _, reason = bad.partition(": ")
                        raise InputError(src, reason)
                    self.rows[rid] = (text, source)
                    if self.rejection is None:
                        self.pending[(rid, int(k))] = None

    def refill(self) -> None:
        """The samples to send now: without rejection sampling, every sample not done, in no open
        batch, not failed for good; with it, the next round's samples of each open prompt."""
        in_flight = self.log.in_flight_keys()
        skip = self.state.skip()
        if self.rejection is None:
            for key in list(self.pending):
                if key in skip or key in in_flight:
                    del self.pending[key]
            return
        rej = self.rejection
        busy = {rid for rid, _ in in_flight} | {rid for rid, _ in self.pending}
        draws = prompt_draws(set(self.rows), self.state)
        for rid in self.rows:
            if rid in busy:
                continue
            d = draws.get(rid)
            if d is not None and d.finished(rej.target_passing, rej.max_samples):
                continue
            passing, drawn = (d.passing, d.drawn) if d else (0, 0)
            retry = list(d.retry) if d else []
            need = min(rej.target_passing - passing, rej.max_samples - drawn)
            nxt = d.next if d else 0
            keys = retry[:need] + list(range(nxt, nxt + max(0, need - len(retry))))
            for k in keys:
                self.pending[(rid, k)] = None

    def request(self, key: Key) -> bytes | GenerationResult:
        """A sample's batch line, or the failure that stops it before any request (a row with tools)."""
        rid, k = key
        text, source = self.rows[rid]
        row = orjson.loads(text)
        prompt, tools = prompt_messages(row, source), prompt_tools(row, source)
        if tools.get("tools"):
            return error_result(errors.ENVIRONMENT_ERROR, "the row offers tools but no environment runs them "
                                "(agent episodes run online: set model.batch.enabled=false)")
        params = drop_params(sampling_params(row, self.sampling, rid, k), self.cfg.model.omit_params)
        body = self.bodies.request_body(GenerationRequest(prompt, params, f"{rid}#{k}"))
        return request_line(custom_id(rid, k), self.endpoint, body)

    def rollout(self, key: Key, result: GenerationResult) -> dict[str, Any]:
        rid, k = key
        text, source = self.rows[rid]
        row = orjson.loads(text)
        prompt = prompt_messages(row, source)
        params = drop_params(sampling_params(row, self.sampling, rid, k), self.cfg.model.omit_params)
        out = build_rollout(row, rid, k, prompt if result.error is None else [], params if result.error is None
                            else {}, self.model_name, result)
        path, _, line = source.rpartition(":")
        out["source_file"], out["source_line"] = path, int(line) if line.isdigit() else None
        return out

    # -- budgets -----------------------------------------------------------------------------

    def over_budget(self, requests: int, est_in: float, est_out: float) -> bool:
        """Whether submitting these requests could pass a spending budget (budget.*), all sessions together."""
        b = self.cfg.budget
        req = self.before.get("requests", 0) + self.spend["requests"] + requests
        inp = self.before.get("input_tokens", 0) + self.spend["input_tokens"] + est_in
        out = self.before.get("output_tokens", 0) + self.spend["output_tokens"] + est_out
        return bool((b.max_requests is not None and req > b.max_requests)
                    or (b.max_output_tokens is not None and out > b.max_output_tokens)
                    or (b.max_cost_usd is not None and cost_usd(inp, out, self.pricing) > b.max_cost_usd))

    # -- the loop ----------------------------------------------------------------------------

    async def run(self) -> None:
        self.load_rows()
        async with BatchClient(self.model) as client:
            self.client = client
            if self.cfg.environment.type != "none":
                await self.run_episodes()
            else:
                await self.run_samples()
        if self.scorer is not None:
            await self.scorer.close()
        open_ = self.log.open()
        if open_:
            n = sum(len(e.keys) for e in open_)
            self.say(f"{len(open_)} batch(es) holding {n} samples are at the provider (recorded in {BATCHES}); "
                     "rerun the same command to collect them")
            self.session.record["batches_open"] = len(open_)

    async def run_samples(self) -> None:
        """Single-turn samples (and rejection sampling's rounds)."""
        polled = False
        base = max(0.01, self.bc.poll_interval_s / 10)
        wait = base
        while True:
            await self.submit_uploaded()
            if not self.session.record.get("stopped"):
                self.refill()
                await self.fill()
            if not self.log.open() or (self.no_wait and polled):
                break
            changed = await self.poll()
            polled = True
            if self.no_wait:
                continue  # submit what the collected batches left to send, then return
            # Poll fast while batches move, then back off by half again up to poll_interval_s.
            wait = base if changed else min(self.bc.poll_interval_s, wait * 1.5)
            if self.log.open():
                await asyncio.sleep(wait)

    # -- agent episodes in rounds --------------------------------------------------------------

    async def run_episodes(self) -> None:
        """Agent episodes, one model turn per round: up to max_requests x max_in_flight episodes run
        on the driver at once; when every one of them waits on its next model call, those calls go
        in one round of batches, and the answers let each episode run its tool calls and come back
        with its next call (or finish). Episodes live in this process only: batches a killed run
        left open are abandoned (recorded so), and their episodes start again from the first turn."""
        for entry in self.log.open():
            self.log.collected(entry, "abandoned", {})
        environment = build_environment(self.cfg.environment.model_dump())
        environment.model_name = self.model_name
        await environment.start()
        try:
            while not self.session.record.get("stopped"):
                self.refill()
                if not self.pending:
                    break
                chunk = list(self.pending)[:self.bc.max_requests * self.bc.max_in_flight]
                for key in chunk:
                    del self.pending[key]
                await self.episodes(environment, chunk)
                skip = self.state.skip()
                for key in chunk:  # failed episodes with attempts left run again
                    if key not in skip:
                        self.pending[key] = None
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
                text, source = self.rows[rid]
                row = orjson.loads(text)
                prompt, tools = prompt_messages(row, source), prompt_tools(row, source)
                params = drop_params(sampling_params(row, self.sampling, rid, k), self.cfg.model.omit_params)
                # No agent.timeout_s: each model turn waits for a whole batch.
                rollout = await run_agent_sample(caller(key), environment, self.cfg.agent.max_steps, None,
                                                 self.cfg.verifier.type == "nemo_gym", self.model_name, None,
                                                 row, rid, k, prompt, tools, params)
                path, _, line = source.rpartition(":")
                rollout["source_file"], rollout["source_line"] = path, int(line) if line.isdigit() else None
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
                await self.write_rollouts(ended)
                turn += 1
                answers = await self.turn(calls, turn)
                for key, (_, future) in calls.items():
                    future.set_result(answers[key])
            await asyncio.gather(*tasks)
        finally:
            for t in tasks:
                t.cancel()
        await self.write_rollouts(finished)

    async def turn(self, calls: dict[Key, tuple[GenerationRequest, asyncio.Future]],
                   turn: int) -> dict[Key, GenerationResult]:
        """One round: every waiting episode's model call, in as many batches as the limits need,
        waited on until all ended; calls a batch never ran go again."""
        answers: dict[Key, GenerationResult] = {}
        todo = list(calls)
        base = max(0.01, self.bc.poll_interval_s / 10)
        while todo:
            lines = {key: request_line(custom_id(*key), self.endpoint, self.bodies.request_body(calls[key][0]))
                     for key in todo}
            for keys in self.cut(todo, lines):
                data = b"".join(lines[k] + b"\n" for k in keys)
                n = max(self.log.entries, default=-1) + 1
                file_id = await self.client.upload(data, f"sft-ray-turn-{turn:03d}-{n:05d}.jsonl")
                entry = self.log.uploaded(file_id, keys, len(data), self.session.number)
                self.spend["requests"] += len(keys)
                self.spend["batches"] += 1
                await self.create(entry)

            async def keep(entry: BatchEntry, batch: dict[str, Any]) -> None:
                for key, result in (await self.results(entry, batch)).items():
                    if result is not None:
                        answers[key] = result
                counts = request_counts(batch)
                self.log.collected(entry, str(batch.get("status")), counts)

            wait = base
            while self.log.open():
                changed = await self.poll(keep)
                wait = base if changed else min(self.bc.poll_interval_s, wait * 1.5)
                if self.log.open():
                    await asyncio.sleep(wait)
            todo = [k for k in todo if k not in answers]
        return answers

    def cut(self, keys: list[Key], lines: dict[Key, bytes]) -> list[list[Key]]:
        """Keys in files within max_requests and max_bytes (a line over max_bytes goes alone: the
        provider's refusal fails that call)."""
        files: list[list[Key]] = [[]]
        size = 0
        for key in keys:
            n = len(lines[key]) + 1
            if files[-1] and (len(files[-1]) >= self.bc.max_requests or size + n > self.bc.max_bytes):
                files.append([])
                size = 0
            files[-1].append(key)
            size += n
        return [f for f in files if f]

    async def submit_uploaded(self) -> None:
        """Create the batch of each upload that has none (a run killed between upload and submit):
        the same file, after checking the provider has no batch made from it already."""
        for entry in self.log.open():
            if entry.batch_id is None:
                found = await self.client.find(entry.file_id)
                await self.create(entry, found)

    async def create(self, entry: BatchEntry, existing: dict[str, Any] | None = None) -> None:
        batch = existing or await self.client.create(entry.file_id, self.endpoint, self.bc.completion_window,
                                                     {"sft_ray_batch": str(entry.n)})
        self.log.submitted(entry, batch["id"])

    async def fill(self) -> None:
        """Cut pending samples into files within the limits and submit them, up to max_in_flight open."""
        while self.pending and len(self.log.open()) < self.bc.max_in_flight:
            keys, lines, size, refused = [], [], 0, []
            for key in list(self.pending):
                line = self.request(key)
                if isinstance(line, GenerationResult):
                    refused.append((key, line))
                elif len(line) + 1 > self.bc.max_bytes:
                    refused.append((key, error_result(errors.CLIENT_ERROR, f"the request is {len(line)} bytes, "
                                                      f"over model.batch.max_bytes={self.bc.max_bytes}")))
                elif size + len(line) + 1 > self.bc.max_bytes:
                    break
                else:
                    keys.append(key)
                    lines.append(line)
                    size += len(line) + 1
                del self.pending[key]
                if len(keys) >= self.bc.max_requests:
                    break
            if refused:
                await self.write([(k, r) for k, r in refused])
            if not keys:
                continue
            est_in = size / 4  # as the online limiter estimates: prompt bytes / 4
            est_out = len(keys) * (self.sampling.get("max_output_tokens") or 1024)
            if self.over_budget(len(keys), est_in, est_out):
                # Nothing more is sent (open batches are still collected); a rerun with a raised budget sends it.
                self.session.record["stopped"] = "budget"
                self.pending.clear()
                return
            n = max(self.log.entries, default=-1) + 1
            file_id = await self.client.upload(b"".join(x + b"\n" for x in lines), f"sft-ray-batch-{n:05d}.jsonl")
            entry = self.log.uploaded(file_id, keys, size, self.session.number)
            self.spend["requests"] += len(keys)
            self.spend["batches"] += 1
            await self.create(entry)

    async def poll(self, on_end: Callable[[BatchEntry, dict[str, Any]], Awaitable[None]] | None = None) -> bool:
        """Poll every submitted open batch once, hand those that ended to ``on_end`` (default:
        :meth:`collect`); whether any status moved."""
        changed = False
        parts = []
        for entry in self.log.open():
            if entry.batch_id is None:
                continue
            batch = await self.client.get(entry.batch_id)
            status = str(batch.get("status"))
            counts = request_counts(batch)
            parts.append(f"{entry.batch_id} {status} {counts.get('completed', 0)}/{counts.get('total', len(entry.keys))}"
                         + (f" ({counts['failed']} failed)" if counts.get("failed") else ""))
            if status in TERMINAL:
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

    async def collect(self, entry: BatchEntry, batch: dict[str, Any]) -> None:
        """Write an ended batch's answers and failures; what it never ran goes back to pending."""
        results = await self.results(entry, batch)
        status = str(batch.get("status"))
        done = self.state.done
        answered = [(k, r) for k, r in results.items() if r is not None and k not in done]
        await self.write(answered)
        counts = request_counts(batch)
        self.log.collected(entry, status, counts)
        if self.rejection is None:  # failures with attempts left, and what the batch never ran, go in a later batch
            skip = self.state.skip()
            for key in entry.keys:
                if key not in skip:
                    self.pending[key] = None
        if status != "completed":
            left = len(entry.keys) - len(answered)
            self.say(f"batch {entry.batch_id} {status}: {len(answered)} answers kept, {left} sample(s) sent again")

    async def results(self, entry: BatchEntry, batch: dict[str, Any]) -> dict[Key, GenerationResult | None]:
        """An ended batch's result per sample: an answer, a failure, or None (never run)."""
        mine = set(entry.keys)
        results: dict[Key, GenerationResult | None] = {}
        for name in ("output_file_id", "error_file_id"):
            fid = batch.get(name)
            if not isinstance(fid, str) or not fid:
                continue
            for raw in (await self.client.content(fid)).splitlines():
                try:
                    line = orjson.loads(raw)
                except orjson.JSONDecodeError:
                    continue  # a torn or foreign line: its sample is sent again
                key = parse_custom_id(line.get("custom_id")) if isinstance(line, dict) else None
                if key is None or key not in mine or results.get(key) is not None:
                    continue  # not one of this batch's samples (a careless server), or a repeat
                results[key] = parse_line(line, self.cfg.model.api)
        if str(batch.get("status")) == "failed" and not results:  # the provider refused the file itself
            reason = orjson.dumps((batch.get("errors") or {}).get("data") or batch.get("errors")).decode()[:300]
            results = {k: error_result(errors.CLIENT_ERROR, f"batch {entry.batch_id} failed: {reason}")
                       for k in entry.keys}
        return results

    async def write(self, results: list[tuple[Key, GenerationResult]]) -> None:
        """Score the answers and write them with the failures, as the online path does."""
        await self.write_rollouts([(k, self.rollout(k, r)) for k, r in results])

    async def write_rollouts(self, pairs: list[tuple[Key, dict[str, Any]]]) -> None:
        """Score rollouts (failed ones pass through) and write them."""
        for i in range(0, len(pairs), SCORE_CHUNK):
            chunk = pairs[i:i + SCORE_CHUNK]
            rollouts = [r for _, r in chunk]
            for r in rollouts:
                usage = r.get("usage") or {}
                self.spend["input_tokens"] += int(usage.get("input_tokens") or 0)
                self.spend["output_tokens"] += int(usage.get("output_tokens") or 0)
            batch = {"id": [k[0] for k, _ in chunk], "sample_index": [k[1] for k, _ in chunk],
                     "rollout": [orjson.dumps(r).decode() for r in rollouts],
                     "failed": [r["error"] is not None for r in rollouts], "ready_at": [0.0] * len(chunk)}
            if self.remote is not None:
                outs = list(self.remote([batch]))
            else:
                assert self.scorer is not None
                outs = [await self.scorer(batch)]
            for out in outs:
                keys = [(str(r), int(k)) for r, k in zip(out["id"], out["sample_index"])]
                rewards = list(out["reward"])
                ok, bad = self.writers.write(keys, list(out["rollout"]), [bool(f) for f in out["failed"]], rewards)
                tokens = sum(int((orjson.loads(t).get("usage") or {}).get("output_tokens") or 0)
                             for t in out["rollout"])
                self.session.add(ok, bad, tokens, rewards)
        if self.budget.exceeded(len(self.state.done), sum(1 for n in self.state.failed_runs.values())):
            self.session.record["stopped"] = "failure budget exceeded"

    def record(self) -> None:
        """This session's spend at batch prices, in its record (what the budget and stats.json read)."""
        self.session.record["spend"] = {**self.spend, "cost_usd": cost_usd(self.spend["input_tokens"],
                                                                           self.spend["output_tokens"], self.pricing)}


def batch_generate(cfg: RunConfig, manifest: dict[str, Any], inputs: InputPlan, state: FolderState,
                   session: Session, writers: Writers, say: Callable[[str], None], no_wait: bool) -> None:
    """Phase 1 through the Batch API (see the module docstring); the session record gets its spend."""
    phase = BatchPhase(cfg, manifest, inputs, state, session, writers, say, no_wait)
    t0 = time.monotonic()
    try:
        asyncio.run(phase.run())
    except BatchAPIError as e:
        session.record["stopped"] = f"batch API error: {e}"
        raise
    finally:
        phase.record()
        session.record["generate_wall_s"] = round(time.monotonic() - t0, 3)
