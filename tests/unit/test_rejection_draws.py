"""Rejection sampling's pure parts: its config rules, how one prompt draws (bounds, retries first,
a failure stops it), and the report's sequential statistics. (Runs: tests/e2e/test_rejection.py.)"""

from __future__ import annotations

import asyncio
import json

import pytest

from sft_ray.config import ConfigError
from sft_ray.configload import load_config
from sft_ray.rejection import PromptDraws, draw_prompt


def test_config_rules(tmp_path):
    base = [f"input={tmp_path}/in.jsonl", f"output={tmp_path}/run", "model.name=m"]
    with pytest.raises(ConfigError, match="go together"):
        load_config(None, base + ["rejection.target_passing=2"])
    with pytest.raises(ConfigError, match="at least rejection.target_passing"):
        load_config(None, base + ["rejection.target_passing=4", "rejection.max_samples=2", "filter.min_reward=1"])
    with pytest.raises(ConfigError, match="set filter.min_reward"):
        load_config(None, base + ["rejection.target_passing=1", "rejection.max_samples=2"])
    with pytest.raises(ConfigError, match="leave num_repeats at 1"):
        load_config(None, base + ["rejection.target_passing=1", "rejection.max_samples=2", "filter.min_reward=1",
                                  "num_repeats=4"])
    with pytest.raises(ConfigError, match="needs a verifier"):
        load_config(None, base + ["rejection.target_passing=1", "rejection.max_samples=2", "filter.min_reward=1",
                                  "verifier.type=none"])
    with pytest.raises(ConfigError, match="use a hosted judge"):
        load_config(None, base + ["rejection.target_passing=1", "rejection.max_samples=2", "filter.min_reward=1",
                                  "verifier.type=judge", "verifier.judge.model.backend=vllm"])
    load_config(None, base + ["rejection.target_passing=1", "rejection.max_samples=2", "filter.min_reward=1"])


def _draw(passes, draws: PromptDraws, target: int, max_samples: int, fail: set[int] = frozenset()):
    in_flight, most, launched = 0, 0, []

    async def sample(k: int):
        nonlocal in_flight, most
        launched.append(k)
        in_flight += 1
        most = max(most, in_flight)
        await asyncio.sleep(0.001 * (k % 3))
        in_flight -= 1
        if k in fail:
            return {"error": {"type": "server_error"}, "reward": None}
        return {"error": None, "reward": float(passes(k))}

    got = asyncio.run(draw_prompt(sample, draws, target, max_samples, 1.0))
    assert sorted(launched) == sorted(k for k, _ in got)
    return launched, most


def test_draw_prompt_bounds():
    # Everything passes: exactly the target, all in flight together.
    ks, most = _draw(lambda k: True, PromptDraws(), 3, 10)
    assert sorted(ks) == [0, 1, 2] and most == 3
    # Nothing passes: exactly max_samples, never more in flight than still needed.
    ks, most = _draw(lambda k: False, PromptDraws(), 3, 7)
    assert sorted(ks) == list(range(7)) and most <= 3
    # A prompt that stood at 1 passing of 2 drawn, with sample 1 to retry: retried first, then new indices.
    ks, _ = _draw(lambda k: k in (1, 4), PromptDraws(passing=1, done=2, next=3, retry=[1]), 3, 10)
    assert ks[0] == 1 and sorted(ks) == [1, 3, 4]
    # A failure stops the prompt (what was in flight still comes back).
    ks, _ = _draw(lambda k: False, PromptDraws(), 2, 10, fail={0})
    assert 0 in ks and len(ks) <= 2


def test_report_gives_sequential_statistics_not_biased_pass_at_k(tmp_path):
    """Prompts stop drawing once they pass: pass@k over what was drawn is biased (here @8 is 0 while @1
    is 0.46). The report gives the samples to the first pass and the passing share per prompt instead."""
    from sft_ray.finalize.passes import finalize
    from sft_ray.finalize.stats import format_report

    verdicts = {"a": [0, 0, 1], "b": [1], "c": [0] * 8, "d": [0, 1]}  # by sample index
    rows = [{"id": rid, "sample_index": k, "messages": [{"role": "user", "content": rid},
                                                        {"role": "assistant", "content": f"{rid}{k}"}],
             "response": f"{rid}{k}", "reward": float(v), "error": None, "finish_reason": "stop",
             "usage": {"input_tokens": 1, "output_tokens": 1}}
            for rid, vs in verdicts.items() for k, v in enumerate(vs)]
    (tmp_path / "rollouts").mkdir()
    # written out of draw order (as concurrent draws and reruns write them)
    (tmp_path / "rollouts" / "part-000-00000.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[::-1]))
    stats = finalize(str(tmp_path), {"min_reward": 1.0}, 0, {}, write=False,
                     rejection={"target_passing": 1, "max_samples": 8})
    assert "pass_at_k" not in stats["prompts"] and "all_pass" not in stats["prompts"]
    rej = stats["rejection"]
    assert rej["samples_to_first_pass"] == {"prompts": 3, "mean": 2.0, "histogram": {"1": 1, "2": 1, "3": 1}}
    assert rej["passing_share_per_prompt"] == pytest.approx((1 / 3 + 1 + 0 + 1 / 2) / 4, abs=1e-4)
    report = format_report(stats)
    assert "pass@k:" not in report and "samples to the first pass: mean 2.00 over 3 prompt(s) (1: 1, 2: 1, 3: 1)" \
        in report and "passing share per prompt: mean 0.458" in report

    # The same samples drawn with a fixed num_repeats (no rejection section): pass@k is unbiased there.
    fixed = finalize(str(tmp_path), {"min_reward": 1.0}, 0, {}, write=False)
    assert "pass_at_k" in fixed["prompts"] and "rejection" not in fixed and "pass@k:" in format_report(fixed)
