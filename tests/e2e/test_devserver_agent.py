"""The mock server as an agent model, in both APIs, over real sockets (aiohttp client)."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request

import aiohttp
import pytest

from sft_ray.devserver import UNKNOWN_TOOL, MockConfig, MockServer

WEATHER = {"type": "object", "properties": {"city": {"type": "string", "description": ""}},
           "required": ["city"], "additionalProperties": False}
NOTE = {"type": "object", "properties": {"count": {"type": "integer"}, "value": {"type": "string"}},
        "required": ["count", "value"]}
CHAT_TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "", "parameters": WEATHER}},
              {"type": "function", "function": {"name": "remember", "description": "", "parameters": NOTE}}]
FLAT_TOOLS = [{"type": "function", "name": "get_weather", "description": "", "parameters": WEATHER, "strict": True},
              {"type": "function", "name": "remember", "description": "", "parameters": NOTE, "strict": True}]


def post(server: MockServer, path: str, body: dict) -> tuple[int, dict]:
    async def go():
        async with aiohttp.ClientSession() as s:
            async with s.post(server.url + path, json=body) as r:
                return r.status, await r.json(content_type=None)

    return asyncio.run(go())


def chat(server, messages, **extra) -> tuple[int, dict]:
    return post(server, "/chat/completions", {"model": "m", "messages": messages, "tools": CHAT_TOOLS, **extra})


def responses(server, items, **extra) -> tuple[int, dict]:
    return post(server, "/responses", {"model": "m", "input": items, "tools": FLAT_TOOLS, **extra})


def chat_episode(server, prompt: str, tool=lambda name, args: f"{name} says {args}", limit: int = 10, **extra):
    """Drive a Chat Completions conversation to its final answer: (answers, messages)."""
    messages, answers = [{"role": "user", "content": prompt}], []
    for _ in range(limit):
        status, data = chat(server, messages, **extra)
        assert status == 200, data
        answers.append(data)
        msg = data["choices"][0]["message"]
        messages.append(msg)
        if not msg.get("tool_calls"):
            return answers, messages
        for tc in msg["tool_calls"]:
            messages.append({"role": "tool", "tool_call_id": tc["id"], "name": tc["function"]["name"],
                             "content": tool(tc["function"]["name"], tc["function"]["arguments"])})
    raise AssertionError("no final answer")


@pytest.fixture
def server():
    with MockServer(MockConfig(retry_after_s=0.01, hang_s=1.0)) as s:
        yield s


def test_chat_calls_first_tool_with_the_user_text_then_answers_with_the_output(server):
    answers, messages = chat_episode(server, "what's it like in sf?", tool=lambda n, a: "The weather in sf is cold.")
    assert len(answers) == 2
    first = answers[0]["choices"][0]
    assert first["finish_reason"] == "tool_calls"
    assert first["message"]["content"] is None
    (tc,) = first["message"]["tool_calls"]
    assert tc["type"] == "function" and tc["id"]
    assert tc["function"]["name"] == "get_weather"
    assert isinstance(tc["function"]["arguments"], str)
    assert json.loads(tc["function"]["arguments"]) == {"city": "what's it like in sf?"}
    final = answers[1]["choices"][0]
    assert final["finish_reason"] == "stop"
    assert final["message"]["content"] == "The weather in sf is cold."
    assert "tool_calls" not in final["message"]


def test_responses_flat_tools_function_call_items_and_final_message(server):
    items = [{"role": "developer", "content": "You are a helpful personal assistant."},
             {"role": "user", "content": "what's it like in sf?"}]
    status, data = responses(server, items)
    assert status == 200
    assert data["object"] == "response" and data["status"] == "completed"
    (fc,) = data["output"]
    assert fc["type"] == "function_call" and fc["name"] == "get_weather" and fc["call_id"]
    assert isinstance(fc["arguments"], str) and json.loads(fc["arguments"]) == {"city": "what's it like in sf?"}
    # NeMo Gym's loop: resend input + every output item, then the tool's output with the call's call_id.
    items += data["output"] + [{"type": "function_call_output", "call_id": fc["call_id"],
                                "output": '{"city": "sf", "weather_description": "The weather in sf is cold."}'}]
    status, data = responses(server, items)
    assert status == 200
    (msg,) = data["output"]
    assert msg["type"] == "message" and msg["role"] == "assistant"
    assert msg["content"][0]["text"] == '{"city": "sf", "weather_description": "The weather in sf is cold."}'


def test_responses_reads_chat_form_history_too(server):
    """Whatever form a client keeps its transcript in, tool results end the tool calling."""
    items = [{"role": "user", "content": "sf"}]
    _, data = responses(server, items, tools=CHAT_TOOLS)
    (fc,) = data["output"]
    items += [{"role": "assistant", "content": None, "tool_calls": [
        {"id": fc["call_id"], "type": "function", "function": {"name": fc["name"], "arguments": fc["arguments"]}}]},
        {"role": "tool", "tool_call_id": fc["call_id"], "content": "cold"}]
    _, data = responses(server, items, tools=CHAT_TOOLS)
    assert data["output"][0]["content"][0]["text"] == "cold"


def test_marker_chooses_tool_and_arguments_and_several_markers_make_one_turn(server):
    prompt = 'note this [[tool:remember {"count": 2, "value": "x y"}]] and [[tool:get_weather {"city": "Paris"}]]'
    answers, messages = chat_episode(server, prompt, tool=lambda n, a: f"<{n}:{a}>")
    calls = answers[0]["choices"][0]["message"]["tool_calls"]
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] == [
        ("remember", {"count": 2, "value": "x y"}), ("get_weather", {"city": "Paris"})]
    assert len({c["id"] for c in calls}) == 2
    final = answers[1]["choices"][0]["message"]["content"]
    for c in calls:
        assert f"<{c['function']['name']}:{c['function']['arguments']}>" in final


def test_parallel_marker_gives_n_calls_with_distinct_ids_in_both_apis(server):
    _, data = chat(server, [{"role": "user", "content": "sf [[parallel:4]]"}])
    calls = data["choices"][0]["message"]["tool_calls"]
    assert len(calls) == 4 and len({c["id"] for c in calls}) == 4
    assert all(json.loads(c["function"]["arguments"]) == {"city": "sf"} for c in calls)  # markers stripped
    items = [{"role": "user", "content": "sf [[parallel:3]]"}]
    _, data = responses(server, items)
    calls = data["output"]
    assert [c["type"] for c in calls] == ["function_call"] * 3 and len({c["call_id"] for c in calls}) == 3
    # the whole parallel turn answered: a final message with the three outputs, in order
    items += calls + [{"type": "function_call_output", "call_id": c["call_id"], "output": f"out{i}"}
                      for i, c in enumerate(calls)]
    _, data = responses(server, items)
    assert data["output"][0]["content"][0]["text"] == "out0\nout1\nout2"


def test_steps_marker_keeps_calling_tools_for_n_model_calls(server):
    answers, _ = chat_episode(server, "sf [[steps:3]]")
    assert [a["choices"][0]["finish_reason"] for a in answers] == ["tool_calls"] * 3 + ["stop"]
    ids = [tc["id"] for a in answers[:3] for tc in a["choices"][0]["message"]["tool_calls"]]
    assert len(set(ids)) == 3
    answers, _ = chat_episode(server, "sf [[steps:0]]")
    assert len(answers) == 1 and answers[0]["choices"][0]["message"]["content"] == "sf [[steps:0]]"
    # Responses: consecutive function_call items are one turn, so a parallel turn is one step.
    items = [{"role": "user", "content": "sf [[steps:2]] [[parallel:2]]"}]
    for _ in range(2):
        _, data = responses(server, items)
        assert [c["type"] for c in data["output"]] == ["function_call"] * 2
        items += data["output"] + [{"type": "function_call_output", "call_id": c["call_id"], "output": "r"}
                                   for c in data["output"]]
    _, data = responses(server, items)
    assert data["output"][0]["type"] == "message"


def test_malformed_arguments_and_unknown_tools_at_a_set_rate():
    with MockServer(MockConfig(tool_malformed_rate=1.0)) as s:
        _, data = chat(s, [{"role": "user", "content": "sf"}])
        (tc,) = data["choices"][0]["message"]["tool_calls"]
        with pytest.raises(json.JSONDecodeError):
            json.loads(tc["function"]["arguments"])
        assert tc["function"]["name"] == "get_weather"
    with MockServer(MockConfig(tool_unknown_rate=1.0)) as s:
        _, data = responses(s, [{"role": "user", "content": "sf"}])
        (fc,) = data["output"]
        assert fc["name"] == UNKNOWN_TOOL and json.loads(fc["arguments"]) == {"city": "sf"}
    with MockServer(MockConfig(tool_malformed_rate=0.3, tool_unknown_rate=0.2, seed=1)) as s:
        _, data = chat(s, [{"role": "user", "content": "sf [[parallel:400]]"}])
        calls = data["choices"][0]["message"]["tool_calls"]

        def bad(tc):
            try:
                json.loads(tc["function"]["arguments"])
                return False
            except json.JSONDecodeError:
                return True

        malformed = sum(bad(tc) for tc in calls)
        unknown = sum(tc["function"]["name"] == UNKNOWN_TOOL for tc in calls)
        assert 80 <= malformed <= 160, malformed
        assert 45 <= unknown <= 120, unknown


def test_marker_arguments_that_are_not_json_are_sent_as_written(server):
    _, data = chat(server, [{"role": "user", "content": '[[tool:get_weather {"city": }]]'}])
    (tc,) = data["choices"][0]["message"]["tool_calls"]
    assert tc["function"]["arguments"] == '{"city": }'
    _, data = chat(server, [{"role": "user", "content": "[[tool:launch_rockets]]"}])
    (tc,) = data["choices"][0]["message"]["tool_calls"]
    assert tc["function"]["name"] == "launch_rockets" and tc["function"]["arguments"] == "{}"


def test_tool_choice_none_and_forced(server):
    _, data = chat(server, [{"role": "user", "content": "hello"}], tool_choice="none")
    assert data["choices"][0]["message"]["content"] == "hello"
    _, data = chat(server, [{"role": "user", "content": "hello"}],
                   tool_choice={"type": "function", "function": {"name": "remember"}})
    (tc,) = data["choices"][0]["message"]["tool_calls"]
    assert tc["function"]["name"] == "remember" and json.loads(tc["function"]["arguments"]) == {"value": "hello"}
    _, data = responses(server, [{"role": "user", "content": "hello"}], tool_choice={"type": "function",
                                                                                  "name": "remember"})
    assert data["output"][0]["name"] == "remember"


def test_requests_without_tools_still_echo(server):
    status, data = post(server, "/chat/completions", {"model": "m", "messages": [{"role": "user", "content": "a b"}]})
    assert status == 200 and data["choices"][0]["message"] == {"role": "assistant", "content": "a b"}
    status, data = post(server, "/responses", {"model": "m", "input": [{"role": "user", "content": "a b"}],
                                               "tools": []})
    assert data["output"][0]["content"][0]["text"] == "a b"


def test_latency_applies_to_every_model_call():
    with MockServer(MockConfig(latency_ms=150)) as s:
        t0 = time.monotonic()
        answers, _ = chat_episode(s, "sf [[steps:2]]")
        took = time.monotonic() - t0
    assert len(answers) == 3
    assert took >= 3 * 0.15


def test_failure_markers_count_attempts_per_model_call(server):
    """[[fail:500:1]] fails the first attempt of every model call of the episode; a retry succeeds."""
    messages = [{"role": "user", "content": "sf [[fail:500:1]]"}]
    statuses = []
    for _ in range(2):
        status, data = chat(server, messages)
        statuses.append(status)
        status, data = chat(server, messages)  # the retry
        statuses.append(status)
        msg = data["choices"][0]["message"]
        messages.append(msg)
        for tc in msg.get("tool_calls") or []:
            messages.append({"role": "tool", "tool_call_id": tc["id"], "content": "cold"})
    assert statuses == [500, 200, 500, 200]
    assert messages[-1]["content"] == "cold"
    with urllib.request.urlopen(server.url.removesuffix("/v1") + "/stats") as r:
        stats = json.load(r)
    assert stats["tool_call_turns"] == 1 and stats["tool_calls"] == 1 and stats["by_status"]["500"] == 2


def test_serve_mock_cli_flags():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen([sys.executable, "-m", "sft_ray.cli", "serve-mock", "--port", str(port),
                             "--tool-unknown-rate", "1", "--latency-ms", "1"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        body = json.dumps({"model": "m", "messages": [{"role": "user", "content": "sf"}], "tools": CHAT_TOOLS})
        end = time.time() + 60
        while True:
            try:
                req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions", body.encode(),
                                             {"Content-Type": "application/json"})
                data = json.load(urllib.request.urlopen(req, timeout=5))
                break
            except OSError:
                assert proc.poll() is None and time.time() < end, proc.stderr.read().decode()
                time.sleep(0.2)
        assert data["choices"][0]["message"]["tool_calls"][0]["function"]["name"] == UNKNOWN_TOOL
    finally:
        proc.terminate()
        proc.wait(10)
