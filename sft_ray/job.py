"""`sft-ray run`: the two-phase job, read top to bottom.

:func:`run` is the whole job: check the user's code and the input, lock and prepare the run
folder, then phase 1 (:func:`generate_phase`: recover the journal, plan the session, stream
samples through the stages and write what comes back, close the session) and phase 2
(:func:`finalize_run`: curate, shuffle, write the shards and the report). Phase 1 streams
samples through Ray Data (read -> generate actors -> score actors) and the driver appends
each scored batch to ``rollouts/`` (or ``failed/``) as it arrives; phase 2 reads only
those durable files. A rerun of the same command resumes: samples already in
``rollouts/`` are not generated again.

The parts live where their concept does: the run folder in :mod:`sft_ray.runfolder`, the
stages in :mod:`sft_ray.stages`, the driver's loop parts in :mod:`sft_ray.driver`, phase 2
in :mod:`sft_ray.finalize`.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

import orjson
import pyarrow.compute as pc

from sft_ray import activity, io, metrics, ratelimit, tabular
from sft_ray.config import RunConfig
from sft_ray.cost import spend_summary
from sft_ray.decontaminate import BenchmarkError, Index, build_index, held_back_record
from sft_ray.driver import (
    Progress,
    RayStartError,
    Recorder,
    Session,
    Timing,
    init_ray,
    model_label,
    plan_concurrency,
    recover_journal,
    remote_scorer,
    starts_local_node,
    throughput,
    timing_breakdown,
    warn_gpu_setup,
)
from sft_ray.finalize.passes import finalize
from sft_ray.finalize.stats import format_report
from sft_ray.live import LiveView, write_final
from sft_ray.placement import release_placement_groups
from sft_ray.ratelimit import RunLimits
from sft_ray.rows import InputError
from sft_ray.runfolder.completion import (
    EXIT_BUDGET,
    EXIT_INPUT,
    EXIT_OK,
    EXIT_PENDING,
    EXIT_SPENT,
    EXIT_USAGE,
    Completion,
    DrawPlan,
    FailureBudget,
    PromptDraws,
    prompt_draws,
    unexpected_keys,
)
from sft_ray.runfolder.journal import clear_journal
from sft_ray.runfolder.layout import (
    BATCHES,
    CONTAMINATED,
    ROLLOUTS,
    STATS,
    SUCCESS,
    TRAIN,
    key_from_json,
    recorded_sessions,
)
from sft_ray.runfolder.lock import LockError, RunLock
from sft_ray.runfolder.manifest import DriftError, Manifest, StopReason, prepare_run_dir, save_manifest
from sft_ray.runfolder.parts import Writers
from sft_ray.runfolder.state import FolderState, compact_failures
from sft_ray.scoring import verifier_payload
from sft_ray.stages.read import InputPlan
from sft_ray.stages.read import scan_input as scan_files
from sft_ray.stall import StallWatch, describe_stall
from sft_ray.validate import plugin_problems

if TYPE_CHECKING:
    from sft_ray.batch.record import BatchWatch

__all__ = ["EXIT_BUDGET", "EXIT_INPUT", "EXIT_OK", "EXIT_PENDING", "EXIT_SPENT", "EXIT_USAGE", "RunError", "run"]


def run(cfg: RunConfig, restart: bool = False, say: Callable[[str], None] = print, no_wait: bool = False) -> int:
    """The whole job; returns the process exit code. ``no_wait`` (Batch API runs): submit the batches
    and finish without waiting for them (a rerun collects them)."""
    check_plugins(cfg)
    inputs = scan_input(cfg)
    with lock_folder(cfg.output):
        manifest = prepare_folder(cfg, restart, inputs)
        record_contaminated(cfg, manifest, inputs, say)
        state = FolderState(cfg.output, cfg.max_sample_attempts,
                            cfg.filter.min_reward if cfg.rejection.active else None, recorded_sessions(manifest))
        try:
            session = generate_phase(cfg, manifest, inputs, state, say, no_wait)
        except RayStartError as err:  # the folder is as it was: a rerun goes on
            raise RunError(str(err)) from None
        done, budget = record_completion(cfg, manifest, inputs, state)
        unexpected = record_unexpected(cfg, manifest, inputs, state)
        stats = finalize_run(cfg.output, cfg.filter.model_dump(), cfg.shuffle.seed, cfg.train.model_dump(),
                             manifest, say, preference=cfg.preference.model_dump(), unexpected=unexpected,
                             index=inputs.index)
        write_final(cfg.output, stats, f"sft-ray run {cfg.output}")  # progress.json and report.html
    code = verdict(cfg, session, done, budget, stats, say)
    if session.metrics_linger is not None:  # a local run's final values, exported and scraped before Ray goes
        metrics.linger(say=say, **session.metrics_linger)
    return code


# -- before anything runs ------------------------------------------------------------------


class RunError(Exception):
    """A problem that stops the run, with the exit code to use."""

    def __init__(self, message: str, code: int = EXIT_USAGE) -> None:
        super().__init__(message)
        self.code = code


def check_plugins(cfg: RunConfig) -> None:
    """Build the user's code (tool module, verifier) once on the driver, before any actor:
    a module that does not import is one clear error here, not an actor that fails to start."""
    problems = plugin_problems(cfg)
    if problems:
        raise RunError(problems[0])


def scan_input(cfg: RunConfig) -> InputPlan:
    """The input files, the rows a run uses (read.limit: the first N rows of the whole
    input), their sample ids, content digests and skipped bad lines; a bad line without
    read.skip_bad_lines stops here, before anything starts."""
    try:
        files = tabular.list_files(cfg.input)
    except (FileNotFoundError, InputError) as e:  # InputError: a save_to_disk folder's state.json
        raise RunError(str(e), EXIT_INPUT) from None
    index = benchmark_index(cfg.decontaminate)
    try:
        plan = scan_files(files, cfg.read.limit, cfg.read.skip_bad_lines, cfg.read.rename or None, index)
    except InputError as err:
        if not err.source.rpartition(":")[2].isdigit():  # the file as a whole (not Parquet, a column of no JSON value)
            raise RunError(f"bad input file: {err}", EXIT_INPUT) from None
        raise RunError(tabular.bad_input(err) + "\n(use read.skip_bad_lines=true to skip and count such lines)",
                       EXIT_INPUT) from None
    unseen = [c for c in cfg.read.rename if c not in plan.renamed_columns]
    if unseen and plan.ids:
        raise RunError(f"read.rename: no input row has {', '.join(unseen)} (a typo? the columns are the input's "
                       "top-level fields)", EXIT_INPUT)
    if not plan.ids and not cfg.read.allow_empty and not plan.contaminated:
        named = ", ".join(files[:5]) + (f" and {len(files) - 5} more" if len(files) > 5 else "")
        why = f"all {len(plan.bad_lines)} non-blank line(s) are bad" if plan.bad_lines else "empty or blank lines only"
        raise RunError(f"input has no rows ({why}): {named}\n(set read.allow_empty=true to finish a run with "
                       "no rows anyway)", EXIT_INPUT)
    return plan


def benchmark_index(decontaminate: Any) -> Index | None:
    """The benchmarks of ``decontaminate`` (the config section, or its dict) read and indexed once,
    on the driver; None when it names none. A source that cannot be used stops here (exit 2)."""
    from sft_ray.config import DecontaminateConfig

    d = decontaminate if isinstance(decontaminate, DecontaminateConfig) else \
        DecontaminateConfig.model_validate(decontaminate or {})
    if not d.active:
        return None
    try:
        return build_index(d.against, d.ngram, d.min_matches, d.min_words)
    except BenchmarkError as e:
        raise RunError(f"decontaminate.against: {e}", EXIT_INPUT) from None
    except OSError as e:
        raise RunError(f"decontaminate.against: cannot read a benchmark: {e}", EXIT_INPUT) from None


def record_contaminated(cfg: RunConfig, manifest: dict[str, Any], inputs: InputPlan, say: Callable[[str], None]) -> None:
    """contaminated.jsonl (the prompts held back, rewritten from the scan on every run) and the
    index's summary in the manifest; says what was found."""
    uri = io.join(cfg.output, CONTAMINATED)
    if inputs.index is None:
        manifest.pop("decontamination", None)
        io.delete(uri)
        return
    io.write_bytes(uri, b"".join(orjson.dumps(c) + b"\n" for c in inputs.contaminated))
    manifest["decontamination"] = held_back_record(inputs.index, inputs.contaminated)
    index = inputs.index
    say(f"decontamination: {len(index.benchmarks)} benchmark(s), {sum(b.items for b in index.benchmarks)} items, "
        f"{len(index.hashes) + sum(len(h) for h, _ in index.phrases.values())} n-grams ({index.nbytes / 1e6:.1f} MB "
        f"shipped to workers); {len(inputs.contaminated)} prompt(s) held back, never sent ({CONTAMINATED})")


