"""Claude natively: the anthropic backend against the mock's /v1/messages over real sockets, its request
bodies checked against the 2023-06-01 request schema, the mock's answers parsed by the official SDK's
types, the SDK's own client driving the mock, and a hostile provider."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import anthropic
import jsonschema
import orjson
import pytest

from sft_ray.agent import EpisodeState, assistant_message, run_episode
from sft_ray.backends.anthropic import AnthropicBackend, messages_body, parse_message, to_messages
from sft_ray.backends.base import GenerationRequest, Secret
from sft_ray.cost import batch_prices, cache_saved_usd, cost_usd
from sft_ray.devserver.anthropic import check_request
from sft_ray.environments.base import Episode, ToolOutput
from sft_ray.ratelimit import from_anthropic_headers, pause_from_headers

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
SCHEMA = json.loads((FIXTURES / "anthropic_messages_2023-06-01.schema.json").read_text())
KEY = "sk-ant-api03-SECRET-0123456789abcdefghijklmnop"
TOOLS = [{"type": "function", "function": {"name": "lookup", "description": "Look a word up.", "parameters": {
    "type": "object", "properties": {"q": {"type": "string"}}, "required": ["q"], "additionalProperties": False}}}]


def base_url(server) -> str:
    return server.url[: -len("/v1")]


def model_dict(server=None, **kw):
    model = {"backend": "anthropic", "name": "claude-sonnet-4-5", "base_url": base_url(server) if server else
             "https://api.anthropic.com", "anthropic_version": "2023-06-01", "timeout_s": 5.0, "connect_timeout_s": 5.0,
             "timeout_per_1k_output_tokens_s": 0.0, "max_retries": 4, "base_retry_wait_s": 0.01,
             "max_retry_wait_s": 0.2, "prompt_caching": True, "thinking": None, "api_key": Secret(KEY)}
    model.update(kw)
    return model


def valid_2023_06_01(body: dict) -> None:
    """The documented request schema of 2023-06-01, and the rules a schema cannot say (the mock's)."""
    jsonschema.validate(body, SCHEMA)
    assert check_request(body, "2023-06-01") is None, check_request(body, "2023-06-01")


def run(coro):
    return asyncio.run(coro)


async def _generate(model, requests):
    b = AnthropicBackend(model, requests_per_actor=8)
    await b.start()
    try:
        return await asyncio.gather(*(b.generate(r) for r in requests))
    finally:
        await b.close()


def gen(model, *requests):
    return run(_generate(model, list(requests)))


def req(text, params=None, **kw):
    return GenerationRequest([{"role": "user", "content": text}], dict(params or {"max_output_tokens": 64}), **kw)


# --- request bodies ---------------------------------------------------------------------------------------------


def test_every_input_shape_becomes_a_2023_06_01_body():
    chat = [{"role": "system", "content": "Be brief."}, {"role": "developer", "content": "Use tools."},
            {"role": "user", "content": "find cat"},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "call.1/x", "type": "function", "function": {"name": "lookup", "arguments": '{"q": "cat"}'}},
                {"id": "call_2", "type": "function", "function": {"name": "lookup", "arguments": "{not json"}}]},
            {"role": "tool", "tool_call_id": "call.1/x", "name": "lookup", "content": "a feline"},
            {"role": "tool", "tool_call_id": "call_2", "name": "lookup", "content": ""},
            {"role": "user", "content": "and dog?"}]
    params = {"max_output_tokens": 300, "temperature": 0.2, "top_p": 0.9, "top_k": 40, "stop": "END", "seed": 7,
              "frequency_penalty": 0.5, "reasoning_effort": "low", "user": "u-1"}
    body = messages_body(model_dict(), GenerationRequest(chat, params, tools=TOOLS, tool_choice="required",
                                                         parallel_tool_calls=False))
    valid_2023_06_01(body)
    assert [b["text"] for b in body["system"]] == ["Be brief.", "Use tools."]
    assert [m["role"] for m in body["messages"]] == ["user", "assistant", "user"]
    assert body["max_tokens"] == 300 and body["stop_sequences"] == ["END"] and body["top_k"] == 40
    assert "seed" not in body and "frequency_penalty" not in body and "reasoning_effort" not in body
    assert body["metadata"] == {"user_id": "u-1"}
    assert body["tools"][0]["input_schema"] == TOOLS[0]["function"]["parameters"]
    assert body["tool_choice"] == {"type": "any", "disable_parallel_tool_use": True}
    calls = body["messages"][1]["content"]
    assert [c["id"] for c in calls] == ["call_1_x", "call_2"] and calls[1]["input"] == {}
    results = body["messages"][2]["content"]  # the tool results and the next user text: one user turn
    assert [b["type"] for b in results] == ["tool_result", "tool_result", "text"]
    assert results[0]["tool_use_id"] == "call_1_x"
    # caching: the last tool, the last system block, the previous user turn's end, the request's end
    marked = [b for b in [*body["tools"], *body["system"], *[x for m in body["messages"] for x in m["content"]]]
              if "cache_control" in b]
    assert marked == [body["tools"][-1], body["system"][-1], body["messages"][0]["content"][-1], results[-1]]


