"""The hosted backend's pure rules: a refused parameter read from the server's error, omit_params
and the config fingerprint, the request timeout scaled by the output asked for. (The backend over
real sockets: tests/e2e/test_openai_backend.py.)"""

from __future__ import annotations

import pytest

from sft_ray.backends.openai import refused_param, request_timeout_s
from sft_ray.config import ConfigError, OpenAIModelConfig
from sft_ray.configload import load_config
from sft_ray.runfolder.manifest import config_fingerprint


def test_refused_parameter_is_read_from_code_and_from_words():
    body = b'{"error": {"message": "x", "param": "top_p", "code": "unsupported_parameter"}}'
    assert refused_param(body) == "top_p"
    words = (b'{"error": {"message": "Unsupported value: \'temperature\' does not support 0.7 with this model. '
             b'Only the default (1) value is supported.", "code": null}}')
    assert refused_param(words) == "temperature"
    assert refused_param(b'{"error": {"message": "This model\'s maximum context length is 8 tokens"}}') is None
    assert refused_param(b"not json") is None


def test_omit_params_names_sampling_keys_and_leaves_the_fingerprint_alone():
    base = ["input=x", "output=y", "model.name=o3"]
    cfg = load_config(None, base + ["model.omit_params=[temperature, top_p, temperature]"])
    assert cfg.model.omit_params == ["temperature", "top_p"]
    with pytest.raises(ConfigError, match="model.omit_params: .*not a responses_create_params key: temprature"):
        load_config(None, base + ["model.omit_params=[temprature]"])
    with pytest.raises(ConfigError, match="omit_params applies to the openai / anthropic backend"):
        load_config(None, ["input=x", "output=y", "model.backend=vllm", "model.omit_params=[top_p]"])
    # A judge's server-compatibility and price keys may change on a resume (they are not what it produces).
    judge = ["verifier.type=judge", "verifier.judge.model.name=j"]
    plain = config_fingerprint(load_config(None, base + judge))
    tuned = config_fingerprint(load_config(None, base + judge + [
        "verifier.judge.model.omit_params=[temperature]", "verifier.judge.pricing.input_per_mtok=3",
        "verifier.judge.model.timeout_per_1k_output_tokens_s=60"]))
    assert plain == tuned
    assert plain != config_fingerprint(load_config(None, base + judge + ["verifier.judge.template=score"]))


def test_request_timeout_scales_with_the_requested_output_tokens():
    model = OpenAIModelConfig(name="m", timeout_s=120).model_dump()
    assert request_timeout_s(model, {}) == 120  # no limit asked: the base
    assert request_timeout_s(model, {"max_output_tokens": 1024}) == 120  # small requests: as before
    assert request_timeout_s(model, {"max_output_tokens": 32768}) == pytest.approx(120 + 20 * 31.744)
    model["timeout_per_1k_output_tokens_s"] = 0
    assert request_timeout_s(model, {"max_output_tokens": 32768}) == 120
