"""Generate stage: a ``map_batches`` actor that turns samples into rollouts.

One backend per actor (an HTTP session or a vLLM engine), built on first use
inside the actor's event loop, and, for agent runs, one tool environment. ``__call__``
is async: Ray Data runs several batches per actor at once, and every sample of every
batch is its own coroutine, so a slow request never holds back the others beyond its
own batch. A semaphore caps the model calls in flight per actor; the driver sets the
cap so that all actors together never exceed ``num_samples_in_parallel``.

A sample is one model call, or, when its row offers tools (or an environment is
configured), an episode of model calls and tool calls (:mod:`sft_ray.agent`). With
rejection sampling an input row is a prompt: the actor draws and scores its samples
until enough pass (:func:`sft_ray.rejection.draw_prompt`) and returns all of them.

Reads ``id``, ``sample_index``, ``row`` (the input line), ``source``, ``bad``, ``draw``; writes
``id``, ``sample_index``, ``rollout`` (the rollout row as JSON text), ``failed`` (true
when generation failed: the row goes to ``failed/`` and a rerun retries it) and
``ready_at``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from typing import Any

import orjson

from sft_ray import errors, metrics
from sft_ray.activity import CRASH_LIMIT, CRASHED, SampleGuard, Tracker
from sft_ray.backends import get_backend
from sft_ray.backends.base import GenerationRequest, GenerationResult, error_result
from sft_ray.environments import build_environment
from sft_ray.environments.base import Episode, ToolOutput, cancelled_from_outside
from sft_ray.models import say_through
from sft_ray.placement import acquire_replica_group, release_own_placement_group, replica_args
from sft_ray.rejection import draw_prompt
from sft_ray.rollout import build_rollout, model_wiring, prepare, run_agent_sample, stamp_source
from sft_ray.rows import InputError
from sft_ray.runfolder.completion import PromptDraws
from sft_ray.runfolder.journal import JournalSpec
from sft_ray.scoring import Scorer, verifier_payload
from sft_ray.stages import Stage

log = logging.getLogger(__name__)

_CRASHED = (f"its generation actor died {CRASH_LIMIT} times while this sample was in flight (a tool or the engine "
            "ends the process: os._exit, a crash in native code, out of memory); not run again in this run. "
            "environment.isolation: process keeps a tool's crash inside its episode")


def _node_id() -> str | None:
    """The Ray node this actor runs on (asked once per actor): which machine made a rollout."""
    try:
        import ray

        return ray.get_runtime_context().get_node_id() if ray.is_initialized() else None
    except Exception:  # outside Ray (the stage called directly): no node to name
        return None


class TrackedEpisode(Episode):
    """An episode whose tool calls count as in flight on the actor's :class:`Tracker`."""

    def __init__(self, inner: Episode, tracker: Tracker) -> None:
        self.inner, self.tracker = inner, tracker

    async def call(self, name: str, arguments: dict[str, Any]) -> ToolOutput:
        t0, ok = time.perf_counter(), False
        try:
            with self.tracker.track("tool", name):
                out = await self.inner.call(name, arguments)
            ok = not out.error
            return out
        finally:
            if (tel := metrics.current()) is not None:  # the tool's seconds and status (sft_ray/metrics.py)
                tel.tool(ok, time.perf_counter() - t0)

    async def verify(self, row, messages, tools):
        with self.tracker.track("tool", "verify"):
            return await self.inner.verify(row, messages, tools)

    async def close(self) -> None:
        await self.inner.close()


def driver_identity() -> dict[str, Any]:
    """This process, the run's driver (the stage is wired there): see :class:`DriverWatch`."""
    import socket

    import psutil

    return {"pid": os.getpid(), "host": socket.gethostname(), "started_at": psutil.Process().create_time()}


