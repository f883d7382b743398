"""The hosted backend over real sockets against the mock server: both APIs, retries, errors, secrets."""

from __future__ import annotations

import asyncio
import time

import pytest

from sft_ray.backends.base import GenerationRequest, Secret
from sft_ray.backends.openai import OpenAIBackend
from sft_ray.config import OpenAIModelConfig
from sft_ray.devserver import MockConfig, MockServer


def backend(server, **kw):
    model = OpenAIModelConfig(name=kw.pop("name", "mock"), base_url=server.url, timeout_s=kw.pop("timeout_s", 1.0),
                        base_retry_wait_s=0.01, max_retry_wait_s=kw.pop("max_retry_wait_s", 0.5), **kw).model_dump()
    model["api_key"] = Secret("sk-test-SECRET-123")
    return OpenAIBackend(model, requests_per_actor=8)


def gen(b, prompts, params=None):
    async def go():
        await b.start()
        try:
            return await asyncio.gather(*(b.generate(GenerationRequest([{"role": "user", "content": p}],
                                                                      dict(params or {"seed": 1})))
                                          for p in prompts))
        finally:
            await b.close()
    return asyncio.run(go())


@pytest.mark.parametrize("api", ["chat", "responses"])
def test_both_apis_answer_with_usage_and_finish_reason(api, mock_server):
    mock_server.state.keep_bodies = 5
    [r] = gen(backend(mock_server, api=api), ["one two three"], {"max_output_tokens": 2, "temperature": 0.3,
                                                                 "seed": 9})
    assert r.error is None
    assert r.text == "one two"
    assert r.finish_reason == "length"
    assert r.usage == {"input_tokens": 3, "output_tokens": 2, "total_tokens": 5}
    body = mock_server.state.bodies[-1]
    if api == "chat":
        assert body["max_tokens"] == 2 and body["seed"] == 9 and body["messages"][0]["content"] == "one two three"
    else:
        assert body["max_output_tokens"] == 2 and "seed" not in body and body["input"][0]["role"] == "user"
    assert mock_server.state.auth_headers == {"Bearer sk-test-SECRET-123"}


@pytest.mark.parametrize("marker, attempts", [("[[fail:500:2]]", 3), ("[[fail:429:3]]", 4),
                                              ("[[fail:malformed:1]]", 2), ("[[fail:timeout:1]]", 2)])
def test_transient_failures_are_retried(marker, attempts, mock_server):
    [r] = gen(backend(mock_server), [f"hello {marker}"])
    assert r.error is None, r.error
    assert r.attempts == attempts


def test_retry_after_is_honoured():
    with MockServer(MockConfig(retry_after_s=0.4)) as server:
        t0 = time.perf_counter()
        [r] = gen(backend(server), ["x [[fail:429:2]]"])
        elapsed = time.perf_counter() - t0
    assert r.error is None and r.attempts == 3
    assert elapsed >= 0.8  # two waits of at least Retry-After, though base backoff is 10 ms


def test_retries_run_out_into_a_classified_error(mock_server):
    [r] = gen(backend(mock_server, max_retries=2), ["x [[fail:500:10]]"])
    assert r.error["type"] == "server_error" and r.attempts == 3
    assert "after 3 attempts" in r.error["message"]


def test_context_length_is_not_retried(mock_server):
    [r] = gen(backend(mock_server), ["too long [[status:400]]"])
    assert r.error["type"] == "context_length" and r.attempts == 1


def test_timeout_error(mock_server):
    [r] = gen(backend(mock_server, max_retries=1, timeout_s=0.3), ["slow [[fail:timeout:5]]"])
    assert r.error["type"] == "timeout" and r.attempts == 2


def test_connection_refused_is_a_connection_error():
    model = OpenAIModelConfig(name="m", base_url="http://127.0.0.1:9/v1", max_retries=1, base_retry_wait_s=0.01).model_dump()
    [r] = gen(OpenAIBackend(model, 4), ["x"])
    assert r.error["type"] == "connection_error"


def test_api_key_never_in_error_text(mock_server):
    [r] = gen(backend(mock_server), ["x [[echo_auth]]"])
    assert r.error["type"] == "auth_error"
    assert "sk-test-SECRET-123" not in r.error["message"] and "***" in r.error["message"]
    assert "SECRET" not in repr(Secret("sk-test-SECRET-123"))


