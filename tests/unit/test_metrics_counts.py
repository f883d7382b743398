"""sft_ray/metrics.py in process: the advice, the telemetry's counts and spend, and the Grafana
dashboard querying only the series this module exports (e2e/test_metrics.py scrapes them from a real run)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from sft_ray import metrics
from sft_ray.cost import cost_usd
from sft_ray.metrics import BREAKDOWN, RunMetrics, Telemetry, advice

DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "sft-ray.json"


def test_dashboard_queries_are_promql_of_our_metrics_only():
    dash = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    assert exprs and all("ray_sft_ray_" in e for e in exprs)
    queried = set(re.findall(r"\bray_sft_ray_[a-z_]+", json.dumps(dash)))
    names = {re.sub(r"_(bucket|sum|count)$", "", n) for n in queried}
    ours = {"ray_" + v for k, v in vars(metrics).items() if k.isupper() and isinstance(v, str)
            and v.startswith("sft_ray_")}
    assert names <= ours, names - ours


def test_advice_names_the_bottleneck():
    assert advice({"model_s": 92, "verifier_s": 8}) == ("model calls take 92% of the time: raise "
                                                        "num_samples_in_parallel (or resources.generate_actors)")
    assert advice({"model_s": 40, "verifier_s": 60}) == "the verifier takes 60% of the time: raise resources.score_actors"
    assert advice({k: 0 for k in BREAKDOWN}) is None


def test_telemetry_counts_what_the_api_reported_and_what_was_billed():
    t = Telemetry()
    t.attempt("rate_limit", 0.1, None, 100)  # a 429 bills nothing
    t.attempt("server_error", 0.2, None, 100)  # a failure without usage: its input estimate
    t.attempt(None, 0.3, {"input_tokens": 90, "output_tokens": 10})
    m = RunMetrics("r", {"input_per_mtok": 1.0, "output_per_mtok": 2.0}, 1.0, enabled=False)
    m.written(1, 0, [1.0], [t.as_json()], 0.01)
    assert m.counts["requests"] == 3 and m.counts["input_tokens"] == 90 and m.counts["output_tokens"] == 10
    assert m.counts["cost_usd"] == pytest.approx((190 * 1.0 + 10 * 2.0) / 1e6)
    assert m.counts["passed"] == 1 and m.busy["write_s"] == pytest.approx(0.01)


def test_prompt_cache_tokens_are_counted_and_priced_as_stats_json_prices_them():
    t = Telemetry()
    t.attempt(None, 0.3, {"input_tokens": 10, "output_tokens": 5, "cache_creation_input_tokens": 1000,
                          "cache_read_input_tokens": 4000})
    pricing = {"input_per_mtok": 3.0, "output_per_mtok": 15.0}
    m = RunMetrics("r", pricing, None, enabled=False)
    m.written(1, 0, [None], [t.as_json()], 0.0)
    assert m.counts["cache_creation_input_tokens"] == 1000 and m.counts["cache_read_input_tokens"] == 4000
    assert m.counts["cost_usd"] == pytest.approx(cost_usd(10, 5, pricing, 1000, 4000))
    assert m.counts["cost_usd"] == pytest.approx((10 * 3 + 5 * 15 + 1000 * 3.75 + 4000 * 0.3) / 1e6)


def test_merge_starts_from_zero_for_a_row_without_telemetry():
    # Journal recovery scores rows whose telemetry column is all null: in a batch that is NaN (seen:
    # orjson raised in the score stage and the vLLM judge's recovery run failed), or None, or "".
    import math

    import orjson

    from sft_ray import metrics

    for missing in (None, "", float("nan"), math.nan):
        assert orjson.loads(metrics.merge(missing, verifier_s=1.5)) == {"verifier_s": 1.5}
    assert orjson.loads(metrics.merge('{"verifier_s": 1.0, "model_s": 2.0}', verifier_s=0.5)) == {
        "verifier_s": 1.5, "model_s": 2.0}


def test_the_linger_reads_its_rows_on_the_export_port_and_survives_what_is_not_an_exposition():
    from sft_ray.metrics import series_sum

    body = ('# TYPE ray_sft_ray_rows_written_total counter\n'
            'ray_sft_ray_rows_written_total{WorkerId="a",run="r"} 3.0\n'
            'ray_sft_ray_rows_written_total{WorkerId="b",run="r"} 4.0\n'
            'ray_sft_ray_rows_written_total{WorkerId="c",run="other"} 9.0\n')
    assert series_sum(body, "ray_sft_ray_rows_written_total", "r") == 7.0
    assert series_sum(body, "ray_sft_ray_rows_written_total", "absent") is None
    for hostile in ("garbage {{{ 1 2 3\n", "<html>not metrics</html>", "ray_sft_ray_rows_written_total{run=\"r\" 1\n", ""):
        assert series_sum(hostile, "ray_sft_ray_rows_written_total", "r") is None
