"""Phase 1's driver-side parts: Ray's set-up, the concurrency plan, journal recovery,
progress, timing and the session record.

:mod:`sft_ray.job` composes them; each does one job and is tested on its own. What the
run folder holds, completion and the failure budget are :mod:`sft_ray.runfolder`'s.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import threading
import time
from typing import Any, Callable, Iterable

import orjson

from sft_ray.config import RunConfig
from sft_ray.placement import release_placement_groups
from sft_ray.ratelimit import RunLimits
from sft_ray.runfolder.completion import FailureBudget, FailureTally
from sft_ray.runfolder.layout import Key, keys_of
from sft_ray.runfolder.manifest import Manifest, StopReason
from sft_ray.runfolder.parts import Writers
from sft_ray.runfolder.state import FolderState
from sft_ray.stages import actor_range

BLOCK_BYTES = 1 << 20

def model_label(cfg: RunConfig) -> str:
    if cfg.model.backend == "vllm":
        from sft_ray.models import display_name, is_default

        return display_name(cfg.model.name) + (" (embedded default)" if is_default(cfg.model.name) else "")
    return cfg.model.name or ""


def plan_concurrency(cfg: RunConfig, todo: int) -> dict[str, int]:
    """Actors, requests in flight per actor, batch size and rows per block.

    Each actor may hold ``num_samples_in_parallel // max_actors`` requests, so
    the total never exceeds ``num_samples_in_parallel`` even at the pool's largest.
    """
    lo, hi = actor_range(cfg.resources.generate_actors)
    hi = max(1, min(hi, cfg.max_requests_in_flight))  # num_samples_in_parallel, or auto's ceiling
    lo = max(1, min(lo, hi))
    per_actor = max(1, cfg.max_requests_in_flight // hi)
    batch = cfg.resources.batch_size or max(8, min(1024, per_actor // 2))
    # A block is one actor task: at least 4 per actor, but a few batches each at most.
    block_rows = max(batch, min(8 * batch, todo // (4 * hi)))
    return {"min_actors": lo, "max_actors": hi, "per_actor": per_actor, "batch_size": batch,
            "block_rows": block_rows}


def starts_local_node(cfg: RunConfig) -> bool:
    """Whether ``init_ray`` starts Ray on this machine (no cluster address given)."""
    return (cfg.resources.ray_address or os.environ.get("RAY_ADDRESS")) in (None, "local")


class RayStartError(RuntimeError):
    """Ray did not start, or its cluster could not be reached: one line of ours with advice
    instead of Ray's traceback (the run folder is as it was; rerun the same command)."""


def start_ray(address: str | None, extra: dict[str, Any]) -> None:
    import ray

    try:
        ray.init(address=address, log_to_driver=True, configure_logging=True, logging_level="WARNING", **extra)
    except Exception as e:  # Ray raises bare Exception, ConnectionError, RuntimeError, TimeoutError...
        try:
            ray.shutdown()  # whatever it had started of a local node
        except Exception:  # the error to report is the first one
            pass
        raise RayStartError(ray_start_message(address, e)) from None


def ray_start_message(address: str | None, err: BaseException) -> str:
    """The one error line (and its advice) for a Ray that did not start."""
    said = " ".join(str(err).split()) or type(err).__name__
    said = said if len(said) <= 300 else said[:297] + "..."
    if address in (None, "local"):
        return (f"Ray did not start on this machine: {said}\n(nothing was lost: rerun the same command to go on; "
                "if it happens again, the machine may be overloaded or short of memory or /tmp space, or start "
                "Ray yourself with `ray start --head` and rerun with RAY_ADDRESS=auto)")
    return (f"could not connect to the Ray cluster at {address}: {said}\n(nothing was lost: check "
            "resources.ray_address / RAY_ADDRESS and that the cluster is up (`ray status`), then rerun the "
            "same command to go on)")


def init_ray(cfg: RunConfig) -> None:
    import ray

    address = cfg.resources.ray_address or os.environ.get("RAY_ADDRESS")
    # Ray 2.60 announces its (default, wanted) token authentication with a WARNING that
    # suggests turning it off; sft-ray keeps it on, so the line is only noise in our output.
    logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
    if not ray.is_initialized():
        extra = {}
        if cfg.metrics.export_port is not None and starts_local_node(cfg):
            extra["_metrics_export_port"] = cfg.metrics.export_port  # Prometheus scrapes this node here
        start_ray(address, extra)
    from sft_ray.raynoise import data_context

    ctx = data_context()  # made without Ray's warnings about flags it sets itself
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