def test_in_flight_limit_per_backend(mock_server):
    """The connector never opens more connections than requests_per_actor."""
    b = backend(mock_server)
    b.requests_per_actor = 4
    with MockServer(MockConfig(latency_ms=50)) as slow:
        b = backend(slow)
        b.requests_per_actor = 4
        results = gen(b, [f"p{i}" for i in range(20)])
        assert all(r.error is None for r in results)
        assert slow.state.max_in_flight <= 4


# -- reasoning models (issue 12, item 5) ------------------------------------------------------------

REASONING_PARAMS = {"temperature": 0.7, "top_p": 0.9, "max_output_tokens": 5, "seed": 3}


@pytest.mark.parametrize("api", ["chat", "responses"])
def test_a_refused_parameter_fails_once_with_the_config_key_to_set(api, mock_server):
    """A reasoning model answers 400 naming temperature (as OpenAI does): not retried, and the
    row's error says which key stops sending it."""
    [r] = gen(backend(mock_server, name="mock-reasoning", api=api), ["two plus two"], REASONING_PARAMS)
    assert r.error["type"] == "client_error" and r.attempts == 1
    assert r.error["message"].startswith("the model refuses 'temperature': set model.omit_params: [temperature] ")
    assert "Unsupported parameter: 'temperature'" in r.error["message"]  # the server's own words follow
    assert mock_server.state.by_status[400] == 1


@pytest.mark.parametrize("api", ["chat", "responses"])
def test_omit_params_never_sends_them(api, mock_server):
    mock_server.state.keep_bodies = 5
    b = backend(mock_server, name="mock-reasoning", api=api, omit_params=["temperature", "top_p"],
                max_tokens_field="max_completion_tokens")
    [r] = gen(b, ["one two three four five six"], REASONING_PARAMS)
    assert r.error is None, r.error
    assert r.text == "one two three four five" and r.finish_reason == "length"
    body = mock_server.state.bodies[-1]
    assert "temperature" not in body and "top_p" not in body
    limit = "max_completion_tokens" if api == "chat" else "max_output_tokens"
    assert body[limit] == 5 and "max_tokens" not in body
    assert mock_server.state.by_status == {200: 1}


def test_a_refused_max_tokens_points_at_max_tokens_field(mock_server):
    b = backend(mock_server, name="mock-reasoning", omit_params=["temperature", "top_p"])
    [r] = gen(b, ["x"], REASONING_PARAMS)
    assert r.error["type"] == "client_error"
    assert r.error["message"].startswith("the model refuses 'max_tokens': set model.max_tokens_field: "
                                         "max_completion_tokens")


def test_the_advice_keeps_what_is_already_omitted(mock_server):
    b = backend(mock_server, name="mock-reasoning", omit_params=["temperature"], api="responses")
    [r] = gen(b, ["x"], REASONING_PARAMS)
    assert r.error["message"].startswith("the model refuses 'top_p': set model.omit_params: [temperature, top_p]")


def test_a_long_answer_outlives_the_fixed_timeout_with_a_scaled_one(mock_server):
    """0.8 s to answer: a fixed 0.3 s times out; 0.3 s + 1 s per 1000 tokens past 1024 (for 2024
    asked: 1.3 s) lets it finish; a scale too small fails with the computed deadline in the message."""
    params = {"max_output_tokens": 2024, "seed": 1}
    fixed = backend(mock_server, timeout_s=0.3, max_retries=0, timeout_per_1k_output_tokens_s=0)
    [r] = gen(fixed, ["slow [[sleep:0.8]]"], params)
    assert r.error["type"] == "timeout" and r.error["message"] == "no complete response within 0.3 s (model.timeout_s)"
    t0 = time.perf_counter()
    scaled = backend(mock_server, timeout_s=0.3, max_retries=0, timeout_per_1k_output_tokens_s=1.0)
    [r] = gen(scaled, ["slow [[sleep:0.8]]"], params)
    assert r.error is None, r.error
    assert r.text == "slow [[sleep:0.8]]" and time.perf_counter() - t0 >= 0.8
    short = backend(mock_server, timeout_s=0.3, max_retries=0, timeout_per_1k_output_tokens_s=0.2)
    [r] = gen(short, ["slow [[sleep:0.8]]"], params)
    assert r.error["type"] == "timeout"
    assert r.error["message"] == ("no complete response within 0.5 s (model.timeout_s 0.3 + 0.2 s per 1000 of "
                                  "the 2024 requested output tokens beyond 1024)")