@pytest.mark.parametrize("row", [
    {"responses_create_params": {"input": [{"role": "user", "content": [{"type": "input_text", "text": "hi"}]}],
                                 "instructions": "You are terse."}},
    {"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "hi"}]},
    {"prompt": "hi", "system": "S"},
    {"prompt": "hi"},
])
def test_rows_of_each_shape_send_system_at_the_top(row):
    from sft_ray.rows import prompt_messages

    body = messages_body(model_dict(prompt_caching=False), GenerationRequest(prompt_messages(row),
                                                                              {"max_output_tokens": 10}))
    valid_2023_06_01(body)
    assert all(m["role"] != "system" for m in body["messages"])
    assert ("system" in body) == ("prompt" not in row or "system" in row)
    assert not any("cache_control" in json.dumps(body) for _ in [0])


def test_thinking_blocks_go_back_first_unchanged_and_are_never_cached():
    thinking = [{"type": "thinking", "thinking": "hmm", "signature": "sig=="},
                {"type": "redacted_thinking", "data": "opaque"}]
    msgs = [{"role": "user", "content": "q"},
            assistant_message(parse_message({"type": "message", "content": [
                *thinking, {"type": "text", "text": "let me look"},
                {"type": "tool_use", "id": "toolu_1", "name": "lookup", "input": {"q": "x"}}],
                "stop_reason": "tool_use", "usage": {"input_tokens": 3, "output_tokens": 4}})),
            {"role": "tool", "tool_call_id": "toolu_1", "content": "found"}]
    _, out = to_messages(msgs)
    assert out[1]["content"][:2] == thinking
    assert [b["type"] for b in out[1]["content"]] == ["thinking", "redacted_thinking", "text", "tool_use"]
    body = messages_body(model_dict(thinking={"budget_tokens": 1024}), GenerationRequest(
        msgs, {"max_output_tokens": 2048}, tools=TOOLS))
    jsonschema.validate(body, SCHEMA)
    assert body["thinking"] == {"type": "enabled", "budget_tokens": 1024}
    assert all("cache_control" not in b for b in thinking + body["messages"][1]["content"][:2])


def test_at_most_four_cache_breakpoints_in_a_long_episode():
    msgs = [{"role": "system", "content": "sys"}, {"role": "user", "content": "go"}]
    for i in range(6):
        msgs += [{"role": "assistant", "content": None, "tool_calls": [
            {"id": f"c{i}", "type": "function", "function": {"name": "lookup", "arguments": "{}"}}]},
            {"role": "tool", "tool_call_id": f"c{i}", "content": f"r{i}"}]
    body = messages_body(model_dict(), GenerationRequest(msgs, {"max_output_tokens": 5}, tools=TOOLS))
    valid_2023_06_01(body)
    assert orjson.dumps(body).count(b"cache_control") == 4


# --- against the mock ------------------------------------------------------------------------------------------


def test_single_turn_with_thinking_and_headers(mock_server):
    mock_server.state.keep_bodies = 3
    [r] = gen(model_dict(mock_server, thinking={"budget_tokens": 1024}),
              req("one two three", {"max_output_tokens": 2048, "temperature": 1.0}))
    assert r.error is None, r.error
    assert r.text == "one two three" and r.finish_reason == "stop"
    assert r.reasoning == "Thinking about: one two three"
    assert r.thinking_blocks[0]["signature"]
    assert r.usage == {"input_tokens": 3, "output_tokens": 3, "total_tokens": 6}  # no system, no tools: nothing cached
    assert mock_server.state.api_key_headers == {KEY}
    assert mock_server.state.auth_headers == {""}  # never a Bearer header
    valid_2023_06_01(mock_server.state.bodies[-1])


def test_length_and_stop_sequences(mock_server):
    a, b = gen(model_dict(mock_server), req("a b c d e", {"max_output_tokens": 2}),
               req("alpha beta END gamma", {"max_output_tokens": 50, "stop": ["END"]}))
    assert (a.text, a.finish_reason) == ("a b", "length")
    assert b.finish_reason == "stop" and "gamma" not in b.text


class Lookup(Episode):
    def __init__(self) -> None:
        self.calls = []

    async def call(self, name, arguments):
        self.calls.append(arguments)
        return ToolOutput(text=f"result for {arguments.get('q')} " + "padding " * 40)


def episode(model, text, tools=TOOLS, max_steps=6):
    async def go():
        b = AnthropicBackend(model, requests_per_actor=4)
        await b.start()
        try:
            state = EpisodeState(messages=[{"role": "system", "content": "You look things up."},
                                           {"role": "user", "content": text}])
            await run_episode(b.generate, Lookup(), state, {"max_output_tokens": 2048}, {"tools": tools},
                              max_steps, "row#0")
            return state
        finally:
            await b.close()
    return run(go())


def test_agent_episode_with_thinking_sends_signatures_back_and_reads_the_cache(mock_server):
    mock_server.state.keep_bodies = 10
    state = episode(model_dict(mock_server, thinking={"budget_tokens": 1024}), "find cat [[steps:3]]")
    assert state.error is None, state.error
    assert state.termination == "final" and state.num_model_calls == 4 and state.num_tool_calls == 3
    assistant = [m for m in state.messages if m["role"] == "assistant"]
    assert all(m["thinking_blocks"][0]["signature"] for m in assistant)
    assert all(m["reasoning_content"].startswith("Thinking about:") for m in assistant)
    assert assistant[0]["tool_calls"][0]["function"] == {"name": "lookup", "arguments": '{"q":"find cat"}'}
    bodies = mock_server.state.bodies[-4:]
    for body in bodies:
        valid_2023_06_01(body)
    # each later turn reads what the turn before wrote
    assert state.usage["cache_read_input_tokens"] > 0 and state.usage["cache_creation_input_tokens"] > 0


def test_caching_bills_fewer_input_tokens(mock_server):
    with_cache = episode(model_dict(mock_server), "find cat [[steps:3]]")
    without = episode(model_dict(mock_server, prompt_caching=False), "find dog [[steps:3]]")
    pricing = {"input_per_mtok": 3.0, "output_per_mtok": 15.0}
    u, v = with_cache.usage, without.usage
    assert "cache_read_input_tokens" not in v
    prompt_with = u["input_tokens"] + u["cache_creation_input_tokens"] + u["cache_read_input_tokens"]
    assert prompt_with == v["input_tokens"]  # the same prompt tokens, split differently
    assert cost_usd(u["input_tokens"], 0, pricing, u["cache_creation_input_tokens"], u["cache_read_input_tokens"]) \
        < cost_usd(v["input_tokens"], 0, pricing)


def test_schema_breaking_tool_input_is_answered_not_run(mock_server):
    state = episode(model_dict(mock_server), 'x [[tool:lookup {"q": 5}]]')
    assert state.num_invalid_tool_arguments == 1 and state.termination == "final"


@pytest.mark.parametrize("marker, attempts", [("[[fail:429:2]]", 3), ("[[fail:529:2]]", 3), ("[[fail:500:1]]", 2)])
def test_429_529_and_5xx_are_retried(mock_server, marker, attempts):
    [r] = gen(model_dict(mock_server), req(f"hello {marker}"))
    assert r.error is None and r.attempts == attempts


def test_a_400_names_the_api_error_type_and_message(mock_server):
    [r] = gen(model_dict(mock_server, thinking={"budget_tokens": 1024}),
              req("hi", {"max_output_tokens": 2048, "temperature": 0.5}))
    assert r.error["type"] == "client_error" and r.attempts == 1
    assert r.error["message"] == ("HTTP 400 invalid_request_error: `temperature` may only be set to 1 when "
                                  "thinking is enabled")


def test_the_key_never_appears_in_an_error(mock_server):
    [r] = gen(model_dict(mock_server), req("hi [[echo_auth]]"))
    assert r.error["type"] == "auth_error"
    assert KEY not in r.error["message"] and KEY[:20] not in r.error["message"] and "***" in r.error["message"]


def test_ratelimit_headers_feed_the_limiter():
    headers = {"anthropic-ratelimit-requests-limit": "60", "anthropic-ratelimit-requests-remaining": "0",
               "anthropic-ratelimit-requests-reset": "2026-01-01T00:00:30Z",
               "anthropic-ratelimit-tokens-limit": "6000", "anthropic-ratelimit-tokens-remaining": "5000"}
    from datetime import datetime

    now = datetime.fromisoformat("2026-01-01T00:00:00+00:00").timestamp()
    out = from_anthropic_headers(headers, now=now)
    assert out == {"x-ratelimit-limit-requests": "60", "x-ratelimit-remaining-requests": "0",
                   "x-ratelimit-reset-requests": "30.000", "x-ratelimit-limit-tokens": "6000",
                   "x-ratelimit-remaining-tokens": "5000"}
    assert pause_from_headers(out, 10) == pytest.approx(1.0)  # one request refills in 1 s at 60/min


def test_mock_limits_answer_429_with_retry_after_and_anthropic_headers():
    from sft_ray.devserver import MockConfig, MockServer

    with MockServer(MockConfig(requests_per_minute=60, limit_window_s=2)) as server:
        rs = gen(model_dict(server, max_retries=0), *[req(f"n{i}") for i in range(4)])
    assert sum(1 for r in rs if r.error and r.error["type"] == "rate_limit") >= 1


# --- a hostile provider -----------------------------------------------------------------------------------------


def test_unknown_blocks_and_missing_usage_are_passed_over(mock_server):
    a, b = gen(model_dict(mock_server), req("x [[anthropic:unknown_block]]"), req("y [[anthropic:no_usage]]"))
    assert a.error is None and a.text == "x [[anthropic:unknown_block]]"
    assert b.error is None and b.usage == {"input_tokens": 0, "output_tokens": 0, "total_tokens": 0}


def test_an_unsigned_thinking_block_fails_a_tool_turn_and_keeps_a_final_one(mock_server):
    model = model_dict(mock_server, thinking={"budget_tokens": 1024}, max_retries=1)
    [final] = gen(model, req("z [[anthropic:unsigned]]", {"max_output_tokens": 2048}))
    assert final.error is None and final.reasoning and final.thinking_blocks is None
    state = episode(model, "w [[anthropic:unsigned]]")
    assert state.error["type"] == "bad_response" and "signature" in state.error["message"]


@pytest.mark.parametrize("body", [{"type": "message"}, {"type": "error"}, [], {"type": "message", "content": [
    {"type": "tool_use", "id": "t"}]}])
def test_malformed_messages_are_bad_responses(body):
    from sft_ray.backends.openai import BadResponse

    with pytest.raises(BadResponse):
        parse_message(body)


# --- the official SDK as the reference for the wire format ---------------------------------------------------


def test_the_sdk_types_parse_every_mock_answer(mock_server):
    mock_server.state.keep_bodies = 0
    import aiohttp

    async def raw(body):
        async with aiohttp.ClientSession() as s:
            async with s.post(base_url(mock_server) + "/v1/messages", json=body,
                              headers={"x-api-key": KEY, "anthropic-version": "2023-06-01"}) as resp:
                return resp.status, await resp.json()

    tools = [{"name": "lookup", "input_schema": {"type": "object", "properties": {"q": {"type": "string"}}}}]
    bodies = [
        {"model": "m", "max_tokens": 20, "messages": [{"role": "user", "content": "plain"}]},
        {"model": "m", "max_tokens": 2000, "thinking": {"type": "enabled", "budget_tokens": 1024},
         "messages": [{"role": "user", "content": "think [[anthropic:redacted]]"}]},
        {"model": "m", "max_tokens": 20, "tools": tools, "messages": [{"role": "user", "content": "call"}]},
        {"model": "m", "max_tokens": 2, "messages": [{"role": "user", "content": "a b c"}]},
    ]
    for body in bodies:
        status, data = run(raw(body))
        assert status == 200
        anthropic.types.Message.model_validate(data)
    for body in [{"model": "m", "messages": [{"role": "system", "content": "x"}], "max_tokens": 5},
                 {"model": "m", "messages": [{"role": "user", "content": "x [[fail:529:1]]"}], "max_tokens": 5}]:
        status, data = run(raw(body))
        assert status in (400, 529)
        anthropic.types.ErrorResponse.model_validate(data)


def test_the_sdk_client_drives_the_mock_at_its_own_version(mock_server):
    """The SDK 2.x sends a bearer token and its own newer anthropic-version; the mock applies that
    version's rules (system messages taken, sampling parameters refused), not 2023-06-01's."""
    mock_server.state.keep_bodies = 5
    client = anthropic.Anthropic(api_key=KEY, base_url=base_url(mock_server), max_retries=0)
    msg = client.messages.create(model="claude-sonnet-4-5", max_tokens=2000, system="terse",
                                 thinking={"type": "enabled", "budget_tokens": 1024},
                                 messages=[{"role": "system", "content": "be kind"},
                                           {"role": "user", "content": "hello sdk"}])
    assert msg.content[0].type == "thinking" and msg.content[-1].text == "hello sdk"
    assert msg.usage.input_tokens >= 0
    assert f"Bearer {KEY}" in mock_server.state.auth_headers
    with pytest.raises(anthropic.BadRequestError, match="prompt is too long"):
        client.messages.create(model="m", max_tokens=5, messages=[{"role": "user", "content": "x [[status:400]]"}])
    with pytest.raises(anthropic.BadRequestError, match="temperature: Extra inputs"):
        client.messages.create(model="m", max_tokens=5, messages=[{"role": "user", "content": "x"}],
                               extra_body={"temperature": 0.5})


def test_2023_06_01_refuses_what_the_newer_version_takes(mock_server):
    """What sft-ray must not send at 2023-06-01: a bearer token alone, a system message."""
    import aiohttp

    async def post(body, headers):
        async with aiohttp.ClientSession() as s:
            async with s.post(base_url(mock_server) + "/v1/messages", json=body, headers=headers) as resp:
                return resp.status, await resp.json()

    ok = {"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}], "temperature": 0.5}
    v = {"anthropic-version": "2023-06-01"}
    assert run(post(ok, {**v, "x-api-key": KEY}))[0] == 200
    assert run(post(ok, {**v, "Authorization": f"Bearer {KEY}"}))[0] == 401
    status, data = run(post({**ok, "messages": [{"role": "system", "content": "s"}, *ok["messages"]]},
                            {**v, "x-api-key": KEY}))
    assert status == 400 and "top-level system parameter" in data["error"]["message"]
    assert run(post(ok, {"x-api-key": KEY}))[1]["error"]["message"] == "anthropic-version: header is required"


# --- cost ---------------------------------------------------------------------------------------------------------


def test_cache_prices_default_to_125_and_10_percent_of_input():
    p = {"input_per_mtok": 3.0, "output_per_mtok": 15.0}
    assert cost_usd(0, 0, p, 1_000_000, 0) == pytest.approx(3.75)
    assert cost_usd(0, 0, p, 0, 1_000_000) == pytest.approx(0.30)
    assert cost_usd(0, 0, {**p, "cache_read_per_mtok": 0.5}, 0, 1_000_000) == pytest.approx(0.5)
    assert cache_saved_usd(1_000_000, 3_000_000, p) == pytest.approx(3 * 2.7 - 0.75)
    assert cost_usd(0, 0, batch_prices(p), 0, 1_000_000) == pytest.approx(0.15)  # the discount applies
    assert batch_prices({**p, "cache_read_per_mtok": 0.5})["cache_read_per_mtok"] == pytest.approx(0.25)


# --- config -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("overrides, message", [
    (["model.thinking.budget_tokens=2048", "responses_create_params.max_output_tokens=2048"],
     "model.thinking.budget_tokens: 2048 must be less than responses_create_params.max_output_tokens"),
    (["model.thinking.budget_tokens=1024", "responses_create_params.temperature=0.5"],
     "temperature: 0.5 is refused with model.thinking"),
    (["model.thinking.budget_tokens=1024", "responses_create_params.top_k=5"], "top_k: refused with model.thinking"),
    (["model.thinking.budget_tokens=1024", "responses_create_params.top_p=0.5"], "top_p: 0.5 is refused"),
    (["model.thinking.budget_tokens=1024", "responses_create_params.tool_choice=required"],
     "a forced tool choice is refused with model.thinking"),
    (["model.thinking.budget_tokens=512"], "greater than or equal to 1024"),
    (["responses_create_params.max_output_tokens=null"], "the Messages API requires max_tokens"),
    (["responses_create_params.temperature=1.5"], "over the Messages API's range 0..1"),
    (["model.api=chat"], "model.api: unknown key for the anthropic backend"),
    (["model.base_url=https://api.anthropic.com/v1"], "the API root without /v1"),
])
def test_config_refuses_what_the_messages_api_refuses(overrides, message):
    from sft_ray.config import ConfigError
    from sft_ray.configload import load_config

    with pytest.raises(ConfigError) as e:
        load_config(None, ["input=x", "output=o", "model.backend=anthropic", "model.name=claude-sonnet-4-5",
                           "responses_create_params.max_output_tokens=4096", *overrides])
    assert message in str(e.value)


