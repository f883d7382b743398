"""When a Batch API run brings Ray up for its metrics (job.batch_exports_metrics): config only, no Ray."""

from __future__ import annotations

import pytest

from sft_ray.configload import load_config
from sft_ray.job import batch_exports_metrics

BASE = ["input=in.jsonl", "output=run", "model.name=m", "model.base_url=http://127.0.0.1:1/v1", "model.batch.enabled=true"]


@pytest.mark.parametrize("overrides, env, exports", [
    ([], None, False),  # a local run without export_port: progress.json alone, no Ray started for it
    (["metrics.export_port=9100"], None, True),  # asked to export on this machine
    (["resources.ray_address=ray://head:10001"], None, True),  # on a cluster: its Prometheus scrapes Ray
    ([], "auto", True),  # RAY_ADDRESS, as `ray job submit` sets it
    (["resources.ray_address=ray://head:10001", "metrics.enabled=false"], None, False),
    ([], "local", False),
])
def test_a_batch_run_brings_ray_up_for_its_metrics_where_they_are_scraped(monkeypatch, overrides, env, exports):
    if env is None:
        monkeypatch.delenv("RAY_ADDRESS", raising=False)
    else:
        monkeypatch.setenv("RAY_ADDRESS", env)
    assert batch_exports_metrics(load_config(None, BASE + overrides)) is exports
