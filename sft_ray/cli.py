"""The `sft-ray` command line.

Only typer is imported at start-up; each command imports what it needs, so
`sft-ray --help` never loads Ray, vLLM or torch.
"""

from __future__ import annotations

import sys
from typing import List, Optional

import typer

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Generate supervised-fine-tuning demonstrations at scale with Ray: prompts -> model -> reward -> "
    "filtered, shuffled, sharded training data.",
)


def _fail(message: str, code: int = 1) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def _load(config: Optional[str], overrides: List[str]):
    from sft_ray.config import ConfigError
    from sft_ray.configload import load_config

    try:
        return load_config(config, overrides)
    except ConfigError as e:
        _fail(str(e))


@app.command()
def run(
    config: str = typer.Argument(..., help="YAML config file."),
    overrides: Optional[List[str]] = typer.Argument(None, help="dotted.key=value overrides, e.g. num_repeats=4"),
    restart: bool = typer.Option(False, "--restart", help="Discard what the run folder holds and start over."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Run a small pilot in a temporary folder and print the "
                                 "planned requests, tokens and cost; the run folder is not touched."),
    pilot: int = typer.Option(20, "--pilot", min=1, help="Samples in the --dry-run pilot."),
    no_wait: bool = typer.Option(False, "--no-wait", help="With model.batch.enabled: submit the batches, collect "
                                 "what already finished and exit (code 4 while batches are pending); rerun to "
                                 "collect the rest."),
) -> None:
    """Run the whole job: generate, score, filter, shuffle, shard, report. Rerun to resume."""
    cfg = _load(config, overrides or [])
    from sft_ray.config import ConfigError
    from sft_ray.job import RunError
    from sft_ray.job import run as run_job

    try:
        cfg.model.secret_headers()  # an unset variable stops the run before Ray starts
        if no_wait and not cfg.model.batch.enabled:
            _fail("--no-wait is for Batch API runs: set model.batch.enabled=true")
        if no_wait and cfg.environment.type != "none":
            _fail("--no-wait cannot leave agent episodes waiting: they live in this process between rounds "
                  "(run without --no-wait)")
        if dry_run:
            from sft_ray.dryrun import dry_run as plan

            plan(cfg, pilot, typer.echo)
            raise typer.Exit(0)
        code = run_job(cfg, restart=restart, no_wait=no_wait)
    except ConfigError as e:
        _fail(str(e))
    except RunError as e:
        _fail(str(e), e.code)
    raise typer.Exit(code)


@app.command()
def validate(
    config: str = typer.Argument(..., help="YAML config file."),
    overrides: Optional[List[str]] = typer.Argument(None, help="dotted.key=value overrides"),
    rows: int = typer.Option(100, help="How many input rows to parse per file."),
) -> None:
    """Check a config and the first rows of its input without starting Ray or calling a model."""
    cfg = _load(config, overrides or [])
    from sft_ray.validate import check_input

    problems, summary = check_input(cfg, rows)
    typer.echo(summary)
    for p in problems:
        typer.echo(f"  {p}", err=True)
    if problems:
        _fail(f"{len(problems)} problem(s) found", 2)
    typer.echo("ok")


_RECUT_SECTIONS = ("filter", "train", "shuffle", "preference", "decontaminate")


