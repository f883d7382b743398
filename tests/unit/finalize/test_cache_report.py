"""Prompt caching in stats.json and the report: cache tokens counted only when an API reports them,
priced, and what caching saved said in a line."""

from __future__ import annotations

import pytest

from sft_ray.cost import spend_summary
from sft_ray.finalize.stats import StatsAccumulator, format_report


def _rollout(usage):
    return {"id": "r", "sample_index": 0, "usage": usage, "error": None, "reward": 1.0, "finish_reason": "stop"}


def test_cache_tokens_are_counted_priced_and_reported():
    acc = StatsAccumulator()
    acc.add(_rollout({"input_tokens": 10, "output_tokens": 5, "cache_creation_input_tokens": 1000,
                      "cache_read_input_tokens": 9000, "total_tokens": 10015}), failed=False)
    acc.add(_rollout({"input_tokens": 20, "output_tokens": 5, "total_tokens": 25}), failed=False)
    stats = acc.result()
    assert stats["tokens"]["cache_creation_input_tokens"] == 1000
    assert stats["tokens"]["cache_read_input_tokens"] == 9000
    manifest = {"config": {"pricing": {"input_per_mtok": 3.0, "output_per_mtok": 15.0}}}
    stats["spend"] = spend_summary(stats, manifest)
    # 30 input at $3, 10 output at $15, 1000 written at $3.75, 9000 read at $0.30 (per million)
    assert stats["spend"]["cost_usd"] == pytest.approx((30 * 3 + 10 * 15 + 1000 * 3.75 + 9000 * 0.3) / 1e6)
    assert stats["spend"]["cache_saved_usd"] == pytest.approx((9000 * 2.7 - 1000 * 0.75) / 1e6)
    text = format_report(stats)
    assert "cache write 1000  cache read 9000" in text
    assert "prompt caching: 9000 input tokens read from the cache, 1000 written to it; saved $0.0236" in text


def test_no_cache_keys_without_caching():
    acc = StatsAccumulator()
    acc.add(_rollout({"input_tokens": 20, "output_tokens": 5, "total_tokens": 25}), failed=False)
    stats = acc.result()
    assert set(stats["tokens"]) == {"input_tokens", "output_tokens", "total_tokens"}
    assert "cache_saved_usd" not in spend_summary(stats, {"config": {"pricing": {"input_per_mtok": 1.0}}})
