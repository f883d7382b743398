"""Rewards from outside (a NeMo Gym server's /verify, a user's Python function) are checked:
a value that is not a finite number, or is outside verifier.reward_range, is a verifier_error
naming the value, never a reward (issue 22 item 9)."""

from __future__ import annotations

import pytest
from conftest import make_config, read_rows, write_jsonl
from nemo_gym_server import NemoGymServer
from test_agent import nemo_row

from sft_ray.devserver import MockConfig, MockServer
from sft_ray.job import run


@pytest.mark.usefixtures("ray_cluster")
def test_nemo_gym_rewards_that_are_not_numbers_in_range_are_verifier_errors(tmp_path):
    forced = {"seven": 7, "string": "1", "true": True, "negative": -0.5, "half": 0.5, "null": None}
    rows = [nemo_row(i, '[[tool:get_weather {"city": "x"}]]', id=name, force_reward=value)
            for i, (name, value) in enumerate(forced.items())]
    with MockServer(MockConfig()) as server, NemoGymServer() as gym:
        inp = write_jsonl(tmp_path / "in.jsonl", rows)
        cfg = make_config(tmp_path, server, inp, "environment.type=nemo_gym", f"environment.base_url={gym.base_url}",
                          "verifier.type=nemo_gym", "max_error_fraction=1")
        run(cfg, say=lambda s: None)
    out = {r["id"]: r for r in read_rows(tmp_path / "run" / "rollouts")}
    failed = {r["id"]: r for r in read_rows(tmp_path / "run" / "failed")}
    assert set(out) == {"half"} and out["half"]["reward"] == 0.5
    messages = {k: r["error"]["message"] for k, r in failed.items()}
    assert all(r["error"]["type"] == "verifier_error" and r["reward"] is None for r in failed.values())
    assert "reward 7 is outside verifier.reward_range [0, 1]" in messages["seven"]
    assert "not a number: '1'" in messages["string"]
    assert "not a number: True" in messages["true"]
    assert "reward -0.5 is outside" in messages["negative"]
    assert "not a number: None" in messages["null"]
    train = read_rows(tmp_path / "run" / "train") if (tmp_path / "run" / "train").exists() else []
    assert all(r.get("reward", 0.5) == 0.5 for r in train)