def _recut(run_dir: str, overrides: List[str], options: dict):
    """The run's filter/train/shuffle settings with the command's options and overrides applied."""
    from pydantic import ValidationError

    from sft_ray.config import (
        ConfigError,
        DecontaminateConfig,
        FilterConfig,
        PreferenceConfig,
        ShuffleConfig,
        TrainConfig,
    )
    from sft_ray.configload import apply_overrides, format_validation_error
    from sft_ray.runfolder.layout import MANIFEST
    from sft_ray.runfolder.manifest import load_manifest

    manifest = load_manifest(run_dir)
    if manifest is None:
        _fail(f"{run_dir} is not a run folder (no {MANIFEST})")
    cfg = manifest.setdefault("config", {})
    data = {k: dict(cfg.get(k) or {}) for k in _RECUT_SECTIONS}
    data["train"] = TrainConfig.model_validate(data["train"]).model_dump()  # older run.json: file format as `format`
    for key, value in options.items():
        if value is not None:
            section, name = key.split(".")
            data[section][name] = value
    try:
        for item in overrides:
            if item.split("=", 1)[0].split(".")[0] not in _RECUT_SECTIONS:
                raise ConfigError(f"override {item!r}: only filter.*, train.*, shuffle.*, preference.* and "
                                  "decontaminate.* apply to an existing run")
        apply_overrides(data, overrides)
        checked = {}
        for section, model in (("filter", FilterConfig), ("train", TrainConfig), ("shuffle", ShuffleConfig),
                               ("preference", PreferenceConfig), ("decontaminate", DecontaminateConfig)):
            try:
                checked[section] = model.model_validate(data[section])
            except ValidationError as e:  # named as the user names it: filter.dedup, not pydantic's text
                raise ConfigError(format_validation_error(e, f"re-cut of {run_dir}", section)) from None
    except (ConfigError, ValueError) as e:
        _fail(str(e))
    return (manifest, checked["filter"].model_dump(), checked["train"].model_dump(), checked["shuffle"].seed,
            checked["preference"].model_dump(), checked["decontaminate"].model_dump(mode="json"))


def _index(decontaminate: dict, code_on_error: int = 2):
    """The benchmark index of a re-cut's decontaminate section (None when it names none)."""
    from sft_ray.job import RunError, benchmark_index

    try:
        return benchmark_index(decontaminate)
    except RunError as e:
        _fail(str(e), e.code)


def _recut_options(min_reward, max_reward, max_per_prompt, dedup, validation_fraction, fmt, file_format,
                   rows_per_shard, seed) -> dict:
    if fmt is not None and "," in fmt:  # several formats from one pass: --format messages,preference
        fmt = [f.strip() for f in fmt.split(",") if f.strip()]
    return {"filter.min_reward": min_reward, "filter.max_reward": max_reward, "filter.dedup": dedup,
            "train.max_per_prompt": max_per_prompt, "train.validation_fraction": validation_fraction,
            "train.format": fmt, "train.file_format": file_format, "train.rows_per_shard": rows_per_shard,
            "shuffle.seed": seed}


_OVERRIDES_HELP = ("filter.*, train.*, shuffle.*, preference.* or decontaminate.* overrides, e.g. filter.max_tokens=2048 "
                   "filter.drop_tool_errors=true train.reasoning=drop decontaminate.against=bench.jsonl")


@app.command()
def stats(
    run_dir: str = typer.Argument(..., help="Run folder."),
    overrides: Optional[List[str]] = typer.Argument(None, help=_OVERRIDES_HELP),
    html: Optional[str] = typer.Option(None, "--html", help="Also write a one-page HTML report with plots to this "
                                       "file (give a folder or '-' for <run>/report.html)."),
    min_reward: Optional[float] = typer.Option(None, help="Keep samples whose reward is >= this."),
    max_reward: Optional[float] = typer.Option(None, help="Also drop samples whose reward is > this."),
    max_per_prompt: Optional[int] = typer.Option(None, help="At most this many samples per prompt."),
    dedup: Optional[str] = typer.Option(None, help="none, exact or near: drop duplicate replies per prompt."),
    validation_fraction: Optional[float] = typer.Option(None, help="Share of prompts for validation/."),
    fmt: Optional[str] = typer.Option(None, "--format", help="messages, prompt_completion, openai or preference; "
                                      "several, comma-separated, write each under train/<format>/."),
    file_format: Optional[str] = typer.Option(None, help="jsonl or parquet."),
    rows_per_shard: Optional[int] = typer.Option(None, help="Rows per shard."),
    seed: Optional[int] = typer.Option(None, help="Shuffle seed."),
) -> None:
    """Print the statistics of a run folder, under its settings or the ones given (calls no model, writes
    nothing but the --html report)."""
    from sft_ray.job import finalize_run

    manifest, filter_cfg, train, shuffle_seed, preference, decontaminate = _recut(
        run_dir, overrides or [], _recut_options(min_reward, max_reward, max_per_prompt, dedup, validation_fraction,
                                                 fmt, file_format, rows_per_shard, seed))
    result = finalize_run(run_dir, filter_cfg, shuffle_seed, train, manifest, typer.echo, write=False,
                          preference=preference, index=_index(decontaminate))
    if html:
        from pathlib import Path

        from sft_ray import io
        from sft_ray.finalize.report_html import render
        from sft_ray.runfolder.layout import REPORT_HTML

        target = io.join(run_dir, REPORT_HTML) if html == "-" else html
        if html != "-" and Path(html).is_dir():
            target = str(Path(html) / REPORT_HTML)
        io.write_bytes(target, render(result, f"sft-ray run {run_dir}").encode())
        typer.echo(f"report: {target}")