def output_folder_error(run_dir: str, err: OSError) -> str:
    """One line on why ``run_dir`` cannot be a run folder (a parent that is a file, a read-only
    or virtual filesystem such as /proc), naming the path and the reason."""
    reason = err.strerror or str(err)
    if "://" not in run_dir:
        parent = os.path.abspath(run_dir)
        while parent != os.path.dirname(parent) and not os.path.lexists(parent):
            parent = os.path.dirname(parent)
        if os.path.lexists(parent) and not os.path.isdir(parent):
            reason = f"{parent} is a file, not a folder"
        elif parent != os.path.abspath(run_dir):
            reason = f"no folder can be made in {parent}: {reason}"
    return f"output {run_dir}: cannot be a run folder ({reason})"


def lock_folder(run_dir: str, command: str = "run") -> RunLock:
    """The run folder's lock (one process runs in a folder at a time), held for the ``with`` block;
    ``command`` names the sft-ray command holding it to those it refuses."""
    try:
        return RunLock(run_dir, command).acquire()
    except LockError as e:
        raise RunError(str(e)) from None
    except OSError as e:  # the lock is the first thing written: a path that cannot be a folder shows here
        raise RunError(output_folder_error(run_dir, e)) from None


def prepare_folder(cfg: RunConfig, restart: bool, inputs: InputPlan) -> Manifest:
    """Create or reopen the run folder (emptied first with ``restart``); its manifest."""
    try:
        return prepare_run_dir(cfg, restart, inputs.digests,
                               inputs.index.digests if inputs.index is not None else None)
    except DriftError as e:
        raise RunError(str(e)) from None