class DriverWatch:
    """Whether the run's driver is gone, as a generation actor on its node sees it.

    ``kill -9`` of the driver's process group (or of the driver alone) does not reach Ray's
    worker processes, each in a process group of its own: they live on for seconds, until they
    notice that their raylet or job is gone. A generation actor that kept sending meanwhile got
    answers that nobody would write; those it journaled after a quick rerun had read the journal
    were sent again (up to 78 of 600 with 16 in parallel, issue 22), and those in flight when it
    died were lost. So once the driver is gone the actor starts no model call; the calls in flight
    finish and are journaled. Armed only where the driver is visible when the actor starts (same
    host, same pid namespace, the same process by its start time): an actor on another node or in
    another container never takes a live driver for a dead one. psutil, not ``os.kill(pid, 0)``:
    a killed driver that its parent has not reaped yet is a zombie, which ``kill`` still finds.
    """

    CHECK_EVERY_S = 0.02  # a check reads /proc (30-150 us): at most 50 a second, whatever the request rate

    def __init__(self, driver: dict[str, Any] | None) -> None:
        self.process = None
        self.checked_at, self.dead = 0.0, False
        if not driver:
            return
        import socket

        import psutil

        try:
            if driver.get("host") == socket.gethostname():
                proc = psutil.Process(int(driver["pid"]))
                if abs(proc.create_time() - float(driver["started_at"])) < 1.0:
                    self.process = proc
        except (psutil.Error, KeyError, TypeError, ValueError):
            pass

    def gone(self) -> bool:
        if self.process is None or self.dead:
            return self.dead
        now = time.monotonic()
        if now - self.checked_at < self.CHECK_EVERY_S:
            return False
        self.checked_at = now
        import psutil

        try:  # is_running() also tells a recycled pid from the driver (by start time)
            self.dead = not self.process.is_running() or self.process.status() == psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            self.dead = True
        except psutil.Error:  # cannot tell: keep going, as before the watch
            pass
        return self.dead