@app.command("filter")
def filter_(
    run_dir: str = typer.Argument(..., help="Run folder."),
    overrides: Optional[List[str]] = typer.Argument(None, help=_OVERRIDES_HELP),
    min_reward: Optional[float] = typer.Option(None, help="Keep samples whose reward is >= this (default: the run's)."),
    max_reward: Optional[float] = typer.Option(None, help="Also drop samples whose reward is > this."),
    max_per_prompt: Optional[int] = typer.Option(None, help="At most this many samples per prompt."),
    dedup: Optional[str] = typer.Option(None, help="none, exact or near: drop duplicate replies per prompt."),
    validation_fraction: Optional[float] = typer.Option(None, help="Share of prompts for validation/."),
    fmt: Optional[str] = typer.Option(None, "--format", help="messages, prompt_completion, openai or preference; "
                                      "several, comma-separated, write each under train/<format>/."),
    file_format: Optional[str] = typer.Option(None, help="jsonl or parquet."),
    rows_per_shard: Optional[int] = typer.Option(None, help="Rows per shard (default: the run's)."),
    seed: Optional[int] = typer.Option(None, help="Shuffle seed (default: the run's shuffle.seed)."),
) -> None:
    """Re-cut an existing run: rewrite train/, validation/ and stats.json with new settings (calls no model).
    Refused while a run (or another re-cut) holds the folder's lock; run.json records each re-cut under
    `recuts` and holds its settings as the folder's filter/train/shuffle config."""
    import time

    from sft_ray.job import RunError, benchmark_index, finalize_run
    from sft_ray.runfolder.lock import LockError, RunLock
    from sft_ray.runfolder.manifest import load_manifest, save_manifest

    if load_manifest(run_dir) is None:  # before the lock, which would make the folder
        _fail(f"{run_dir} is not a run folder (no run.json)")
    try:
        lock = RunLock(run_dir, "filter").acquire()
    except LockError as e:  # a live run writes rollouts/, train/, stats.json and run.json: no re-cut under it
        _fail(f"not re-cut: {e}")
    except OSError as e:
        _fail(f"not re-cut: cannot take the lock {RunLock(run_dir).uri}: {e.strerror or e}")
    with lock:
        options = _recut_options(min_reward, max_reward, max_per_prompt, dedup, validation_fraction, fmt,
                                 file_format, rows_per_shard, seed)
        manifest, filter_cfg, train, shuffle_seed, preference, decontaminate = _recut(run_dir, overrides or [], options)
        try:
            stats = finalize_run(run_dir, filter_cfg, shuffle_seed, train, manifest, typer.echo, preference=preference,
                                 index=benchmark_index(decontaminate))
        except RunError as e:
            _fail(f"not re-cut: {e}", e.code)
        cfg = manifest["config"]
        cfg["filter"], cfg["train"], cfg["shuffle"] = filter_cfg, train, {"seed": shuffle_seed}
        cfg["preference"], cfg["decontaminate"] = preference, decontaminate
        # The re-cut as given, kept for good: a later `sft-ray run` of the folder re-finalizes with its own
        # filter/train/shuffle (its config replaces the one above), and this says what was cut before.
        manifest.setdefault("recuts", []).append({
            "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "given": {k: v for k, v in options.items() if v is not None}, "overrides": list(overrides or []),
            "filter": filter_cfg, "train": train, "preference": preference, "shuffle_seed": shuffle_seed,
            "decontaminate": decontaminate,
            "train_rows": stats.get("train_rows"), "validation_rows": stats.get("validation", 0)})
        save_manifest(run_dir, manifest)


