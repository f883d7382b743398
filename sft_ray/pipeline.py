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
import sys
import time
from typing import Any, Callable

import orjson
import pyarrow.compute as pc

from sft_ray import io, ratelimit
from sft_ray.config import RunConfig
from sft_ray.cost import spend_summary
from sft_ray.placement import placement_group_fn, release_placement_groups  # noqa: F401 - [config]
from sft_ray.resume import DriftError, carry_failures, count_failure, done_keys, prepare_run_dir, save_manifest
from sft_ray.rows import InputError
from sft_ray.stages.finalize import FAILED, ROLLOUTS, finalize
from sft_ray.stages.write import PartWriter
from sft_ray.stats import format_report

EXIT_OK, EXIT_USAGE, EXIT_INPUT, EXIT_BUDGET = 0, 1, 2, 3
EXIT_SPENT = 4  # [config] stopped by budget.* (spending), resumable with a raised budget
BLOCK_BYTES = 1 << 20


class RunError(Exception):
    """A problem that stops the run, with the exit code to use."""

    def __init__(self, message: str, code: int = EXIT_USAGE) -> None:
        super().__init__(message)
        self.code = code


def stop_on_bad_input(failed_rows: list[dict[str, Any]]) -> None:
    """Raise the first bad input line among failed rows (rows that never reached a model,
    because their line is malformed: the read stage marks them instead of raising)."""
    for row in failed_rows:
        if (row.get("error") or {}).get("type") == "bad_input":
            source, _, reason = row["error"]["message"].partition(": ")
            raise InputError(source, reason)