def completion(cfg: RunConfig, inputs: InputPlan, state: FolderState,
               draws: dict[str, PromptDraws] | None = None) -> Completion:
    """Every expected sample (or, with rejection sampling, every prompt) counted by its state;
    ``draws``: :func:`prompt_draws` of ``state``, when the caller has it already."""
    rejection = (cfg.rejection.target_passing, cfg.rejection.max_samples) if cfg.rejection.active else None
    return Completion.of(inputs.ids, state, cfg.num_repeats, rejection, len(inputs.bad_lines), draws)


# -- phase 1: generate ---------------------------------------------------------------------


def generate_phase(cfg: RunConfig, manifest: Manifest, inputs: InputPlan, state: FolderState,
                   say: Callable[[str], None], no_wait: bool = False) -> Session:
    """Phase 1: send every sample without a result (and failures with attempts left), write
    what comes back; ``state`` follows. Online through the stages, or through the provider's
    Batch API with ``model.batch.enabled`` (:mod:`sft_ray.batch`). Returns this session (its
    record is also in the manifest)."""
    session = Session(manifest, 0)
    # Recorded before it writes a part file: files of no recorded session are not the run's.
    save_manifest(cfg.output, manifest)
    writers = Writers(cfg.output, session.number, state, skip_bad_input=cfg.read.skip_bad_lines)
    # What a killed run had generated but not written: scored from the journal, not sent again.
    recovered = recover_journal(cfg.output, verifier_payload(cfg.verifier), inputs.ids, state, writers,
                                remote_scorer(cfg))
    work = plan_session(cfg, inputs, state, recovered, say)
    session.record.update(planned=work.todo, recovered_from_journal=recovered)
    save_manifest(cfg.output, manifest)
    if work.todo == 0:
        writers.close()
        clear_journal(cfg.output)
        return session
    if cfg.model.batch.enabled:
        send_batches(cfg, manifest, inputs, state, session, writers, work, say, no_wait)
    else:
        stream_and_write(cfg, manifest, inputs, state, session, writers, work, say)
    clear_journal(cfg.output)  # all it held is written now
    compact_failures(cfg.output, session.number, state.done, recorded_sessions(manifest))
    return session