ScoreBatches = Callable[[list[dict[str, Any]]], Iterable[dict[str, Any]]]


def recover_journal(run_dir: str, verifier: dict[str, Any], ids: set[str], state: FolderState,
                    writers: Writers, remote: ScoreBatches | None = None) -> int:
    """Score and write what the generation journal holds beyond the folder's results (what a
    killed run had generated but not yet written), calling no model. Returns how many.

    Scored here, in this process, unless ``remote`` is given: a function that takes the
    score stage's input batches and yields its output batches elsewhere (the pipeline's score
    actors, for a judge that runs an engine: :func:`remote_scorer`)."""
    from sft_ray.runfolder.journal import read_journal
    from sft_ray.stages.score import ScoreStage

    skip = state.skip()
    rows = [r for r in read_journal(run_dir, skip) if str(r["id"]) in ids]
    if not rows:
        return 0
    batches = [{"id": [r["id"] for r in chunk], "sample_index": [r["sample_index"] for r in chunk],
                "rollout": [orjson.dumps(r).decode() for r in chunk], "failed": [False] * len(chunk),
                "ready_at": [0.0] * len(chunk), "telemetry": [None] * len(chunk)}
               for chunk in (rows[i:i + 256] for i in range(0, len(rows), 256))]

    def write(out: dict[str, Any]) -> None:
        keys = keys_of(out)
        writers.write(keys, list(out["rollout"]), [bool(f) for f in out["failed"]], list(out["reward"]))

    if remote is not None:
        for out in remote(batches):
            write(out)
        return len(rows)
    scorer = ScoreStage(verifier)

    async def score_all() -> None:  # one event loop for every chunk: the stage's semaphore lives in it
        try:
            for batch in batches:
                write(await scorer(batch))
        finally:
            await scorer.close()  # the judge's connections, in the loop they belong to

    asyncio.run(score_all())
    return len(rows)


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