class GenerateStage:
    """Callable class for ``Dataset.map_batches``: samples in, rollouts out."""

    def __init__(self, model: dict[str, Any], sampling: dict[str, Any], requests_per_actor: int,
                 agent: dict[str, Any] | None = None, environment: dict[str, Any] | None = None,
                 verify_in_episode: bool = False, journal: JournalSpec | None = None,
                 rejection: dict[str, Any] | None = None, verifier: dict[str, Any] | None = None,
                 activity: str | None = None, driver: dict[str, Any] | None = None) -> None:
        self.model = model
        self.driver = DriverWatch(driver)  # no new model call once the run's driver is killed
        # What is in flight here, reported to the driver's stall warning (sft_ray/activity.py).
        self.tracker = Tracker(activity, "generation actor")
        say_through(self.tracker.say)  # first-use lines (the embedded model's build) go out through the driver
        self.guard = SampleGuard(activity)  # a sample that keeps killing its actor ends as a failure record
        # Each answer is made durable the moment it returns (sft_ray/runfolder/journal.py): a killed run resumes from it.
        self.journal = journal.open() if journal is not None else None
        self.sampling = sampling
        self.requests_per_actor = requests_per_actor
        self.agent = agent or {"max_steps": 8, "timeout_s": 600.0}
        self.verify_in_episode = verify_in_episode
        group = acquire_replica_group(model)  # a tensor-parallel vLLM replica's GPUs (sft_ray/placement.py)
        if group is not None:
            model = {**model, "placement_group": group}
        self.backend = get_backend(model["backend"])(model, requests_per_actor)
        self.environment = build_environment(environment or {"type": "none"})
        if self.environment is not None:
            self.environment.model_name = getattr(self.backend, "model_name", model.get("name"))
        # What rollouts record as `model`: a backend may resolve the configured name.
        self.model_name = getattr(self.backend, "model_name", model.get("name"))
        self._ready: asyncio.Future | None = None
        self._sem: asyncio.Semaphore | None = None
        self._ready_at: float | None = None
        self._engine_load_s = 0.0
        self._telemetry: dict[tuple[str, int], str] = {}  # each sample's, until its batch returns
        self.node_id = _node_id()
        # Rejection sampling: the samples of a prompt are scored here, as they come back.
        self.rejection = rejection
        self.scorer = Scorer(verifier) if rejection is not None else None

    async def _start(self) -> None:
        what = (f"loading the vLLM engine ({self.model.get('name') or 'the embedded default model'})"
                if self.model.get("backend") == "vllm" else "starting the model client")
        t0 = time.perf_counter()
        with self.tracker.in_phase(what):
            await self.backend.start()
        self._engine_load_s = time.perf_counter() - t0  # sent once, with this actor's first rows
        if self.environment is not None:
            await self.environment.start()

    async def _ensure_started(self) -> None:
        # asyncio objects must be made inside the loop that Ray Data runs us in.
        if self._ready is None:
            self.tracker.start()
            self._sem = asyncio.Semaphore(self.requests_per_actor)
            self._ready = asyncio.ensure_future(self._start())
        await self._ready
        if self._ready_at is None:
            self._ready_at = time.time()  # when the backend (an engine, for vllm) could serve

    def __del__(self) -> None:
        # Ray Data has no teardown hook for map_batches classes; release sockets here.
        try:
            self.tracker.close()
        except Exception:
            pass
        for part in (self.backend, self.environment):
            try:
                if part is not None:
                    part.close_now()
            except Exception:
                pass
        release_own_placement_group()  # a tensor-parallel replica's GPUs go with it

    async def _call_model(self, request: GenerationRequest) -> GenerationResult:
        """One model call, holding a concurrency permit only while it is in flight."""
        assert self._sem is not None
        tel = metrics.current()
        t0 = time.perf_counter()
        async with self._sem:
            t1 = time.perf_counter()
            if self.driver.gone():  # nobody would write the answer: do not ask (see DriverWatch)
                return error_result(errors.INTERNAL_ERROR, "not sent: the driver of this run is gone")
            seen = tel.attempts if tel is not None else 0
            try:
                with self.tracker.track("model"):
                    result = await self.backend.generate(request)
            except Exception as e:  # a backend bug must not lose the batch: record it on the row
                result = error_result(errors.INTERNAL_ERROR, f"{type(e).__name__}: {e}")
            if tel is not None:
                t2 = time.perf_counter()
                tel.permit_wait_s += t1 - t0
                tel.model_s += t2 - t1
                if tel.attempts == seen and not (result.error or {}).get("type") == errors.BUDGET_EXHAUSTED:
                    # A backend that reports no attempts of its own (vLLM: one engine call) counts as one.
                    tel.attempt((result.error or {}).get("type"), t2 - t1, result.usage)
            return result

    def _failed(self, row: dict[str, Any], rid: str, k: int, kind: str, message: str) -> tuple[bytes, bool]:
        return orjson.dumps(build_rollout(row, rid, k, [], {}, self.model_name, error_result(kind, message),
                                          self.node_id)), True

    async def _one(self, rid: str, k: int, text: str, source: str, bad: str | None,
                   prior: int = 0) -> tuple[bytes, bool] | None:
        """One sample; ``prior``: how many times it was in flight when an actor died (SampleGuard)."""
        if bad is not None:
            return self._failed({"line": text}, rid, k, errors.BAD_INPUT, bad)
        row = orjson.loads(text)
        if prior >= CRASH_LIMIT:
            return self._failed(row, rid, k, errors.INTERNAL_ERROR, _CRASHED)
        try:
            if prior:
                rollout = await self.guard.suspect((rid, k), lambda: self._rollout(row, rid, k, source))
            else:
                rollout = await self._rollout(row, rid, k, source)
            if rollout is CRASHED:
                return self._failed(row, rid, k, errors.INTERNAL_ERROR, _CRASHED)
        except BaseException as e:
            # Whatever escapes a sample (a bug, an exception type nobody expected) is that sample's failure
            # record, counted toward max_sample_attempts like any other, never the batch's crash: a crashed
            # batch is retried and crashes again, and a rerun would replay the same crash.
            if cancelled_from_outside():
                raise
            log.warning("sample %s#%d failed: %s: %s", rid, k, type(e).__name__, e)
            return self._failed(row, rid, k, errors.INTERNAL_ERROR, f"{type(e).__name__}: {e}")
        if rollout is None:
            return None
        return orjson.dumps(rollout), rollout["error"] is not None

    async def _prompt(self, rid: str, text: str, source: str, bad: str | None,
                      draw: str, prior: int = 0) -> list[tuple[int, bytes, bool]]:
        """Rejection sampling: every sample drawn for one prompt, scored; ``prior`` as in :meth:`_one`,
        for the prompt as a whole."""
        assert self.rejection is not None and self.scorer is not None
        if bad is not None:
            return [(0, *self._failed({"line": text}, rid, 0, errors.BAD_INPUT, bad))]
        row = orjson.loads(text)
        if prior >= CRASH_LIMIT:
            return [(0, *self._failed(row, rid, 0, errors.INTERNAL_ERROR, _CRASHED))]

        async def sample(k: int) -> dict[str, Any] | None:
            try:
                rollout = await self._rollout(row, rid, k, source)
            except BaseException as e:  # that sample's failure record, as in _one
                if cancelled_from_outside():
                    raise
                log.warning("sample %s#%d failed: %s: %s", rid, k, type(e).__name__, e)
                return build_rollout(row, rid, k, [], {}, self.model_name,
                                     error_result(errors.INTERNAL_ERROR, f"{type(e).__name__}: {e}"), self.node_id)
            if rollout is not None and rollout["error"] is None:
                await self.scorer.score([rollout])
            return rollout

        def draw_all():
            return draw_prompt(sample, PromptDraws.from_json(draw), self.rejection["target_passing"],
                               self.rejection["max_samples"], self.rejection["min_reward"])

        drawn = await (self.guard.suspect((rid, None), draw_all) if prior else draw_all())
        if drawn is CRASHED:
            return [(0, *self._failed(row, rid, 0, errors.INTERNAL_ERROR, _CRASHED))]
        return [(k, orjson.dumps(r), r["error"] is not None or r["reward"] is None) for k, r in drawn]

    async def _rollout(self, row: dict[str, Any], rid: str, k: int, source: str) -> dict[str, Any] | None:
        """One sample's rollout (journaled when it succeeded), or None when the spending budget
        refused to start it."""
        try:
            sample = prepare(row, rid, k, source, self.sampling, self.model.get("omit_params"))
        except InputError as e:  # cannot happen for rows that passed the read stage
            return build_rollout(row, rid, k, [], {}, self.model_name, error_result(errors.BAD_INPUT, str(e)),
                                 self.node_id)
        t0 = time.perf_counter()
        with metrics.sample_telemetry() as tel:  # what the sample's calls cost, sent with its row
            if not sample.tools.get("tools") and self.environment is None:
                result = await self._call_model(sample.request(rid, k))
                rollout = build_rollout(row, rid, k, sample.prompt, sample.params, self.model_name, result,
                                        self.node_id)
            else:
                rollout = await self._episode(row, rid, k, sample.prompt, sample.tools, sample.params, source)
        if (rollout["error"] or {}).get("type") == errors.BUDGET_EXHAUSTED:
            return None  # never started: not written, so it stays pending for a rerun with a raised budget
        self._telemetry[(rid, k)] = tel.as_json()
        if self.rejection is None:
            self.tracker.finished(1)  # progress moves per sample (prompts with rejection sampling: __call__)
        rollout["latency_s"] = round(time.perf_counter() - t0, 4)
        stamp_source(rollout, source)
        if self.journal is not None and rollout["error"] is None:
            self.journal.append(orjson.dumps(rollout))
        return rollout

    async def _episode(self, row: dict[str, Any], rid: str, k: int, prompt: list[dict[str, Any]],
                       tools: dict[str, Any], params: dict[str, Any], source: str = "<row>") -> dict[str, Any]:
        return await run_agent_sample(self._call_model, self.environment, self.agent["max_steps"],
                                      self.agent["timeout_s"], self.verify_in_episode, self.model_name, self.node_id,
                                      row, rid, k, prompt, tools, params, source,
                                      lambda episode: TrackedEpisode(episode, self.tracker))

    async def __call__(self, batch: dict[str, Any]) -> dict[str, list[Any]]:
        await self._ensure_started()
        ids, idx = list(batch["id"]), [int(i) for i in batch["sample_index"]]
        # Marked begun on the run's board for as long as the batch runs: a sample that keeps killing
        # its actor becomes a failure record instead of a crash loop (SampleGuard, sft_ray/activity.py).
        # A sample's key; with rejection sampling the prompt's, whose draws run together: (id, None).
        keys = [(rid, None) for rid in ids] if self.rejection is not None else list(zip(ids, idx))
        priors = await self.guard.begin(keys)
        try:
            if self.rejection is not None:
                prompts = await asyncio.gather(*(
                    self._prompt(rid, text, source, bad, draw, prior)
                    for rid, text, source, bad, draw, prior in zip(ids, batch["row"], batch["source"], batch["bad"],
                                                                   batch["draw"], priors)
                ))
                ids = [rid for rid, samples in zip(ids, prompts) for _ in samples]
                idx = [k for samples in prompts for k, _, _ in samples]
                outs = [(line, failed) for samples in prompts for _, line, failed in samples]
            else:
                outs = await asyncio.gather(*(
                    self._one(rid, k, text, source, bad, prior)
                    for rid, k, text, source, bad, prior in zip(ids, idx, batch["row"], batch["source"], batch["bad"],
                                                                priors)
                ))
        finally:
            await self.guard.end([key for key, prior in zip(keys, priors) if prior == 0])
        if self.rejection is not None:
            self.tracker.finished(len(keys))  # progress counts prompts
        if any(o is None for o in outs):  # samples the budget refused
            keep = [i for i, o in enumerate(outs) if o is not None]
            ids, idx, outs = [ids[i] for i in keep], [idx[i] for i in keep], [outs[i] for i in keep]
        telemetry = [self._telemetry.pop((rid, k), None) for rid, k in zip(ids, idx)]
        if self._engine_load_s and telemetry:
            telemetry[0] = metrics.merge(telemetry[0], engine_load_s=self._engine_load_s)
            self._engine_load_s = 0.0
        if getattr(self.backend, "dead", False):
            # The engine died (e.g. a crashed vLLM engine core). Nothing of this batch has
            # been handed back yet, so exiting the process loses no written row: Ray restarts
            # the actor with a fresh engine and retries its batches.
            log.error("generation engine died; restarting this actor so its rows are retried")
            os._exit(1)
        return {
            "id": ids,
            "sample_index": idx,
            "rollout": [o[0].decode() for o in outs],
            "failed": [o[1] for o in outs],
            "ready_at": [self._ready_at] * len(ids),
            "telemetry": telemetry,
        }