@dataclass
class SessionPlan:
    """What a session sends: ``todo`` samples (prompts with rejection sampling), the folder's
    completion when it starts, the prompts' draws (rejection sampling) and the concurrency plan."""

    todo: int
    start: Completion
    draws: DrawPlan | None
    concurrency: dict[str, int]


def plan_session(cfg: RunConfig, inputs: InputPlan, state: FolderState, recovered: int,
                 say: Callable[[str], None]) -> SessionPlan:
    """Count what the folder holds, decide what to send, and say so."""
    per_prompt = prompt_draws(inputs.ids, state) if cfg.rejection.active else None
    start = completion(cfg, inputs, state, per_prompt)
    todo = start.todo
    draws = None
    retried = start.failed - start.failed_final
    if per_prompt is not None:
        rej = cfg.rejection
        draws = DrawPlan.make(per_prompt, rej.target_passing, rej.max_samples)
        todo = draws.open_prompts(inputs.ids)  # progress counts prompts: how many samples each takes is open
        say(f"found {inputs.rows} rows in {len(inputs.used())} file(s); rejection sampling: up to "
            f"{rej.max_samples} samples per prompt until {rej.target_passing} pass (reward >= "
            f"{cfg.filter.min_reward:g}); {start.done} samples already done, {todo} prompt(s) to sample"
            + (f" ({retried} failed sample(s) retried first)" if retried else ""))
    plan = plan_concurrency(cfg, todo)
    if draws is None:
        say(f"found {inputs.rows} rows in {len(inputs.used())} file(s) -> {start.expected} samples "
            f"({cfg.num_repeats} per row); {start.done} already done, {todo} to generate"
            + (f" ({retried} failed before and retried now, {start.failed_final} failed for good)"
               if start.failed else "")
        + (f"; {recovered} recovered from the journal of a run that was killed" if recovered else "")
        + (f"; {len(inputs.bad_lines)} bad line(s) skipped" if inputs.bad_lines else ""))
    if cfg.model.batch.enabled:
        b = cfg.model.batch
        say(f"model: {cfg.model.backend} {model_label(cfg)} through the Batch API: up to {b.max_in_flight} batch(es) "
            f"of at most {b.max_requests} requests / {b.max_bytes / 1e6:g} MB at once, completion window "
            f"{b.completion_window}")
        return SessionPlan(todo, start, draws, plan)
    say(f"model: {cfg.model.backend} {model_label(cfg)}; concurrency: {'auto, up to ' if cfg.adaptive else ''}"
        f"{plan['per_actor'] * plan['max_actors']} requests in flight "
        f"({plan['min_actors']}-{plan['max_actors']} actors x {plan['per_actor']}), batch {plan['batch_size']}")
    return SessionPlan(todo, start, draws, plan)


def build_dataset(cfg: RunConfig, files: list, done: set[tuple[str, int]], plan: dict[str, int],
                  draws: DrawPlan | None, limits: RunLimits, activity_board: str | None = None):
    """read -> generate -> score, each stage given what it needs (lazy; the driver pulls)."""
    from sft_ray.stages import check_chain, generate, read, score

    check_chain([read.STAGE, generate.STAGE, score.STAGE])
    ds = read.STAGE.apply(None, cfg, plan, files=files, done=done, draws=draws)
    ds = generate.STAGE.apply(ds, cfg, plan, limits=limits.actor_spec(), activity=activity_board)
    return score.STAGE.apply(ds, cfg, plan, activity=activity_board)


