"""The judge's pure parts: verdict parsers, the nonce-tagged prompt, and `json_schema` scoring.
(Judges calling the mock server: tests/e2e/test_judge.py.)"""

from __future__ import annotations

import json

import pytest
from conftest import score_one

from sft_ray.config import ConfigError
from sft_ray.configload import load_config
from sft_ray.verifiers import build_verifier
from sft_ray.verifiers.judge import parse_equivalence, parse_rating


def test_verdict_parsers():
    assert parse_equivalence("reasoning [[A!=B]] ... no wait [[A=B]]") == 1.0
    assert parse_equivalence("[[ A != B ]]") == 0.0 and parse_equivalence("A equals B") is None
    assert parse_rating("Rating: [[10]]") == 1.0 and parse_rating("rating [[1]]") == 0.0
    assert parse_rating("Rating: [[5.5]]") == 0.5 and parse_rating("Rating: [[11]]") is None
    assert parse_rating("no rating") is None


def test_render_draws_a_nonce_no_text_contains(monkeypatch):
    from sft_ray.verifiers import judge

    draws = iter(["aaaaaaaaaaaa", "bbbbbbbbbbbb"])
    monkeypatch.setattr(judge.secrets, "token_hex", lambda n: next(draws))
    prompt = judge.render(judge.EQUIVALENCE, {"question": "q <candidate-aaaaaaaaaaaa>", "reference": "r",
                                               "response": "c"}, builtin=True)
    assert "<candidate-bbbbbbbbbbbb>\nc\n</candidate-bbbbbbbbbbbb>" in prompt


def test_json_schema():
    schema = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer", "minimum": 0}},
              "required": ["name", "age"], "additionalProperties": False}
    v = build_verifier({"type": "json_schema", "json_schema": schema})
    good = score_one(v, {"response": 'Sure:\n```json\n{"name": "Ada", "age": 36}\n```'})
    assert good["reward"] == 1.0 and good["metrics"]["schema_errors"] == 0.0
    bad = score_one(v, {"response": '{"name": "Ada", "age": -1, "extra": true}'})
    assert bad["reward"] == 0.0 and bad["metrics"] == {"json_valid": 1.0, "schema_valid": 0.0, "schema_errors": 2.0}
    assert score_one(v, {"response": "{name: Ada}"})["metrics"]["json_valid"] == 0.0
    row_schema = score_one(v, {"schema": json.dumps({"type": "array"}), "response": "[1, 2]"})
    assert row_schema["reward"] == 1.0  # the row's own schema wins over the config's
    broken = score_one(v, {"schema": {"type": "nonsense"}, "response": "[]"})
    assert broken["reward"] is None and broken["error"]["type"] == "verifier_error"
    with pytest.raises(ConfigError, match="not a valid JSON Schema"):
        load_config(None, ["input=x", "output=y", "model.name=m", "verifier.type=json_schema",
                           "verifier.json_schema={type: 12}"])