def wiring(cfg: Any, plan: dict[str, Any], limits: dict[str, Any] | None = None,
           activity: str | None = None) -> dict[str, Any]:
    """``map_batches`` arguments: an autoscaling actor pool, several batches in flight per actor.
    ``limits``: the run's shared rate limits, auto concurrency and budget
    (:meth:`sft_ray.ratelimit.RunLimits.actor_spec`; None: no limiter); ``activity``: the name of
    the run's activity board (:class:`sft_ray.activity.BoardHandle`; None: no reports)."""
    import ray.data

    from sft_ray.backends.base import Secret

    model = model_wiring(cfg.model)
    model["limits"] = limits
    num_gpus = cfg.resources.generate_num_gpus or None
    if cfg.model.backend == "vllm":  # tensor-parallel: a placement group per actor (sft_ray/placement.py)
        model, num_gpus = replica_args(model, num_gpus)
    environment = cfg.environment.model_dump()
    module = environment.get("module") or ""
    if module.endswith(".py") and os.path.isfile(module):
        environment["module"] = os.path.abspath(module)  # actors may not share the driver's cwd
    if cfg.environment.type == "mcp":
        # Read on the driver, like the model's key; never in run.json or a repr.
        environment["secret_env"] = Secret(cfg.environment.secret_env())
        environment["secret_headers"] = Secret(cfg.environment.secret_headers())
        # A stdio server's relative paths mean the driver's working directory, wherever the actor runs.
        environment["cwd"] = os.path.abspath(environment.get("cwd") or os.getcwd())
    return dict(
        fn_constructor_kwargs={"model": model, "sampling": cfg.responses_create_params.model_dump(),
                               "requests_per_actor": plan["per_actor"], "agent": cfg.agent.model_dump(),
                               "environment": environment,
                               "verify_in_episode": cfg.verifier.type == "nemo_gym",
                               "activity": activity,
                               "journal": JournalSpec(cfg.output), "driver": driver_identity(),
                               **rejection_kwargs(cfg)},
        batch_size=plan["batch_size"],
        compute=ray.data.ActorPoolStrategy(min_size=plan["min_actors"], max_size=plan["max_actors"],
                                           max_tasks_in_flight_per_actor=4, max_concurrent_calls_per_actor=4),
        num_cpus=cfg.resources.generate_num_cpus,
        num_gpus=num_gpus,
        resources=cfg.resources.generate_resources or None,  # e.g. cluster.yaml's CPU worker type
    )


def rejection_kwargs(cfg: Any) -> dict[str, Any]:
    """With rejection sampling: its settings and the verifier that scores samples in the actor."""
    if not cfg.rejection.active:
        return {}
    return {"rejection": {**cfg.rejection.model_dump(), "min_reward": cfg.filter.min_reward},
            "verifier": verifier_payload(cfg.verifier)}


STAGE = Stage("generate", GenerateStage, reads=("id", "sample_index", "row", "source", "bad", "draw"),
              writes=("id", "sample_index", "rollout", "failed", "ready_at", "telemetry"), wiring=wiring)
