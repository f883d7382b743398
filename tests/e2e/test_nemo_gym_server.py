"""The NeMo Gym-protocol test server itself, over real sockets (aiohttp client)."""

from __future__ import annotations

import asyncio
import copy
import json
import os
import socket
import subprocess
import time

import aiohttp
import pytest
from nemo_gym_server import NemoGymServer

ROW = {"responses_create_params": {
    "input": [{"role": "developer", "content": "You are a helpful personal assistant."},
              {"role": "user", "content": "what's it like in sf?"}],
    "tools": [{"type": "function", "name": "get_weather", "description": "", "strict": True,
               "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": ""}},
                              "required": ["city"], "additionalProperties": False}}]},
    "task_id": 7}


def response_of(output: list) -> dict:
    return {"id": "resp_1", "created_at": 1764000000, "model": "mock", "object": "response",
            "parallel_tool_calls": True, "tool_choice": "auto", "tools": [], "output": output}


WEATHER_OUTPUT = [
    {"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": '{"city": "sf"}'},
    {"type": "function_call_output", "call_id": "call_1",
     "output": '{"city": "sf", "weather_description": "The weather in sf is cold."}'},
    {"type": "message", "role": "assistant", "id": "msg_1",
     "content": [{"type": "output_text", "text": "It is cold.", "annotations": []}]},
]


async def call(session: aiohttp.ClientSession, server: NemoGymServer, route: str, body) -> tuple[int, object, dict]:
    async with session.post(f"{server.base_url}/{route}", json=body) as r:
        return r.status, await r.json(content_type=None), r.cookies


@pytest.fixture
def server():
    with NemoGymServer() as s:
        yield s


def run(coro):
    return asyncio.run(coro)


def test_one_episode_keeps_its_session_from_seed_to_close(server):
    async def go():
        async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as s:
            answers = [await call(s, server, "seed_session", ROW),
                       await call(s, server, "get_weather", {"city": "sf"}),
                       await call(s, server, "verify", {**ROW, "response": response_of(WEATHER_OUTPUT)}),
                       await call(s, server, "close_session", {"resources_session_id": "s-1",
                                                                 "episode_id": {"rollout_id": "row7.r0"}})]
            return answers

    answers = run(go())
    assert [a[0] for a in answers] == [200, 200, 200, 200]
    assert answers[0][1] == {} and answers[3][1] == {"resources_session_id": "s-1"}
    assert answers[1][1] == {"city": "sf", "weather_description": "The weather in sf is cold."}
    for _, _, cookies in answers:  # set again on every answer
        assert "SimpleWeatherResourcesServer___example_single_tool_call" in cookies
    verified = answers[2][1]
    assert verified["reward"] == 1.0 and verified["mask_sample"] is False
    assert verified["task_id"] == 7 and verified["responses_create_params"] == ROW["responses_create_params"]
    assert verified["response"]["output"] == WEATHER_OUTPUT
    assert verified["seeded"] == 1.0 and verified["session_tool_calls"] == 1 and verified["num_function_calls"] == 1
    assert len(server.sessions) == 1 and len(server.cookies_seen) == 1
    (state,) = server.sessions.values()
    assert state["routes"] == ["seed_session", "get_weather", "verify", "close_session"]
    assert server.counts == {"seed_session": 1, "get_weather": 1, "verify": 1, "close_session": 1}


def test_default_cookie_jar_loses_the_session_on_an_ip_host(server):
    """aiohttp's default CookieJar() drops cookies from 127.0.0.1: every call is a new session."""
    async def go():
        async with aiohttp.ClientSession() as s:
            await call(s, server, "seed_session", ROW)
            await call(s, server, "get_weather", {"city": "sf"})
            return await call(s, server, "verify", {**ROW, "response": response_of(WEATHER_OUTPUT)})

    _, verified, _ = run(go())
    assert verified["seeded"] == 0.0 and verified["session_tool_calls"] == 0
    assert len(server.sessions) == 3 and not server.cookies_seen