def stream_and_write(cfg: RunConfig, manifest: Manifest, inputs: InputPlan, state: FolderState,
                     session: Session, writers: Writers, work: SessionPlan, say: Callable[[str], None]) -> None:
    """Start Ray and the run's limits, pull scored batches through the stages and write each as it
    arrives, until done or the failure budget stops the session; then close the session (what an
    early stop left in the journal is written, the writers, placement groups and limits closed)."""
    try:
        init_ray(cfg)
    except RayStartError:
        writers.close()
        raise
    limits = ratelimit.start_session(cfg, manifest)
    board = activity.start_board()  # what the actors have in flight, for the stall warning
    warn_gpu_setup(cfg, say)
    recorder = Recorder(cfg, writers, session, work.start.done, work.start.failed_final)
    draws, todo = work.draws, work.todo
    unit = "prompts" if draws is not None else "samples"
    progress = Progress(todo, unit=unit, limits=limits)
    timing = Timing(todo)
    watch = StallWatch(cfg.resources.stall_warning_s, say, lambda: describe_stall(board))
    pricing = cfg.pricing.model_dump()
    run_metrics = metrics.RunMetrics(metrics.run_tag(cfg.output), pricing,
                                     cfg.filter.min_reward if "min_reward" in cfg.filter.model_fields_set else None,
                                     enabled=cfg.metrics.enabled)
    live = LiveView(cfg.output, f"sft-ray run {cfg.output}", work.start.expected, work.start.done,
                    work.start.failed, todo, unit, cfg.report.interval_s, run_metrics, board, progress, watch.touch,
                    say)
    finished = False
    try:
        ds = build_dataset(cfg, inputs.used(), state.skip(), work.concurrency, draws, limits, board.name)
        units = 0  # what progress counts: samples, or prompts with rejection sampling
        for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=2):
            watch.touch()
            n = write_batch(batch, recorder, live, run_metrics, per_prompt=draws is not None)[2]
            timing.batch(n, units, pc.min(batch.column("ready_at")).as_py())
            units += n
            progress.update(n, units, session.record["failed"], session.mean_reward)
            if recorder.over_failure_budget():
                break
        finished = True
    except InputError as err:
        session.record.stop(StopReason.INPUT_ERROR, err)
        raise RunError(tabular.bad_input(err) + "\n"
                       f"(use read.skip_bad_lines=true to skip and count such lines; "
                       f"the {session.record['written']} rollouts written so far are kept)", EXIT_INPUT) from None
    finally:
        live.close()
        watch.close()
        progress.close()
        if finished:  # answers in flight at an early stop are in the journal: keep them
            late = recover_journal(cfg.output, verifier_payload(cfg.verifier), inputs.ids, state, writers,
                                   remote_scorer(cfg))
            run_metrics.written(late, 0, [], [], 0.0)
        writers.close()
        release_placement_groups()  # tensor-parallel groups of actors that never ran their teardown
        limits.end(session.record)  # this run's spend; "budget" when the budget stopped it
        board.end()
        close_session(cfg, manifest, session, timing, run_metrics)


def write_batch(batch: Any, recorder: Recorder, live: LiveView, run_metrics: metrics.RunMetrics,
                per_prompt: bool) -> tuple[int, int, int]:
    """Write one scored batch and count it for the live view and the metrics: ``(rows written,
    failures written, units)``, units being prompts with rejection sampling (``per_prompt``), else samples."""
    keys = list(zip(batch.column("id").to_pylist(), batch.column("sample_index").to_pylist()))
    rewards = batch.column("reward").to_pylist()
    rollouts, flags = batch.column("rollout").to_pylist(), batch.column("failed").to_pylist()
    t_write = time.perf_counter()
    ok, bad = recorder.write(keys, rollouts, flags, rewards, sum(batch.column("output_tokens").to_pylist()))
    t_write = time.perf_counter() - t_write
    n = len({rid for rid, _ in keys}) if per_prompt else ok + bad
    classes = live.written(n, ok, bad, rollouts, flags, rewards)
    run_metrics.written(ok, bad, rewards, batch.column("telemetry").to_pylist(), t_write, classes)
    return ok, bad, n


def close_session(cfg: RunConfig, manifest: Manifest, session: Session, timing: Timing,
                  run_metrics: metrics.RunMetrics) -> None:
    """The session's timing and where its time went in run.json, saved; how long the metrics linger."""
    session.record.update(timing.record())
    session.record["breakdown"] = run_metrics.breakdown(session.record["generate_wall_s"])
    plan_linger(cfg, session, run_metrics)
    save_manifest(cfg.output, manifest)


def batch_exports_metrics(cfg: RunConfig) -> bool:
    """Whether a Batch API run brings Ray up for its metrics: on a cluster (a Ray address given:
    the cluster's Prometheus scrapes Ray's metrics there), or on this machine when asked to export
    them (``metrics.export_port``). Otherwise it needs no Ray (a vLLM judge starts it anyway) and
    its counters feed progress.json alone."""
    return cfg.metrics.enabled and (cfg.metrics.export_port is not None or not starts_local_node(cfg))