class Progress:
    """A progress bar with rows/s on a terminal; a log line every few seconds otherwise
    (so that `ray job logs` reads well)."""

    def __init__(self, total: int, out=sys.stderr) -> None:
        self.total, self.out = total, out
        self.start = time.monotonic()
        self.last_line = 0.0
        self.bar = None
        if out.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="rows", dynamic_ncols=True, file=out, smoothing=0.1)

    def update(self, n: int, done: int, failed: int, mean_reward: float | None) -> None:
        info = {"failed": failed}
        if mean_reward is not None:
            info["reward"] = f"{mean_reward:.3f}"
        info.update(ratelimit.progress_info(done, self.total))  # [config] concurrency, 429s, cost
        if self.bar is not None:
            self.bar.update(n)
            self.bar.set_postfix(info, refresh=False)
            return
        now = time.monotonic()
        if now - self.last_line >= 10 or done >= self.total:
            self.last_line = now
            rate = done / max(now - self.start, 1e-9)
            pct = 100.0 * done / self.total if self.total else 100.0
            print(f"[sft-ray] {done}/{self.total} samples ({pct:.1f}%), {rate:.1f} rows/s, "
                  + ", ".join(f"{k} {v}" for k, v in info.items()), file=self.out, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


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
    hi = max(1, min(hi, cfg.max_in_flight))  # [config] max_in_flight: num_samples_in_parallel, or auto's ceiling
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

    quiet_ray()  # [config] Ray's false alarm and Ray Data's INFO lines, see sft_ray/raynoise.py


def warn_gpu_setup(cfg: RunConfig, say: Callable[[str], None]) -> None:
    """A vllm run on a cluster that has GPUs while its actors ask for none is almost
    certainly a forgotten `resources.generate_num_gpus` (the engine would see no GPU)."""
    import ray

    if cfg.model.backend == "vllm" and cfg.model.tensor_parallel_size == 1 and not cfg.resources.generate_num_gpus:
        gpus = ray.cluster_resources().get("GPU", 0)
        if gpus:
            say(f"warning: the cluster has {gpus:g} GPU(s) but generation actors ask for none; "
                "set resources.generate_num_gpus=1 to run each engine on a GPU")


def build_dataset(cfg: RunConfig, files: list[str], done: set[tuple[str, int]], plan: dict[str, int]):
    """read -> repartition -> generate actors -> score actors (lazy; the driver pulls)."""
    import ray.data

    from sft_ray.backends.base import Secret
    from sft_ray.stages.generate import GenerateStage
    from sft_ray.stages.read import make_dataset
    from sft_ray.stages.score import ScoreStage

    model = cfg.model.model_dump()
    model["api_key"] = Secret(cfg.model.api_key())
    model["secret_headers"] = Secret(cfg.model.secret_headers())  # [config] extra_headers_env values
    model["limits"] = ratelimit.actor_spec()  # [config] shared rate limits / auto concurrency / budget
    sampling = cfg.responses_create_params.model_dump()
    ds = make_dataset(files, cfg.num_repeats, cfg.read.skip_bad_lines, done, cfg.read.limit)
    # One read task per file keeps duplicate-id suffixes consistent; streaming repartition
    # then cuts its output into blocks small enough to spread over every actor.
    ds = ds.repartition(target_num_rows_per_block=plan["block_rows"])
    remote_args: dict[str, Any] = {}
    num_gpus = cfg.resources.generate_num_gpus or None
    tp = cfg.model.tensor_parallel_size
    if cfg.model.backend == "vllm" and tp > 1:
        # One replica spans tp GPUs: the actor itself takes none, and vLLM's Ray executor
        # places its tp workers in a placement group made for this actor (as ray.data.llm does).
        model["engine_kwargs"] = {**model["engine_kwargs"], "distributed_executor_backend": "ray"}
        num_gpus = None
        remote_args["ray_remote_args_fn"] = placement_group_fn(tp)
    ds = ds.map_batches(
        GenerateStage,
        fn_constructor_kwargs={"model": model, "sampling": sampling, "max_in_flight": plan["per_actor"]},
        batch_size=plan["batch_size"],
        compute=ray.data.ActorPoolStrategy(min_size=plan["min_actors"], max_size=plan["max_actors"],
                                           max_tasks_in_flight_per_actor=4, max_concurrent_calls_per_actor=4),
        num_cpus=cfg.resources.generate_num_cpus,
        num_gpus=num_gpus,
        resources=cfg.resources.generate_resources or None,  # [config] e.g. cluster.yaml's cpu_node
        **remote_args,
    )
    s_lo, s_hi = actor_range(cfg.resources.score_actors)
    ds = ds.map_batches(
        ScoreStage,
        fn_constructor_kwargs={"verifier": cfg.verifier.model_dump()},
        batch_size=None,
        compute=ray.data.ActorPoolStrategy(min_size=s_lo, max_size=s_hi),
        num_cpus=cfg.resources.score_num_cpus,
    )
    return ds


def scan_input(cfg: RunConfig) -> tuple[list[str], int, dict[str, str]]:
    """Input files, their row count (after read.limit) and a content digest per file."""
    try:
        files = io.list_input_files(cfg.input)
    except FileNotFoundError as e:
        raise RunError(str(e), EXIT_INPUT) from None
    rows, digests = 0, {}
    for f in files:
        n, digests[f] = io.scan_lines(f)
        rows += min(n, cfg.read.limit) if cfg.read.limit else n
    return files, rows, digests


def generate_phase(cfg: RunConfig, manifest: dict[str, Any], files: list[str], rows: int,
                   say: Callable[[str], None]) -> dict[str, Any]:
    """Phase 1. Returns this session's record (also appended to the manifest)."""
    done = done_keys(cfg.output)
    session = len(manifest["sessions"])
    final_failed, failed_runs = carry_failures(cfg.output, done, cfg.max_sample_attempts, session)
    done |= final_failed
    total = rows * cfg.num_repeats
    todo = max(0, total - len(done))
    plan = plan_concurrency(cfg, todo)
    say(f"found {rows} rows in {len(files)} file(s) -> {total} samples ({cfg.num_repeats} per row); "
        f"{len(done)} already done, {todo} to generate"
        + (f" ({len(failed_runs)} failed before and retried now, {len(final_failed)} failed for good)"
           if failed_runs or final_failed else ""))
    say(f"model: {cfg.model.backend} {model_label(cfg)}; concurrency: {'auto, up to ' if cfg.adaptive else ''}"
        f"{plan['per_actor'] * plan['max_actors']} requests in flight "
        f"({plan['min_actors']}-{plan['max_actors']} actors x {plan['per_actor']}), batch {plan['batch_size']}")

    record: dict[str, Any] = {"session": session, "started_at": time.time(), "planned": todo,
                              "written": 0, "failed": 0, "output_tokens": 0, "generate_wall_s": 0.0,
                              "stopped": None}
    manifest["sessions"].append(record)
    save_manifest(cfg.output, manifest)
    if todo == 0:
        return record

    init_ray(cfg)
    ratelimit.start_session(cfg, manifest)  # [config]
    warn_gpu_setup(cfg, say)
    ok_writer = PartWriter(io.join(cfg.output, ROLLOUTS), session)
    bad_writer = PartWriter(io.join(cfg.output, FAILED), session)
    progress = Progress(todo)
    t0 = time.monotonic()
    reward_sum, reward_n = 0.0, 0
    first_ready: float | None = None  # epoch seconds when the first actor's backend was ready
    marks: dict[float, tuple[float, int]] = {}  # when 10% and 90% of the samples were done
    try:
        ds = build_dataset(cfg, files, done, plan)
        for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=2):
            lines = batch.column("rollout").to_pylist()
            failed = batch.column("failed").to_pylist()
            rewards = batch.column("reward").to_pylist()
            oks = [s.encode() for s, f in zip(lines, failed) if not f]
            failed_rows = [orjson.loads(s) for s, f in zip(lines, failed) if f]
            ok_writer.write(oks)
            if failed_rows and not cfg.read.skip_bad_lines:
                stop_on_bad_input(failed_rows)
            bads = [count_failure(row, failed_runs) for row in failed_rows]
            bad_writer.write(bads)
            tokens = batch.column("output_tokens").to_pylist()
            record["output_tokens"] += sum(tokens)
            record["written"] += len(oks)
            record["failed"] += len(bads)
            rs = [r for r in rewards if r is not None]
            reward_sum += sum(rs)
            reward_n += len(rs)
            n = len(lines)
            done_prev = record["written"] + record["failed"] - n
            now = time.monotonic()
            ready = pc.min(batch.column("ready_at")).as_py()
            if ready is not None and (first_ready is None or ready < first_ready):
                first_ready = ready
            if "first_rows_after_s" not in record:
                record["first_rows_after_s"] = round(now - t0, 3)  # start-up: actors, engines, first answers
            for q in (0.1, 0.9):
                if done_prev < q * todo <= done_prev + n:
                    marks[q] = (now, done_prev + n)
            done_now = record["written"] + record["failed"]
            progress.update(n, done_now, record["failed"], reward_sum / reward_n if reward_n else None)
            if done_now >= cfg.min_rows_for_budget and record["failed"] / done_now > cfg.max_error_fraction:
                record["stopped"] = "failure budget exceeded"
                break
    except InputError as err:
        record["stopped"] = f"input error: {err}"
        raise RunError(f"bad input line: {err}\n(use read.skip_bad_lines=true to skip and count such lines; "
                       f"the {record['written']} rollouts written so far are kept)", EXIT_INPUT) from None
    finally:
        ok_writer.close()
        bad_writer.close()
        progress.close()
        release_placement_groups()  # [config] tensor-parallel groups of actors that never ran their teardown
        ratelimit.end_session(record)  # [config] this run's spend; "budget" when the budget stopped it
        end = time.monotonic()
        record["generate_wall_s"] = round(end - t0, 3)
        if first_ready is not None:
            # Wall time once a backend could serve: excludes actor and engine start-up.
            record["generate_after_ready_s"] = round(max(1e-3, time.time() - first_ready), 3)
        if len(marks) == 2 and marks[0.9][0] > marks[0.1][0]:
            # Rate between 10% and 90% done, without actor start-up and tail: what a long run sustains.
            (t1, n1), (t2, n2) = marks[0.1], marks[0.9]
            record["steady_samples_per_s"] = round((n2 - n1) / (t2 - t1), 2)
        save_manifest(cfg.output, manifest)
    return record