class Progress:
    """A progress bar with samples/s (prompts/s with rejection sampling) on a terminal; a log line every few seconds otherwise
    (so that `ray job logs` reads well). It moves per sample: :meth:`update` on each written batch, and
    :meth:`advance` (the live view's thread, :mod:`sft_ray.live`) as the actors report samples finished."""

    def __init__(self, total: int, out=sys.stderr, unit: str = "samples", limits: RunLimits | None = None) -> None:
        self.total, self.out, self.unit, self.limits = total, out, unit, limits
        self.start = time.monotonic()
        self.last_line = 0.0
        self.bar = None
        self.shown = 0  # units shown: written, or finished as the actors report it
        self.info: dict[str, Any] = {}
        self.advice: str | None = None
        self.lock = threading.Lock()
        if out.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit=unit, dynamic_ncols=True, file=out, smoothing=0.1)

    def update(self, n: int, done: int, failed: int, mean_reward: float | None) -> None:
        info: dict[str, Any] = {"failed": failed}
        if mean_reward is not None:
            info["reward"] = f"{mean_reward:.3f}"
        if self.limits is not None:
            info.update(self.limits.progress_info(done, self.total))  # concurrency, share of 429s, cost
        with self.lock:
            self.info = info
            self._show(done)

    def advance(self, finished: int, advice: str | None = None) -> None:
        """The actors have finished ``finished`` units of this session (some not written yet);
        ``advice``: what takes most of the time (:func:`sft_ray.metrics.advice`)."""
        with self.lock:
            self.advice = advice
            if finished > self.shown:
                self._show(finished)

    def _show(self, done: int) -> None:
        done = min(self.total, max(done, self.shown))
        step, self.shown = done - self.shown, done
        info = dict(self.info)
        if self.advice:
            info["bottleneck"] = self.advice
        if self.bar is not None:
            self.bar.update(step)
            self.bar.set_postfix(info, refresh=False)
            return
        now = time.monotonic()
        if now - self.last_line >= 10 or (done >= self.total and step):
            self.last_line = now
            rate = done / max(now - self.start, 1e-9)
            pct = 100.0 * done / self.total if self.total else 100.0
            parts = [f"{done}/{self.total} {self.unit} ({pct:.1f}%)", f"{rate:.1f} {self.unit}/s"]
            print("[sft-ray] " + ", ".join(parts + [f"{k} {v}" for k, v in info.items()]), file=self.out, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class Timing:
    """Start-up, wall time after the first backend was ready, and the steady rate between
    10% and 90% done (what a long run sustains, without actor start-up and tail)."""

    def __init__(self, planned: int) -> None:
        self.planned = planned
        self.t0 = time.monotonic()
        self.first_rows_after_s: float | None = None
        self.first_ready: float | None = None  # epoch seconds when the first actor's backend was ready
        self.marks: dict[float, tuple[float, int]] = {}

    def batch(self, n: int, done_before: int, ready_at: float | None) -> None:
        now = time.monotonic()
        if ready_at is not None and (self.first_ready is None or ready_at < self.first_ready):
            self.first_ready = ready_at
        if self.first_rows_after_s is None:
            self.first_rows_after_s = round(now - self.t0, 3)  # start-up: actors, engines, first answers
        for q in (0.1, 0.9):
            if done_before < q * self.planned <= done_before + n:
                self.marks[q] = (now, done_before + n)

    def record(self) -> dict[str, float]:
        out = {"generate_wall_s": round(time.monotonic() - self.t0, 3)}
        if self.first_rows_after_s is not None:
            out["first_rows_after_s"] = self.first_rows_after_s
        if self.first_ready is not None:
            out["generate_after_ready_s"] = round(max(1e-3, time.time() - self.first_ready), 3)
        if len(self.marks) == 2 and self.marks[0.9][0] > self.marks[0.1][0]:
            (t1, n1), (t2, n2) = self.marks[0.1], self.marks[0.9]
            out["steady_samples_per_s"] = round((n2 - n1) / (t2 - t1), 2)
        return out


class Session:
    """This run's record in run.json: what it planned, wrote and why it stopped."""

    def __init__(self, manifest: Manifest, planned: int) -> None:
        self.record = manifest.open_session(planned)
        self.number = self.record.number
        self.reward_sum, self.reward_n = 0.0, 0
        self.metrics_linger: dict[str, Any] | None = None  # with metrics.export_port: metrics.linger's arguments

    def add(self, ok: int, failed: int, tokens: int, rewards: list[float | None]) -> None:
        self.record.add(ok, failed, tokens)
        rs = [r for r in rewards if r is not None]
        self.reward_sum += sum(rs)
        self.reward_n += len(rs)

    @property
    def mean_reward(self) -> float | None:
        return self.reward_sum / self.reward_n if self.reward_n else None


class Recorder:
    """What becomes of a scored rollout, the one way for every path (the online stream, the Batch
    API's loop): written to the folder (``rollouts/`` or ``failed/``), added to the session's tallies;
    and the failure budget, which stops the session once exceeded. ``done``, ``final``, ``failed``:
    where the failure budget's counts start (:class:`~sft_ray.runfolder.completion.FailureTally`)."""

    def __init__(self, cfg: RunConfig, writers: Writers, session: Session, done: int, final: int = 0,
                 failed: Iterable[Key] = ()) -> None:
        self.writers, self.session = writers, session
        self.failures = FailureTally(FailureBudget(cfg.max_error_fraction, cfg.min_rows_for_budget), done, final,
                                     failed)

    def write(self, keys: list[Key], rollouts: list[str], failed: list[bool], rewards: list[float | None],
              output_tokens: int) -> tuple[int, int]:
        """Write scored rollouts (JSON text); (how many went to rollouts/, how many to failed/)."""
        ok, bad = self.writers.write(keys, rollouts, failed, rewards)
        self.session.add(ok, bad, output_tokens, rewards)
        self.failures.add(keys, failed)
        return ok, bad

    def over_failure_budget(self) -> bool:
        """Whether the failure budget is exceeded by what was written so far (the session's stop
        reason then says so)."""
        if not self.failures.exceeded():
            return False
        self.session.record.stop(StopReason.FAILURE_BUDGET)
        return True


def throughput(manifest: dict[str, Any]) -> dict[str, float]:
    sessions = [s for s in manifest.get("sessions", []) if s.get("generate_wall_s")]
    wall = sum(s["generate_wall_s"] for s in sessions)
    samples = sum(s["written"] + s["failed"] for s in sessions)
    tokens = sum(s["output_tokens"] for s in sessions)
    return {"generate_wall_s": wall, "samples_per_s": samples / wall if wall else 0.0,
            "output_tokens_per_s": tokens / wall if wall else 0.0}


def timing_breakdown(manifest: dict[str, Any]) -> dict[str, float]:
    """stats.json ``timing.breakdown``: every session's parts summed (:meth:`sft_ray.metrics.RunMetrics.breakdown`)."""
    from sft_ray.metrics import BREAKDOWN

    out = {k: 0.0 for k in (*BREAKDOWN, "wall_s")}
    for s in manifest.get("sessions", []):
        for k, v in (s.get("breakdown") or {}).items():
            if k in out:
                out[k] = round(out[k] + float(v), 3)
    return out
