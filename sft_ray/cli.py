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
    from sft_ray.config import ConfigError, load_config

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
) -> None:
    """Run the whole job: generate, score, filter, shuffle, shard, report. Rerun to resume."""
    cfg = _load(config, overrides or [])
    from sft_ray.config import ConfigError
    from sft_ray.pipeline import RunError
    from sft_ray.pipeline import run as run_job

    try:
        cfg.model.secret_headers()  # an unset variable stops the run before Ray starts
        if dry_run:
            from sft_ray.dryrun import dry_run as plan

            plan(cfg, pilot, typer.echo)
            raise typer.Exit(0)
        code = run_job(cfg, restart=restart)
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


@app.command()
def stats(run_dir: str = typer.Argument(..., help="Run folder.")) -> None:
    """Print the statistics of an existing run folder (calls no model, writes nothing)."""
    from sft_ray.pipeline import finalize_run
    from sft_ray.resume import load_manifest

    manifest = load_manifest(run_dir)
    if manifest is None:
        _fail(f"{run_dir} is not a run folder (no run.json)")
    cfg = manifest.get("config", {})
    finalize_run(run_dir, cfg.get("filter", {"min_reward": 0.0}), cfg.get("shuffle", {}).get("seed", 0),
                 cfg.get("train", {"rows_per_shard": 10_000}), manifest, typer.echo, write=False)


@app.command("filter")
def filter_(
    run_dir: str = typer.Argument(..., help="Run folder."),
    min_reward: float = typer.Option(..., help="Keep samples whose reward is >= this."),
    max_reward: Optional[float] = typer.Option(None, help="Also drop samples whose reward is > this."),
    seed: Optional[int] = typer.Option(None, help="Shuffle seed (default: the run's shuffle.seed)."),
    rows_per_shard: Optional[int] = typer.Option(None, help="Rows per shard (default: the run's)."),
    fmt: Optional[str] = typer.Option(None, "--format", help="jsonl or parquet (default: the run's)."),
) -> None:
    """Re-filter an existing run: rewrite train/ and stats.json with a new threshold (calls no model)."""
    from sft_ray.config import FilterConfig, TrainConfig
    from sft_ray.pipeline import finalize_run
    from sft_ray.resume import load_manifest, save_manifest

    manifest = load_manifest(run_dir)
    if manifest is None:
        _fail(f"{run_dir} is not a run folder (no run.json)")
    cfg = manifest.setdefault("config", {})
    try:
        flt = FilterConfig(**{**cfg.get("filter", {}), "min_reward": min_reward, "max_reward": max_reward})
        train = TrainConfig(**{**cfg.get("train", {}), **({"rows_per_shard": rows_per_shard} if rows_per_shard else {}),
                               **({"format": fmt} if fmt else {})})
    except ValueError as e:
        _fail(str(e))
    shuffle_seed = seed if seed is not None else cfg.get("shuffle", {}).get("seed", 0)
    finalize_run(run_dir, flt.model_dump(), shuffle_seed, train.model_dump(), manifest, typer.echo)
    cfg["filter"], cfg["train"], cfg["shuffle"] = flt.model_dump(), train.model_dump(), {"seed": shuffle_seed}
    save_manifest(run_dir, manifest)


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
    requests_per_minute: float = typer.Option(0.0, help="Enforce a request rate limit (token bucket; 0: none)."),
    tokens_per_minute: float = typer.Option(0.0, help="Enforce a token rate limit (prompt words + max_tokens)."),
    limit_window_s: float = typer.Option(60.0, help="Bucket capacity of those limits, in seconds of refill."),
) -> None:
    """A local OpenAI-compatible server (chat + responses) that echoes prompts: for trials, tests and benchmarks."""
    from sft_ray.devserver import MockConfig, serve

    serve(MockConfig(latency_ms=latency_ms, error_rate=error_rate, rate_limit_rate=rate_limit_rate,
                     requests_per_minute=requests_per_minute, tokens_per_minute=tokens_per_minute,
                     limit_window_s=limit_window_s), host, port)


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        typer.echo("interrupted: rollouts written so far are kept; rerun the same command to resume", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
