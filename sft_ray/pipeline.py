"""`sft-ray run`: the two-phase job.

Phase 1 streams samples through Ray Data (read -> generate actors -> score
actors) and the driver appends each scored batch to ``rollouts/`` (or
``failed/``) as it arrives. Phase 2 (``finalize``) filters, shuffles globally and
writes the training shards from those durable files. A rerun of the same
command resumes: samples already in ``rollouts/`` are not generated again.
"""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Any, Callable, Iterable

import pyarrow.compute as pc

from sft_ray import io, ratelimit
from sft_ray.config import RunConfig
from sft_ray.cost import spend_summary
from sft_ray.driver import (
    EXIT_BUDGET,
    EXIT_INPUT,
    EXIT_OK,
    EXIT_PENDING,
    EXIT_SPENT,
    EXIT_USAGE,
    Budget,
    Completion,
    FolderState,
    Progress,
    Session,
    Timing,
    Writers,
    recover_journal,
)
from sft_ray.journal import clear_journal
from sft_ray.placement import release_placement_groups
from sft_ray.rejection import DrawPlan, PromptDraws, count_completion, prompt_draws
from sft_ray.resume import SUCCESS, DriftError, compact_failures, prepare_run_dir, save_manifest
from sft_ray.rows import InputError
from sft_ray.stages.finalize import finalize
from sft_ray.stages.read import InputPlan
from sft_ray.stages.score import verifier_payload
from sft_ray.stall import StallWatch
from sft_ray.stats import format_report

__all__ = ["EXIT_BUDGET", "EXIT_INPUT", "EXIT_OK", "EXIT_PENDING", "EXIT_SPENT", "EXIT_USAGE", "RunError", "run"]
BLOCK_BYTES = 1 << 20


class RunError(Exception):
    """A problem that stops the run, with the exit code to use."""

    def __init__(self, message: str, code: int = EXIT_USAGE) -> None:
        super().__init__(message)
        self.code = code


def model_label(cfg: RunConfig) -> str:
    if cfg.model.backend == "vllm":
        from sft_ray.models import display_name, is_default

        return display_name(cfg.model.name) + (" (embedded default)" if is_default(cfg.model.name) else "")
    return cfg.model.name or ""


def actor_range(value: int | tuple[int, int]) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else (int(value[0]), int(value[1]))


