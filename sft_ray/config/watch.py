"""Watching a run: ``metrics`` (Prometheus through Ray's metrics) and ``report`` (the live view in the run folder)."""

from __future__ import annotations

from pydantic import Field

from sft_ray.config.base import Strict


class MetricsConfig(Strict):
    """Prometheus metrics through Ray's own metrics system (`ray_sft_ray_*` series with a `run` tag; see
    docs/clusters.md). On a cluster started with `ray start --metrics-export-port`, nothing needs setting."""

    enabled: bool = Field(
        True, description="Export the run's metrics through Ray (false: none; progress.json, report.html and "
        "timing.breakdown stay).")
    export_port: int | None = Field(
        None, ge=1, le=65535, description="For a local run: open Ray's metrics export port on this port of the "
        "local node (Prometheus scrapes http://HOST:PORT/metrics); null: Ray's default (a cluster's own setting).")
    linger_s: float = Field(
        30.0, ge=0, description="With export_port: at its end a local run keeps Ray up until its final values "
        "show on the export port (Ray exports every 10 s; at most 180 s), then this many seconds more so that "
        "Prometheus scrapes them (at least your scrape interval).")


class ReportConfig(Strict):
    """The live view in the run folder: progress.json and report.html, rewritten while the run works."""

    interval_s: float = Field(
        60.0, gt=0, description="Seconds between rewrites of progress.json and report.html while the run works "
        "(each atomically); the final ones replace them at the end.")