def test_state_is_isolated_per_session_under_concurrency(server):
    server.tool_delay_s = 0.01  # interleave the episodes

    async def episode(i: int):
        async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as s:
            await call(s, server, "seed_session", ROW)
            await call(s, server, "remember", {"value": f"v{i}"})
            await asyncio.sleep(0.001 * (i % 7))
            _, recalled, _ = await call(s, server, "recall", {})
            return recalled

    async def go():
        return await asyncio.gather(*(episode(i) for i in range(60)))

    assert run(go()) == [{"value": f"v{i}"} for i in range(60)]
    assert len(server.sessions) == 60 and len(server.cookies_seen) == 60
    assert server.counts["remember"] == server.counts["recall"] == 60


def test_tool_errors_are_json_bodies(server):
    async def go():
        async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as s:
            return [await call(s, server, "broken_tool", {}),
                    await call(s, server, "launch_rockets", {"n": 1}),
                    await call(s, server, "get_weather", {}),
                    await call(s, server, "get_weather", {"city": 3})]

    (s500, b500, c500), (s404, b404, _), (s422a, b422a, _), (s422b, _, _) = run(go())
    assert s500 == 500 and isinstance(b500, str) and "the tool broke" in b500 and c500
    assert s404 == 404 and b404 == {"detail": "Not Found"}
    assert s422a == 422 and b422a["detail"][0]["loc"] == ["body", "city"]
    assert s422b == 422
    assert server.counts["launch_rockets"] == 1


def _verify(server, body) -> tuple[int, object]:
    async def go():
        async with aiohttp.ClientSession() as s:
            status, data, _ = await call(s, server, "verify", body)
            return status, data

    return run(go())


def test_verify_validates_the_row_and_the_response(server):
    ok = {**ROW, "response": response_of(WEATHER_OUTPUT)}
    assert _verify(server, ok)[0] == 200
    no_row = {"response": response_of(WEATHER_OUTPUT)}
    assert _verify(server, no_row)[0] == 422
    for field in ("id", "created_at", "model", "object", "parallel_tool_calls", "tool_choice", "tools", "output"):
        body = copy.deepcopy(ok)
        del body["response"][field]
        status, data = _verify(server, body)
        assert status == 422, field
        assert data["detail"][0]["loc"] == ["body", "response", field]
    bad = copy.deepcopy(ok)
    bad["response"]["object"] = "chat.completion"
    assert _verify(server, bad)[0] == 422
    bad = copy.deepcopy(ok)
    bad["response"]["output"][0]["arguments"] = {"city": "sf"}  # an object, not a JSON string
    status, data = _verify(server, bad)
    assert status == 422 and data["detail"][0]["loc"] == ["body", "response", "output", 0, "arguments"]
    for item, key in ((0, "call_id"), (0, "name"), (1, "call_id"), (1, "output"), (2, "id")):
        bad = copy.deepcopy(ok)
        del bad["response"]["output"][item][key]
        assert _verify(server, bad)[0] == 422, (item, key)
    bad = copy.deepcopy(ok)
    del bad["response"]["output"][2]["content"][0]["annotations"]
    assert _verify(server, bad)[0] == 422
    bad = copy.deepcopy(ok)
    del bad["response"]["output"][2]["type"]
    assert _verify(server, bad)[0] == 422
    bad = copy.deepcopy(ok)
    bad["response"]["output"][1]["output"] = {"city": "sf"}
    assert _verify(server, bad)[0] == 422
    bad = copy.deepcopy(ok)
    bad["response"]["parallel_tool_calls"] = None
    assert _verify(server, bad)[0] == 422
    bad = copy.deepcopy(ok)
    bad["responses_create_params"] = {}
    assert _verify(server, bad)[0] == 422
    # string content needs neither an id nor annotations
    fine = copy.deepcopy(ok)
    fine["response"]["output"][2] = {"type": "message", "role": "assistant", "content": "It is cold."}
    assert _verify(server, fine)[0] == 200