def batch_watch(cfg: RunConfig, work: SessionPlan, say: Callable[[str], None]) -> BatchWatch:
    """The batch loop's metrics and live view, as the online stream's (:func:`batch_exports_metrics`
    says when it starts or joins Ray for them)."""
    import sys

    from sft_ray.batch.record import BatchWatch
    from sft_ray.cost import batch_prices

    if batch_exports_metrics(cfg):
        init_ray(cfg)
    ray = sys.modules.get("ray")
    run_metrics = metrics.RunMetrics(metrics.run_tag(cfg.output), batch_prices(cfg.pricing.model_dump()),
                                     cfg.filter.min_reward if "min_reward" in cfg.filter.model_fields_set else None,
                                     enabled=cfg.metrics.enabled and ray is not None and ray.is_initialized())
    unit = "prompts" if work.draws is not None else "samples"
    live = LiveView(cfg.output, f"sft-ray run {cfg.output}", work.start.expected, work.start.done,
                    work.start.failed, work.todo, unit, cfg.report.interval_s, run_metrics, say=say)
    return BatchWatch(run_metrics, live, per_prompt=work.draws is not None)


def plan_linger(cfg: RunConfig, session: Session, run_metrics: metrics.RunMetrics) -> None:
    """With metrics.export_port: how run() keeps Ray up at the end (:func:`sft_ray.metrics.linger`)."""
    if cfg.metrics.export_port is not None and run_metrics.m:
        session.metrics_linger = {"seconds": cfg.metrics.linger_s, "run": run_metrics.run,
                                  "port": cfg.metrics.export_port if starts_local_node(cfg) else None,
                                  "rows": run_metrics.counts["rows_written"]}


def send_batches(cfg: RunConfig, manifest: Manifest, inputs: InputPlan, state: FolderState,
                 session: Session, writers: Writers, work: SessionPlan, say: Callable[[str], None],
                 no_wait: bool) -> None:
    """Phase 1 through the Batch API: every batch recorded in the run folder before the driver
    waits on it; the writers closed and the session saved however it ends."""
    from sft_ray.backends.batchapi import BatchAPIError
    from sft_ray.batch import batch_generate

    watch = None
    try:
        watch = batch_watch(cfg, work, say)
        batch_generate(cfg, manifest, inputs, state, session, writers, say, no_wait, watch)
    except InputError as err:
        session.record.stop(StopReason.INPUT_ERROR, err)
        raise RunError(tabular.bad_input(err) + "\n"
                       f"(use read.skip_bad_lines=true to skip and count such lines; "
                       f"the {session.record['written']} rollouts written so far are kept)", EXIT_INPUT) from None
    except BatchAPIError as err:
        raise RunError(f"the Batch API refused a call: {err}\n(what was collected is written and every batch "
                       f"submitted is recorded in {BATCHES}; rerun the same command to go on)") from None
    finally:
        if watch is not None:
            watch.live.close()
            plan_linger(cfg, session, watch.metrics)
        writers.close()
        save_manifest(cfg.output, manifest)


def record_completion(cfg: RunConfig, manifest: Manifest, inputs: InputPlan,
                      state: FolderState) -> tuple[Completion, FailureBudget]:
    """The folder's completion, counted sample by sample from what it holds now (not from this
    session's tallies), saved in the manifest."""
    done = completion(cfg, inputs, state)
    budget = FailureBudget(cfg.max_error_fraction, cfg.min_rows_for_budget)
    manifest.set_completion(done.as_stats(budget))
    if inputs.bad_lines:
        manifest.completion["bad_line_examples"] = inputs.bad_lines[:5]
    save_manifest(cfg.output, manifest)
    return done, budget


# At most this many unexpected keys are kept in run.json (for `sft-ray filter`, which does not
# read the input); a run with more refuses `sft-ray filter` (a rerun of `sft-ray run` re-checks them).
UNEXPECTED_KEYS_KEPT = 10_000