def plan_concurrency(cfg: RunConfig, todo: int) -> dict[str, int]:
    """Actors, requests in flight per actor, batch size and rows per block.

    Each actor may hold ``num_samples_in_parallel // max_actors`` requests, so
    the total never exceeds ``num_samples_in_parallel`` even at the pool's largest.
    """
    lo, hi = actor_range(cfg.resources.generate_actors)
    hi = max(1, min(hi, cfg.max_in_flight))  # max_in_flight: num_samples_in_parallel, or auto's ceiling
    lo = max(1, min(lo, hi))
    per_actor = max(1, cfg.max_in_flight // hi)
    batch = cfg.resources.batch_size or max(8, min(1024, per_actor // 2))
    # A block is one actor task: at least 4 per actor, but a few batches each at most.
    block_rows = max(batch, min(8 * batch, todo // (4 * hi)))
    return {"min_actors": lo, "max_actors": hi, "per_actor": per_actor, "batch_size": batch,
            "block_rows": block_rows}


def init_ray(cfg: RunConfig) -> None:
    import ray

    address = cfg.resources.ray_address or os.environ.get("RAY_ADDRESS")
    # Ray 2.60 announces its (default, wanted) token authentication with a WARNING that
    # suggests turning it off; sft-ray keeps it on, so the line is only noise in our output.
    logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
    if not ray.is_initialized():
        ray.init(address=address, log_to_driver=True, configure_logging=True, logging_level="WARNING")
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # our own bar reports rows/s; two would garble the terminal
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)  # "Progress bars disabled"
    ctx.print_on_execution_start = False
    # Small blocks keep rows streaming: a block is the unit the driver receives and
    # writes, so with Ray Data's 128 MiB default a whole run could arrive at once.
    ctx.target_max_block_size = BLOCK_BYTES
    from sft_ray.raynoise import quiet_ray

    quiet_ray()  # Ray's false alarm and Ray Data's INFO lines, see sft_ray/raynoise.py


def warn_gpu_setup(cfg: RunConfig, say: Callable[[str], None]) -> None:
    """A vllm run on a cluster that has GPUs while its actors ask for none is almost
    certainly a forgotten `resources.generate_num_gpus` (the engine would see no GPU)."""
    import ray

    gpus = ray.cluster_resources().get("GPU", 0)
    if not gpus:
        return
    if cfg.model.backend == "vllm" and cfg.model.tensor_parallel_size == 1 and not cfg.resources.generate_num_gpus:
        say(f"warning: the cluster has {gpus:g} GPU(s) but generation actors ask for none; "
            "set resources.generate_num_gpus=1 to run each engine on a GPU")
    if any(j.model.tensor_parallel_size == 1 for j in cfg.verifier.vllm_judges()) and not cfg.resources.score_num_gpus:
        say(f"warning: the cluster has {gpus:g} GPU(s) but scoring actors ask for none; "
            "set resources.score_num_gpus=1 to run the judge's engine on a GPU")


def check_plugins(cfg: RunConfig) -> None:
    """Build the user's code (tool module, verifier) once on the driver, before any actor:
    a module that does not import is one clear error here, not an actor that fails to start."""
    from sft_ray.environments import build_environment
    from sft_ray.verifiers import build_verifier

    for what, build, section in (("environment", build_environment, cfg.environment.model_dump()),
                                 ("verifier", build_verifier, cfg.verifier.model_dump())):
        try:
            build(section)
        except Exception as e:
            raise RunError(f"{what}: {e}") from None


def remote_scorer(cfg: RunConfig) -> Callable[[list[dict[str, Any]]], Iterable[dict[str, Any]]] | None:
    """For a judge with its own vLLM engine: score the journal's rollouts in the score stage's
    actors (their GPUs or placement group; one engine each, gone with the actor) rather than
    on the driver, which may have no GPU. None otherwise (the driver scores them itself)."""
    if not cfg.verifier.vllm_judges():
        return None

    def score(batches: list[dict[str, Any]]) -> Iterable[dict[str, Any]]:
        import ray.data

        from sft_ray.stages import score as score_stage

        init_ray(cfg)
        rows = [dict(zip(b, values)) for b in batches for values in zip(*b.values())]
        ds = score_stage.STAGE.apply(ray.data.from_items(rows), cfg, {})
        try:
            for out in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
                yield {k: out.column(k).to_pylist() for k in ("id", "sample_index", "rollout", "failed", "reward")}
        finally:
            release_placement_groups()  # a tensor-parallel judge's groups

    return score


def stages() -> list:
    """The map_batches stages, in order (each module declares its own wiring)."""
    from sft_ray.stages import generate, score

    return [generate.STAGE, score.STAGE]


def build_dataset(cfg: RunConfig, files: list, done: set[tuple[str, int]], plan: dict[str, int],
                  draws: DrawPlan | None = None):
    """read (cut into blocks) -> each stage of :func:`stages` (lazy; the driver pulls)."""
    from sft_ray.stages import check_chain
    from sft_ray.stages.read import SCHEMA, make_dataset

    # One read task per file (ids are made per file), cut into blocks small enough to spread over every actor.
    ds = make_dataset(files, cfg.num_repeats, cfg.read.skip_bad_lines, done, plan["block_rows"], draws)
    chain = stages()
    check_chain(tuple(SCHEMA.names), chain)
    for stage in chain:
        ds = stage.apply(ds, cfg, plan)
    return ds


def scan_input(cfg: RunConfig) -> InputPlan:
    """The input files, the rows a run uses (read.limit: the first N rows of the whole
    input), their sample ids, content digests and skipped bad lines; a bad line without
    read.skip_bad_lines stops here, before anything starts."""
    from sft_ray.stages.read import scan_input as scan

    try:
        files = io.list_input_files(cfg.input)
    except FileNotFoundError as e:
        raise RunError(str(e), EXIT_INPUT) from None
    try:
        plan = scan(files, cfg.read.limit, cfg.read.skip_bad_lines)
    except InputError as err:
        raise RunError(f"bad input line: {err}\n(use read.skip_bad_lines=true to skip and count such lines)",
                       EXIT_INPUT) from None
    if not plan.ids and not cfg.read.allow_empty:
        named = ", ".join(files[:5]) + (f" and {len(files) - 5} more" if len(files) > 5 else "")
        why = f"all {len(plan.bad_lines)} non-blank line(s) are bad" if plan.bad_lines else "empty or blank lines only"
        raise RunError(f"input has no rows ({why}): {named}\n(set read.allow_empty=true to finish a run with "
                       "no rows anyway)", EXIT_INPUT)
    return plan


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


def completion(cfg: RunConfig, inputs: InputPlan, state: FolderState,
               draws: dict[str, PromptDraws] | None = None) -> Completion:
    """Every expected sample (or, with rejection sampling, every prompt) counted by its state;
    ``draws``: :func:`prompt_draws` of ``state``, when the caller has it already."""
    if cfg.rejection.active:
        rej = cfg.rejection
        return count_completion(inputs.ids, draws if draws is not None else prompt_draws(inputs.ids, state),
                                rej.target_passing, rej.max_samples, len(inputs.bad_lines))
    return Completion.count(inputs.ids, cfg.num_repeats, state, len(inputs.bad_lines))


def generate_phase(cfg: RunConfig, manifest: dict[str, Any], inputs: InputPlan, state: FolderState,
                   say: Callable[[str], None]) -> Session:
    """Phase 1: send every sample without a result (and failures with attempts left), write
    what comes back; ``state`` follows. Returns this session (its record is also in the manifest)."""
    session = Session(manifest, 0)
    writers = Writers(cfg.output, session.number, state)
    # What a killed run had generated but not written: scored from the journal, not sent again.
    recovered = recover_journal(cfg.output, verifier_payload(cfg.verifier), inputs.ids, state, writers,
                                remote_scorer(cfg))
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
    session.record.update(planned=todo, recovered_from_journal=recovered)
    plan = plan_concurrency(cfg, todo)
    if draws is None:
        say(f"found {inputs.rows} rows in {len(inputs.used())} file(s) -> {start.expected} samples "
            f"({cfg.num_repeats} per row); {start.done} already done, {todo} to generate"
            + (f" ({retried} failed before and retried now, {start.failed_final} failed for good)"
               if start.failed else "")
        + (f"; {recovered} recovered from the journal of a run that was killed" if recovered else "")
        + (f"; {len(inputs.bad_lines)} bad line(s) skipped" if inputs.bad_lines else ""))
    say(f"model: {cfg.model.backend} {model_label(cfg)}; concurrency: {'auto, up to ' if cfg.adaptive else ''}"
        f"{plan['per_actor'] * plan['max_actors']} requests in flight "
        f"({plan['min_actors']}-{plan['max_actors']} actors x {plan['per_actor']}), batch {plan['batch_size']}")
    save_manifest(cfg.output, manifest)
    if todo == 0:
        writers.close()
        clear_journal(cfg.output)
        return session

    init_ray(cfg)
    ratelimit.start_session(cfg, manifest)  
    warn_gpu_setup(cfg, say)
    budget = Budget(cfg.max_error_fraction, cfg.min_rows_for_budget)
    # The folder's samples with a result, as this session adds to them (retries have none yet).
    done, failed = start.done, start.failed_final
    skip = state.skip()
    progress, timing = Progress(todo, unit="prompts" if draws is not None else "samples"), Timing(todo)
    watch = StallWatch(cfg.resources.stall_warning_s, say)
    finished = False
    try:
        ds = build_dataset(cfg, inputs.used(), skip, plan, draws)
        units = 0  # what progress counts: samples, or prompts with rejection sampling
        for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=2):
            watch.touch()
            keys = list(zip(batch.column("id").to_pylist(), batch.column("sample_index").to_pylist()))
            rewards = batch.column("reward").to_pylist()
            ok, bad = writers.write(keys, batch.column("rollout").to_pylist(), batch.column("failed").to_pylist(),
                                    rewards)
            session.add(ok, bad, sum(batch.column("output_tokens").to_pylist()), rewards)
            done, failed = done + ok, failed + bad
            n = len({rid for rid, _ in keys}) if draws is not None else ok + bad
            timing.batch(n, units, pc.min(batch.column("ready_at")).as_py())
            units += n
            progress.update(n, units, session.record["failed"], session.mean_reward)
            if budget.exceeded(done, failed):
                session.record["stopped"] = "failure budget exceeded"
                break
        finished = True
    except InputError as err:
        session.record["stopped"] = f"input error: {err}"
        raise RunError(f"bad input line: {err}\n(use read.skip_bad_lines=true to skip and count such lines; "
                       f"the {session.record['written']} rollouts written so far are kept)", EXIT_INPUT) from None
    finally:
        watch.close()
        progress.close()
        if finished:  # answers in flight at an early stop are in the journal: keep them
            recover_journal(cfg.output, verifier_payload(cfg.verifier), inputs.ids, state, writers,
                            remote_scorer(cfg))
        writers.close()
        release_placement_groups()  # tensor-parallel groups of actors that never ran their teardown
        ratelimit.end_session(session.record)  # this run's spend; "budget" when the budget stopped it
        session.record.update(timing.record())
        save_manifest(cfg.output, manifest)
    clear_journal(cfg.output)  # all it held is written now
    compact_failures(cfg.output, session.number, state.done)
    return session


def throughput(manifest: dict[str, Any]) -> dict[str, float]:
    sessions = [s for s in manifest.get("sessions", []) if s.get("generate_wall_s")]
    wall = sum(s["generate_wall_s"] for s in sessions)
    samples = sum(s["written"] + s["failed"] for s in sessions)
    tokens = sum(s["output_tokens"] for s in sessions)
    return {"generate_wall_s": wall, "samples_per_s": samples / wall if wall else 0.0,
            "output_tokens_per_s": tokens / wall if wall else 0.0}


def finalize_run(run_dir: str, filter_cfg: dict[str, Any], shuffle_seed: int, train_cfg: dict[str, Any],
                 manifest: dict[str, Any] | None, say: Callable[[str], None], write: bool = True) -> dict[str, Any]:
    """Phase 2 plus the report; writes stats.json (and ``_SUCCESS`` when the run is complete) when
    ``write``. Both are removed first: a crash while train/ is replaced never leaves a stats.json
    or a marker that describe another train/."""
    t0 = time.monotonic()
    if write:
        io.delete(io.join(run_dir, SUCCESS))
        io.delete(io.join(run_dir, "stats.json"))
    rejection = ((manifest or {}).get("config") or {}).get("rejection")
    stats = finalize(run_dir, filter_cfg, shuffle_seed, train_cfg, write=write, rejection=rejection)
    stats["finalize_wall_s"] = round(time.monotonic() - t0, 3)
    if manifest:
        stats["throughput"] = throughput(manifest)
        stats.update(manifest.get("completion") or {})
        stats["spend"] = spend_summary(stats, manifest)
    if write:
        io.write_bytes(io.join(run_dir, "stats.json"), json.dumps(stats, indent=2).encode())
        if stats.get("complete"):
            io.write_bytes(io.join(run_dir, SUCCESS), b"")
    say(format_report(stats))
    say(json.dumps({k: round(v, 4) for k, v in stats["metrics"].items()}))
    return stats


def run(cfg: RunConfig, restart: bool = False, say: Callable[[str], None] = print) -> int:
    """The whole job; returns the process exit code."""
    from sft_ray.lock import LockError, RunLock

    check_plugins(cfg)
    inputs = scan_input(cfg)
    try:
        lock = RunLock(cfg.output).acquire()
    except LockError as e:
        raise RunError(str(e)) from None
    except OSError as e:  # the lock is the first thing written: a path that cannot be a folder shows here
        raise RunError(output_folder_error(cfg.output, e)) from None
    with lock:
        try:
            manifest = prepare_run_dir(cfg, restart, inputs.digests)
        except DriftError as e:
            raise RunError(str(e)) from None
        state = FolderState(cfg.output, cfg.max_sample_attempts,
                            cfg.filter.min_reward if cfg.rejection.active else None)
        session = generate_phase(cfg, manifest, inputs, state, say)
        # Counted sample by sample from what the folder holds now (not from this session's tallies).
        done = completion(cfg, inputs, state)
        budget = Budget(cfg.max_error_fraction, cfg.min_rows_for_budget)
        manifest["completion"] = done.as_stats(budget)
        if inputs.bad_lines:
            manifest["completion"]["bad_line_examples"] = inputs.bad_lines[:5]
        save_manifest(cfg.output, manifest)
        stats = finalize_run(cfg.output, cfg.filter.model_dump(), cfg.shuffle.seed, cfg.train.model_dump(),
                             manifest, say)
    say(f"run folder: {cfg.output}  (rollouts/, train/ {len(stats.get('shards', []))} shard(s), stats.json)")
    if session.record.get("stopped"):
        say(f"stopped early: {session.record['stopped']}")
    if session.record.get("stopped") == "budget":
        say("stopped: budget; what was generated is finalized. Raise budget.* and rerun the same command "
            "to continue")
        return EXIT_SPENT
    code, reason = done.verdict(budget)
    if reason:
        say(reason)
    return code