def test_verify_reward_and_metrics(server):
    no_tool = {**ROW, "response": response_of([{"type": "message", "role": "assistant", "content": "cold"}])}
    status, data = _verify(server, no_tool)
    assert status == 200 and data["reward"] == 0.0 and data["num_function_calls"] == 0
    other = {**ROW, "response": response_of([{"type": "function_call", "call_id": "c", "name": "recall",
                                              "arguments": "{}"}])}
    assert _verify(server, other)[1]["reward"] == 0.0
    masked = {**ROW, "force_mask_sample": True, "response": response_of(WEATHER_OUTPUT)}
    data = _verify(server, masked)[1]
    assert data["mask_sample"] is True and data["failure_kind"] == "infrastructure"
    assert len(server.verified) == 3


@pytest.mark.parametrize("body", [
    {"resources_session_id": 5, "episode_id": {"rollout_id": "r1"}},
    {"resources_session_id": "s", "episode_id": {"rollout_id": "_r1"}},
    {"resources_session_id": "s", "episode_id": {"rollout_id": "r1-a3"}},
    {"resources_session_id": "s", "episode_id": {"rollout_id": "r1", "attempt": -1}},
    {"resources_session_id": "s", "episode_id": {"rollout_id": "r 1"}},
    {"resources_session_id": "s", "episode_id": {"rollout_id": "r1", "extra": 1}},
    {"resources_session_id": "s", "episode_id": "r1"},
    {"resources_session_id": "s"},
    {"resources_session_id": "s", "episode_id": {"rollout_id": "r1"}, "extra": True},
    {},
    [],
])
def test_close_session_wants_exactly_its_body(server, body):
    async def go():
        async with aiohttp.ClientSession() as s:
            return await call(s, server, "close_session", body)

    status, data, _ = run(go())
    assert status == 422 and data["detail"]
    assert not server.closed


def test_close_session_accepts_its_body(server):
    async def go():
        async with aiohttp.ClientSession() as s:
            return [await call(s, server, "close_session", {"resources_session_id": "abc",
                                                            "episode_id": {"rollout_id": "A0.b-c_d"}}),
                    await call(s, server, "close_session", {"resources_session_id": "",
                                                            "episode_id": {"rollout_id": "r1", "attempt": 2}})]

    assert [a[:2] for a in run(go())] == [(200, {"resources_session_id": "abc"}), (200, {"resources_session_id": ""})]
    assert server.closed[0] == {"resources_session_id": "abc", "episode_id": {"rollout_id": "A0.b-c_d"}}
    assert json.dumps(server.counts) == '{"close_session": 2}'


def protocol_cases() -> list[tuple[str, object]]:
    """Requests whose answers must match the real server's: (route, JSON body; None: a body that is not JSON)."""
    ok = {**ROW, "response": response_of(WEATHER_OUTPUT)}

    def changed(edit) -> dict:
        body = copy.deepcopy(ok)
        edit(body["response"], body)
        return body

    cases: list[tuple[str, object]] = [
        ("seed_session", ROW), ("seed_session", {}), ("seed_session", None), ("get_weather", {"city": "sf"}),
        ("get_weather", {}), ("get_weather", {"city": 3}), ("get_weather", {"city": "sf", "x": 1}),
        ("launch_rockets", {"n": 1}), ("verify", ok), ("verify", {"response": response_of(WEATHER_OUTPUT)}),
        ("verify", changed(lambda r, b: b.update(responses_create_params={}))),
        ("verify", changed(lambda r, b: b.update(extra_task_field={"a": [1]}))),
        ("verify", changed(lambda r, b: r.update(object="chat.completion"))),
        ("verify", changed(lambda r, b: r.update(parallel_tool_calls=None))),
        ("verify", changed(lambda r, b: r.update(tool_choice={"type": "function", "name": "get_weather"}))),
        ("verify", changed(lambda r, b: r.update(output=[]))),
        ("verify", changed(lambda r, b: r["output"][0].update(arguments={"city": "sf"}))),
        ("verify", changed(lambda r, b: r["output"][0].update(type="tool_call"))),
        ("verify", changed(lambda r, b: r["output"][0].update(id="fc_1", status="completed"))),
        ("verify", changed(lambda r, b: r["output"][1].update(output={"a": 1}))),
        ("verify", changed(lambda r, b: r["output"][1].update(output=[{"type": "input_text", "text": "x"}]))),
        ("verify", changed(lambda r, b: r["output"].__setitem__(2, {"type": "message", "role": "assistant",
                                                                     "content": "cold"}))),
        ("verify", changed(lambda r, b: r["output"].insert(0, {"type": "reasoning", "id": "r", "summary": []}))),
        ("verify", changed(lambda r, b: r["output"][2]["content"][0].pop("annotations"))),
    ]
    for field in ("id", "created_at", "model", "object", "parallel_tool_calls", "tool_choice", "tools", "output"):
        cases.append(("verify", changed(lambda r, b, f=field: r.pop(f))))
    for item, key in ((0, "call_id"), (0, "name"), (0, "arguments"), (1, "call_id"), (1, "output"), (2, "id"),
                      (2, "role"), (2, "type")):
        cases.append(("verify", changed(lambda r, b, i=item, k=key: r["output"][i].pop(k))))
    for rid, extra in (("r1", {}), ("_r1", {}), ("r 1", {}), ("r1-a3", {}), ("r1", {"attempt": 2}),
                       ("r1", {"attempt": -1}), ("r1", {"x": 1})):
        cases.append(("close_session", {"resources_session_id": "s", "episode_id": {"rollout_id": rid, **extra}}))
    cases += [("close_session", body) for body in (
        {"resources_session_id": "", "episode_id": {"rollout_id": "r1"}}, {"resources_session_id": "s"},
        {"resources_session_id": "s", "episode_id": "r1"}, {}, [],
        {"resources_session_id": "s", "episode_id": {"rollout_id": "r1"}, "extra": True})]
    return cases