def test_an_anthropic_judge_needs_a_name_and_max_output_tokens():
    from sft_ray.config import ConfigError
    from sft_ray.configload import load_config

    base = ["input=x", "output=o", "model.name=m", "verifier.type=judge", "verifier.judge.model.backend=anthropic"]
    cfg = load_config(None, [*base, "verifier.judge.model.name=claude-haiku-4-5"])
    assert cfg.verifier.judge.model.backend == "anthropic"
    with pytest.raises(ConfigError, match="verifier.judge.model.name is required with the anthropic backend"):
        load_config(None, base)
    with pytest.raises(ConfigError, match="requires max_tokens on every request"):
        load_config(None, [*base, "verifier.judge.model.name=c", "verifier.judge.responses_create_params={}"])


def test_config_defaults_and_what_the_backend_receives():
    from sft_ray.config import flat_dump
    from sft_ray.configload import load_config

    cfg = load_config(None, ["input=x", "output=o", "model.backend=anthropic", "model.name=claude-sonnet-4-5"])
    m = cfg.model
    assert (m.base_url, m.api_key_env, m.anthropic_version, m.prompt_caching, m.thinking) == (
        "https://api.anthropic.com", "ANTHROPIC_API_KEY", "2023-06-01", True, None)
    b = AnthropicBackend({**flat_dump(m), "api_key": Secret(KEY)}, 4)
    assert b.url == "https://api.anthropic.com/v1/messages"
    assert b._auth_headers() == {"anthropic-version": "2023-06-01", "x-api-key": KEY}


