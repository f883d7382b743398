"""Rewards from outside (a NeMo Gym server's /verify, a user's Python function) are checked:
a value that is not a finite number, or is outside verifier.reward_range, is a verifier_error
naming the value, never a reward (issue 22 item 9)."""

from __future__ import annotations

import asyncio

import orjson
import pytest
from conftest import make_config, read_rows, write_jsonl
from nemo_gym_server import NemoGymServer
from test_agent import nemo_row

from sft_ray.config import ConfigError
from sft_ray.configload import load_config
from sft_ray.devserver import MockConfig, MockServer
from sft_ray.job import run
from sft_ray.stages.score import ScoreStage


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


def _score(stage: ScoreStage, rows: list[dict]) -> list[dict]:
    batch = {"id": [str(i) for i in range(len(rows))], "sample_index": [0] * len(rows),
             "failed": [False] * len(rows), "ready_at": [1.0] * len(rows),
             "rollout": [orjson.dumps(r).decode() for r in rows]}
    return [orjson.loads(t) for t in asyncio.run(stage(batch))["rollout"]]


def test_python_verifier_rewards_are_checked_against_the_range(tmp_path):
    f = tmp_path / "rewards.py"
    f.write_text("import math\n"
                 "def score(row, response):\n"
                 "    return {'reward': {'nan': math.nan, 'inf': math.inf, 'str': '1', 'big': 2.5,\n"
                 "                       'neg': -1.0, 'ok': 0.25, 'bool': True}[row['kind']]}\n")
    kinds = ["nan", "inf", "str", "big", "neg", "ok", "bool"]
    rows = [{"kind": k, "response": "r"} for k in kinds]
    cfg = load_config(None, ["input=x", "output=y", "model.name=m", "verifier.type=python",
                             f"verifier.function={f}:score"])
    scored = dict(zip(kinds, _score(ScoreStage(cfg.verifier.model_dump()), rows)))
    assert scored["ok"]["reward"] == 0.25 and scored["bool"]["reward"] == 1.0  # a bool from Python is 0/1
    for k in ("nan", "inf", "str", "big", "neg"):
        assert scored[k]["reward"] is None and scored[k]["error"]["type"] == "verifier_error", scored[k]
    assert "returned a NaN reward" in scored["nan"]["error"]["message"]
    assert "returned a reward of inf" in scored["inf"]["error"]["message"]
    assert "reward 2.5 is outside verifier.reward_range [0, 1]" in scored["big"]["error"]["message"]
    assert "'1'" in scored["str"]["error"]["message"]
    # A wider range, for rewards that are meant to be negative.
    wide = load_config(None, ["input=x", "output=y", "model.name=m", "verifier.type=python",
                              f"verifier.function={f}:score", "verifier.reward_range=[-1, 5]"])
    scored = dict(zip(kinds, _score(ScoreStage(wide.verifier.model_dump()), rows)))
    assert scored["big"]["reward"] == 2.5 and scored["neg"]["reward"] == -1.0


def test_reward_range_must_be_a_range():
    with pytest.raises(ConfigError, match="reward_range"):
        load_config(None, ["input=x", "output=y", "model.name=m", "verifier.reward_range=[1, 0]"])