@app.command()
def rescore(
    run_dir: str = typer.Argument(..., help="Run folder."),
    overrides: Optional[List[str]] = typer.Argument(None, help="verifier.* or resources.* overrides, e.g. "
                                                    "verifier.type=judge verifier.judge.model.name=gpt-4o-mini"),
    config: Optional[str] = typer.Option(None, "--config", help="A YAML config whose `verifier` (and `resources`) "
                                         "section replaces the run's."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Say how many rows would be scored and, for a priced "
                                 "judge, what it would cost; write nothing."),
) -> None:
    """Score every stored rollout again with another verifier (calls no generation model), then rebuild train/,
    stats.json and the report. Durable: rerun to continue; the old rewards stay under `previous`."""
    from sft_ray.config import ConfigError
    from sft_ray.job import RunError
    from sft_ray.rescore import rescore as run_rescore

    try:
        code = run_rescore(run_dir, config, overrides or [], dry_run=dry_run, say=typer.echo)
    except ConfigError as e:
        _fail(str(e))
    except RunError as e:
        _fail(str(e), e.code)
    raise typer.Exit(code)


@app.command()
def models(
    fetch: bool = typer.Option(False, "--fetch", help="Build the embedded default model now if not cached."),
) -> None:
    """List the models in the local cache (the embedded default is built there on first use)."""
    from sft_ray import models as m

    if fetch:
        m.ensure_default_model(progress=typer.echo)
    cached = m.list_cached()
    typer.echo(f"cache: {m.cache_dir()}")
    if not cached:
        typer.echo(f"  (empty: {m.DEFAULT_MODEL} is built on first use, or now with --fetch)")
    for entry in cached:
        default = "  (default)" if entry["name"] == m.DEFAULT_MODEL else ""
        typer.echo(f"  {entry['name']}  {entry['size_bytes'] / 1e6:.0f} MB  {entry['path']}{default}")


@app.command("serve-mock")
def serve_mock(
    host: str = typer.Option("127.0.0.1", help="Address to bind (keep it on loopback)."),
    port: int = typer.Option(8000, help="Port."),
    latency_ms: float = typer.Option(0.0, help="Delay before each answer."),
    error_rate: float = typer.Option(0.0, help="Share of requests answered 500."),
    rate_limit_rate: float = typer.Option(0.0, help="Share of requests answered 429 with Retry-After."),
    tool_malformed_rate: float = typer.Option(0.0, help="Share of tool calls whose arguments are not JSON."),
    tool_unknown_rate: float = typer.Option(0.0, help="Share of tool calls naming a tool that does not exist."),
    requests_per_minute: float = typer.Option(0.0, help="Enforce a request rate limit (token bucket; 0: none)."),
    tokens_per_minute: float = typer.Option(0.0, help="Enforce a token rate limit (prompt words + max_tokens)."),
    limit_window_s: float = typer.Option(60.0, help="Bucket capacity of those limits, in seconds of refill."),
    batch_delay_s: float = typer.Option(0.0, help="Batch API: seconds a batch waits before it is processed."),
    batch_expire: int = typer.Option(0, help="Batch API: the first N batches expire having run only part of "
                                     "their lines (--batch-expire-keep)."),
    batch_expire_keep: float = typer.Option(0.5, help="Batch API: the share of an expiring batch's lines it runs."),
) -> None:
    """A local OpenAI-compatible server (chat + responses, and the Batch API's files and batches; and Anthropic's
    /v1/messages and Message Batches) that echoes
    prompts, or acts as an agent when a request carries tools (calls one, then answers with its output): for
    trials, tests and benchmarks."""
    from sft_ray.devserver import MockConfig, serve

    serve(MockConfig(latency_ms=latency_ms, error_rate=error_rate, rate_limit_rate=rate_limit_rate,
                     tool_malformed_rate=tool_malformed_rate, tool_unknown_rate=tool_unknown_rate,
                     requests_per_minute=requests_per_minute, tokens_per_minute=tokens_per_minute,
                     limit_window_s=limit_window_s, batch_delay_s=batch_delay_s, batch_expire=batch_expire,
                     batch_expire_keep=batch_expire_keep), host, port)


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        typer.echo("interrupted: rollouts written so far are kept; rerun the same command to resume", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
