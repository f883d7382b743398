"""``distributed_executor_backend: uni`` on a CPU: vLLM turns it back into ``mp`` unless
VLLM_ENABLE_V1_MULTIPROCESSING=0, which sft-ray sets for it; a user's own setting always wins, and
nothing is set for any other choice. Engines run so: tests/e2e/test_vllm.py."""

from __future__ import annotations

import os

import pytest

from sft_ray.backends.vllm import _model_in_engine_core

VAR = "VLLM_ENABLE_V1_MULTIPROCESSING"


@pytest.fixture
def env(monkeypatch):
    monkeypatch.delenv(VAR, raising=False)
    return monkeypatch


def test_uni_runs_the_model_in_the_engine_core(env):
    kwargs = {"max_model_len": 512, "distributed_executor_backend": "uni"}
    _model_in_engine_core(kwargs)
    assert kwargs == {"max_model_len": 512, "distributed_executor_backend": "uni"}
    assert os.environ[VAR] == "0"


@pytest.mark.parametrize("kwargs", [{}, {"tensor_parallel_size": 2}, {"distributed_executor_backend": "mp"},
                                    {"distributed_executor_backend": "ray"}])
def test_any_other_choice_is_left_to_vllm(env, kwargs):
    before = dict(kwargs)
    _model_in_engine_core(kwargs)
    assert kwargs == before
    assert VAR not in os.environ


@pytest.mark.parametrize("value", ["1", "0"])
def test_the_users_own_setting_is_left_alone(env, value):
    env.setenv(VAR, value)
    _model_in_engine_core({"distributed_executor_backend": "uni"})
    assert os.environ[VAR] == value