def record_unexpected(cfg: RunConfig, manifest: Manifest, inputs: InputPlan,
                      state: FolderState) -> frozenset[tuple[str, int]]:
    """The done samples that are none of the run's (:func:`unexpected_keys`), usually none; saved in
    the manifest (count and, up to :data:`UNEXPECTED_KEYS_KEPT`, the keys) for `sft-ray filter`."""
    per_prompt = cfg.rejection.max_samples if cfg.rejection.active else cfg.num_repeats
    found = frozenset(unexpected_keys(inputs.ids, state.done, per_prompt))
    manifest.set_unexpected(found, UNEXPECTED_KEYS_KEPT)
    save_manifest(cfg.output, manifest)
    return found


def recorded_unexpected(manifest: dict[str, Any] | None, write: bool) -> frozenset[tuple[str, int]] | None:
    """The unexpected keys the last `sft-ray run` recorded in ``manifest``; None when it recorded
    none (a folder made before they were). Refuses to write train/ from a record that was cut short."""
    record = (manifest or {}).get("unexpected_keys")
    if record is None:
        return None
    keys = frozenset(key_from_json(k) for k in record.get("keys") or [])
    if write and int(record.get("count") or 0) > len(keys):
        raise RunError(f"run.json records {record['count']} rollouts whose key is none of the run's expected "
                       f"samples but names only {len(keys)}: rerun `sft-ray run` with the run's config, which "
                       "checks every key against the input, instead of re-cutting with `sft-ray filter`")
    return keys


# -- phase 2: finalize ---------------------------------------------------------------------


def finalize_run(run_dir: str, filter_cfg: dict[str, Any], shuffle_seed: int, train_cfg: dict[str, Any],
                 manifest: dict[str, Any] | None, say: Callable[[str], None], write: bool = True,
                 preference: dict[str, Any] | None = None,
                 unexpected: frozenset[tuple[str, int]] | None = None, index: Index | None = None) -> dict[str, Any]:
    """Phase 2 plus the report; writes stats.json (and ``_SUCCESS`` when the run is complete) when
    ``write``. Both are removed first: a crash while train/ is replaced never leaves a stats.json
    or a marker that describe another train/. ``preference``: the pair rules (``train.format``
    with ``preference``). Rollouts in files of no session ``manifest`` records, and those whose key
    is in ``unexpected`` (default: the keys the manifest recorded), are counted and named, never
    trained on. ``index``: the benchmarks to check each row's prompt and reply against (drop reason
    ``contaminated``)."""
    t0 = time.monotonic()
    if unexpected is None:
        unexpected = recorded_unexpected(manifest, write)
    if write:
        io.delete(io.join(run_dir, SUCCESS))
        io.delete(io.join(run_dir, STATS))
    rejection = ((manifest or {}).get("config") or {}).get("rejection")
    stats = finalize(run_dir, filter_cfg, shuffle_seed, train_cfg, write=write, rejection=rejection,
                     preference=preference, sessions=recorded_sessions(manifest), unexpected=unexpected,
                     index=index, held=(manifest or {}).get("decontamination"))
    stats["finalize_wall_s"] = round(time.monotonic() - t0, 3)
    if manifest:
        stats["throughput"] = throughput(manifest)
        stats["timing"] = {"breakdown": timing_breakdown(manifest)}
        stats.update(manifest.get("completion") or {})
        stats["spend"] = spend_summary(stats, manifest)
    if write:
        io.write_bytes(io.join(run_dir, STATS), json.dumps(stats, indent=2).encode())
        if stats.get("complete"):
            io.write_bytes(io.join(run_dir, SUCCESS), b"")
    say(format_report(stats))
    say(json.dumps({k: round(v, 4) for k, v in stats["metrics"].items()}))
    return stats


def verdict(cfg: RunConfig, session: Session, done: Completion, budget: FailureBudget, stats: dict[str, Any],
            say: Callable[[str], None]) -> int:
    """Say where the run folder stands; the exit code."""
    say(f"run folder: {cfg.output}  ({ROLLOUTS}/, {TRAIN}/ {len(stats.get('shards', []))} shard(s), {STATS})")
    if session.record.stopped:
        say(f"stopped early: {session.record['stopped']}")
    if session.record.stop_reason is StopReason.SPENDING_BUDGET:
        say("stopped: budget; what was generated is finalized. Raise budget.* and rerun the same command "
            "to continue")
        return EXIT_SPENT
    code, reason = done.verdict(budget)
    if reason:
        say(reason)
    return code
