"""A verifier's reward is checked against verifier.reward_range in the score stage (in process):
NaN, inf, a string or a reward out of range is a verifier error, never a reward.
(NeMo Gym's rewards through a real run: tests/e2e/test_reward_range.py.)"""

from __future__ import annotations

import asyncio

import orjson
import pytest

from sft_ray.config import ConfigError
from sft_ray.configload import load_config
from sft_ray.stages.score import ScoreStage


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