def throughput(manifest: dict[str, Any]) -> dict[str, float]:
    sessions = [s for s in manifest.get("sessions", []) if s.get("generate_wall_s")]
    wall = sum(s["generate_wall_s"] for s in sessions)
    samples = sum(s["written"] + s["failed"] for s in sessions)
    tokens = sum(s["output_tokens"] for s in sessions)
    return {"generate_wall_s": wall, "samples_per_s": samples / wall if wall else 0.0,
            "output_tokens_per_s": tokens / wall if wall else 0.0}


def finalize_run(run_dir: str, filter_cfg: dict[str, Any], shuffle_seed: int, train_cfg: dict[str, Any],
                 manifest: dict[str, Any] | None, say: Callable[[str], None], write: bool = True) -> dict[str, Any]:
    """Phase 2 plus the report; writes stats.json when ``write``."""
    t0 = time.monotonic()
    stats = finalize(run_dir, filter_cfg, shuffle_seed, train_cfg, write=write)
    stats["finalize_wall_s"] = round(time.monotonic() - t0, 3)
    if manifest:
        stats["throughput"] = throughput(manifest)
        stats["spend"] = spend_summary(stats, manifest)  # [config]
    if write:
        io.write_bytes(io.join(run_dir, "stats.json"), json.dumps(stats, indent=2).encode())
    say(format_report(stats))
    say(json.dumps({k: round(v, 4) for k, v in stats["metrics"].items()}))
    return stats


def run(cfg: RunConfig, restart: bool = False, say: Callable[[str], None] = print) -> int:
    """The whole job; returns the process exit code."""
    files, rows, digests = scan_input(cfg)
    try:
        manifest = prepare_run_dir(cfg, restart, digests)
    except DriftError as e:
        raise RunError(str(e)) from None
    record = generate_phase(cfg, manifest, files, rows, say)
    stats = finalize_run(cfg.output, cfg.filter.model_dump(), cfg.shuffle.seed, cfg.train.model_dump(),
                         manifest, say)
    say(f"run folder: {cfg.output}  (rollouts/, train/ {len(stats.get('shards', []))} shard(s), stats.json)")
    samples = stats["samples"]
    if record.get("stopped"):
        say(f"stopped early: {record['stopped']}")
    if record.get("stopped") == "budget":  # [config]
        say("stopped: budget; what was generated is finalized. Raise budget.* and rerun the same command "
            "to continue")
        return EXIT_SPENT
    if samples and stats["failed"] / samples > cfg.max_error_fraction:
        say(f"FAILED: {stats['failed']}/{samples} samples failed, over the budget max_error_fraction="
            f"{cfg.max_error_fraction}; rerun the same command to retry them")
        return EXIT_BUDGET
    return EXIT_OK