# --- Message Batches adapter --------------------------------------------------------------------------------------


def test_limits_are_capped_to_anthropics():
    from sft_ray.backends.anthropic_batch import MAX_BYTES, MAX_REQUESTS, AnthropicBatchProvider
    from sft_ray.backends.batchapi import BatchLimits

    p = AnthropicBatchProvider(model_dict(), BatchLimits(10**9, 10**12))
    assert p.limits.max_requests == MAX_REQUESTS and p.limits.max_bytes < MAX_BYTES
    assert AnthropicBatchProvider(model_dict(), BatchLimits(10, 5000)).limits == BatchLimits(10, 5000)


def test_batch_results_for_ids_never_sent_and_hostile_lines_are_dropped_or_failed(mock_server):
    from sft_ray.backends.anthropic_batch import AnthropicBatchProvider
    from sft_ray.backends.batchapi import BatchLimits
    from sft_ray.runfolder.layout import anthropic_custom_id

    p = AnthropicBatchProvider(model_dict(mock_server), BatchLimits(100, 10**6))
    p.expect([("r1", 0)])
    ok = {"type": "message", "content": [{"type": "text", "text": "hi"}], "stop_reason": "end_turn",
          "usage": {"input_tokens": 1, "output_tokens": 1}}

    def line(cid, result):
        return orjson.dumps({"custom_id": cid, "result": result})

    assert p.parse_result(line("0-" + "f" * 48, {"type": "succeeded", "message": ok})) is None  # never sent
    assert p.parse_result(b"not json") is None
    key, r = p.parse_result(line(anthropic_custom_id(("r1", 0)), {"type": "succeeded", "message": ok}))
    assert key == ("r1", 0) and r.text == "hi"
    _, r = p.parse_result(line(anthropic_custom_id(("r1", 0)), {"type": "succeeded", "message": {"type": "x"}}))
    assert r.error["type"] == "bad_response"
    _, r = p.parse_result(line(anthropic_custom_id(("r1", 0)), {"type": "errored", "error": {
        "type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}}))
    assert r.error == {"type": "server_error", "message": "batch request errored: overloaded_error: Overloaded"}
    for never_run in ("canceled", "expired"):
        assert p.parse_result(line(anthropic_custom_id(("r1", 0)), {"type": never_run})) == (("r1", 0), None)
    _, r = p.parse_result(line(anthropic_custom_id(("r1", 0)), {"type": "surprise"}))
    assert r.error["type"] == "bad_response"


def test_a_batch_created_but_not_recorded_is_found_not_made_again(mock_server):
    """A run killed between create and its record: find() takes the batch made since the keys were
    recorded with the same number of requests."""
    from sft_ray.backends.anthropic_batch import AnthropicBatchProvider
    from sft_ray.backends.batchapi import BatchLimits

    async def go():
        async with AnthropicBatchProvider(model_dict(mock_server), BatchLimits(100, 10**6)) as p:
            keys = [(f"r{i}", 0) for i in range(3)]
            data = b"".join(p.request_line(k, req(f"q{i}")) + b"\n" for i, k in enumerate(keys))
            ref = await p.upload(data, "batch-000001.jsonl")
            other = await p.upload(data[: data.index(b"\n") + 1], "batch-000002.jsonl")
            made = await p.create(ref, data, 1)
            found = await p.find(ref)
            assert found is not None and found.id == made.id
            assert await p.find(other) is None  # one request: no batch of that size
    run(go())
    assert mock_server.state.batches_created == 1


def test_the_sdk_drives_the_mocks_message_batches_and_its_types_parse_them():
    """The SDK's batches client creates, polls and reads a batch of the mock, whose objects and result
    lines its types parse: succeeded, errored and expired lines."""
    import time

    from anthropic.types.messages import MessageBatch, MessageBatchIndividualResponse

    from sft_ray.devserver import MockConfig, MockServer

    with MockServer(MockConfig(batch_expire=1, batch_expire_keep=0.67)) as server:
        client = anthropic.Anthropic(api_key=KEY, base_url=base_url(server), max_retries=0)
        requests = [{"custom_id": f"r{i}", "params": {"model": "m", "max_tokens": 20, "messages": [
            {"role": "user", "content": text}]}} for i, text in enumerate(["one", "two [[status:400]]", "three"])]
        batch = client.messages.batches.create(requests=requests)
        assert isinstance(batch, MessageBatch) and batch.processing_status == "in_progress"
        deadline = time.monotonic() + 30
        while batch.processing_status != "ended" and time.monotonic() < deadline:
            time.sleep(0.05)
            batch = client.messages.batches.retrieve(batch.id)
        assert batch.results_url and batch.request_counts.succeeded + batch.request_counts.errored \
            + batch.request_counts.expired == 3
        lines = list(client.messages.batches.results(batch.id))
        assert all(isinstance(x, MessageBatchIndividualResponse) for x in lines)
        assert sorted(x.result.type for x in lines) == ["errored", "expired", "succeeded"]
        listed = client.messages.batches.list(limit=10)
        assert [b.id for b in listed.data] == [batch.id]


def test_a_batch_api_error_quoting_part_of_the_key_is_redacted(mock_server):
    from sft_ray.backends.anthropic_batch import AnthropicBatchClient
    from sft_ray.backends.batchapi import BatchAPIError

    client = AnthropicBatchClient(model_dict(mock_server, max_retries=0))
    text = client._redact(f"invalid x-api-key: {KEY[:30]}...")  # a provider quoting part of the key
    assert KEY[:30] not in text and "***" in text
    with pytest.raises(BatchAPIError) as e:
        async def poll():
            from sft_ray.backends.anthropic_batch import AnthropicBatchProvider
            from sft_ray.backends.batchapi import BatchLimits

            async with AnthropicBatchProvider(model_dict(mock_server, max_retries=0), BatchLimits(10, 10**6)) as p:
                await p.status("msgbatch_nope")
        run(poll())
    assert "polling batch msgbatch_nope: HTTP 404" in str(e.value) and KEY not in str(e.value)