REAL_SERVER = """
import sys
from unittest.mock import MagicMock
import uvicorn
from nemo_gym.server_utils import ServerClient
from resources_servers.example_single_tool_call.app import (
    SimpleWeatherResourcesServer as S, SimpleWeatherResourcesServerConfig as C)
port = int(sys.argv[1])
app = S(config=C(host="127.0.0.1", port=port, entrypoint="", name="example_single_tool_call"),
        server_client=MagicMock(spec=ServerClient)).setup_webserver()
uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")
"""


@pytest.mark.nemo_gym
def test_answers_like_the_real_nemo_gym_server(server):
    """The same requests to NeMo Gym's own example_single_tool_call and to this server: same statuses, cookies,
    rewards; every field of the real verify answer is in ours. Deselected by default: it needs NeMo Gym
    (Python >= 3.13) in a Python of its own, named by SFT_RAY_NEMO_GYM_PYTHON: `pytest -m nemo_gym`."""
    assert os.environ.get("SFT_RAY_NEMO_GYM_PYTHON"), "set SFT_RAY_NEMO_GYM_PYTHON to a Python with nemo-gym==0.7.0"
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = subprocess.Popen([os.environ["SFT_RAY_NEMO_GYM_PYTHON"], "-c", REAL_SERVER, str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    real = f"http://127.0.0.1:{port}"

    async def ask(base_url, route, body):
        data = b"{not json" if body is None else json.dumps(body).encode()
        async with aiohttp.ClientSession() as s:
            async with s.post(f"{base_url}/{route}", data=data,
                              headers={"Content-Type": "application/json"}) as r:
                return r.status, await r.json(content_type=None), sorted(r.cookies)

    try:
        deadline = time.time() + 120
        while True:
            try:
                run(ask(real, "seed_session", {}))
                break
            except aiohttp.ClientError:
                assert proc.poll() is None and time.time() < deadline, proc.stderr.read().decode()[-2000:]
                time.sleep(0.5)
        for route, body in protocol_cases():
            want, got = run(ask(real, route, body)), run(ask(server.base_url, route, body))
            assert got[0] == want[0], (route, body, want, got)
            assert got[2] == want[2] == ["SimpleWeatherResourcesServer___example_single_tool_call"]
            if route == "verify" and want[0] == 200:
                assert got[1]["reward"] == want[1]["reward"] and set(want[1]) <= set(got[1])
            elif want[0] != 200:
                assert type(got[1]) is type(want[1])
            else:
                assert got[1] == want[1], (route, body)
    finally:
        proc.terminate()
        proc.wait(10)
