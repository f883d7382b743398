"""Tokens and money: the cost arithmetic and stats.json's `spend` section."""

from __future__ import annotations

import pytest

from sft_ray.cost import batch_prices, cost_usd, priced, spend_summary


def test_cost_arithmetic_and_stats_section():
    assert cost_usd(1_000_000, 2_000_000, {"input_per_mtok": 0.15, "output_per_mtok": 0.60}) == pytest.approx(1.35)
    manifest = {"config": {"pricing": {"input_per_mtok": 1.0, "output_per_mtok": 4.0}},
                "sessions": [{"spend": {"requests": 12, "rate_limited": 2, "cost_usd": 0.5}},
                             {"spend": {"requests": 8, "rate_limited": 0, "cost_usd": 0.25}}]}
    spend = spend_summary({"tokens": {"input_tokens": 500_000, "output_tokens": 250_000}, "samples": 10,
                           "expected": 40}, manifest)
    assert spend["cost_usd"] == pytest.approx(1.5) and spend["projected_cost_usd"] == pytest.approx(6.0)
    assert spend["requests"] == 20 and spend["rate_limited"] == 2 and spend["billed_usd"] == pytest.approx(0.75)


def test_a_price_is_set_only_by_a_per_token_price():
    assert not priced(None) and not priced({}) and not priced({"batch_discount": 0.5})
    assert not priced({"input_per_mtok": 0, "output_per_mtok": None})
    assert priced({"output_per_mtok": 0.6}) and priced({"input_per_mtok": "0.15"})
    assert cost_usd(10, 10, None) == 0 and cost_usd(10, 10, {"batch_discount": 0.5}) == 0


def test_batch_prices_apply_the_discount_to_both_prices():
    assert batch_prices({"input_per_mtok": 1.0, "output_per_mtok": 4.0}) == {
        "input_per_mtok": 0.5, "output_per_mtok": 2.0}
    assert batch_prices({"input_per_mtok": 1.0, "output_per_mtok": 4.0, "batch_discount": 0.25}) == {
        "input_per_mtok": 0.25, "output_per_mtok": 1.0, "batch_discount": 0.25}


def test_spend_of_a_batch_run_with_a_priced_judge():
    manifest = {"config": {"pricing": {"input_per_mtok": 1.0, "output_per_mtok": 4.0},
                           "model": {"batch": {"enabled": True}}}}
    stats = {"tokens": {"input_tokens": 1_000_000, "output_tokens": 1_000_000}, "samples": 10, "expected": 10,
             "judge_tokens": {"input_tokens": 7, "output_tokens": 3}, "judge_cost_usd": 0.1234567}
    spend = spend_summary(stats, manifest)
    assert spend["pricing"]["input_per_mtok"] == 0.5 and spend["cost_usd"] == pytest.approx(2.5)  # batch: half
    assert spend["judge_input_tokens"] == 7 and spend["judge_output_tokens"] == 3
    assert spend["judge_cost_usd"] == 0.123457 and spend["total_cost_usd"] == pytest.approx(2.623457)
    assert "projected_cost_usd" not in spend  # nothing pending
    assert "requests" not in spend and "billed_usd" not in spend  # no session recorded its spend
    assert spend_summary({}, None) == {"input_tokens": 0, "output_tokens": 0, "cost_usd": 0.0, "pricing": {},
                                       "total_cost_usd": 0.0}

def test_spend_shows_the_judge_apart_and_in_the_total():
    from sft_ray.cost import spend_summary
    from sft_ray.finalize.stats import StatsAccumulator, format_report

    acc = StatsAccumulator()
    for i in range(4):
        acc.add({"id": str(i), "sample_index": 0, "reward": 1.0, "usage": {"input_tokens": 100, "output_tokens": 50},
                 "metrics": {"judge.judge_input_tokens": 300, "judge.judge_output_tokens": 4,
                             "judge.judge_cost_usd": 0.25}}, failed=False)
    stats = {**acc.result(), "expected": 8}
    manifest = {"config": {"pricing": {"input_per_mtok": 1000.0, "output_per_mtok": 4000.0}}}
    spend = spend_summary(stats, manifest)
    assert spend["cost_usd"] == pytest.approx(4 * (100 * 1000 + 50 * 4000) / 1e6)  # generation: 1.2
    assert spend["judge_cost_usd"] == pytest.approx(1.0)
    assert spend["judge_input_tokens"] == 1200 and spend["judge_output_tokens"] == 16
    assert spend["total_cost_usd"] == pytest.approx(2.2)
    assert spend["projected_cost_usd"] == pytest.approx(4.4)  # half the samples done: the total, doubled
    assert "spend: $2.2000 (generation $1.2000, judge $1.0000)" in format_report({**acc.result(), "spend": spend})
    unpriced = StatsAccumulator()
    unpriced.add({"id": "a", "sample_index": 0, "reward": 1.0, "metrics": {"judge_input_tokens": 3}}, failed=False)
    spend = spend_summary(unpriced.result(), manifest)
    assert "judge_cost_usd" not in spend and spend["total_cost_usd"] == spend["cost_usd"] == 0
