"""Agent episodes end to end: real Ray, the mock server as an agent model over real sockets,
Python tool modules and a NeMo Gym-protocol resources server on 127.0.0.1."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import make_config, read_rows, write_jsonl
from nemo_gym_server import NemoGymServer

from sft_ray.devserver import MockConfig, MockServer
from sft_ray.job import EXIT_OK, run

pytestmark = pytest.mark.usefixtures("ray_cluster")

TOOLS = str(Path(__file__).parents[1] / "fixtures" / "agent_tools.py")
WEATHER_TOOL = {"type": "function", "name": "get_weather", "description": "", "strict": True,
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"],
                               "additionalProperties": False}}


def nemo_row(i: int, text: str, **extra) -> dict:
    return {"id": f"r{i}", "responses_create_params": {
        "input": [{"role": "developer", "content": "You are a helpful assistant."}, {"role": "user", "content": text}],
        "tools": [WEATHER_TOOL]}, **extra}


def agent_config(tmp_path, server, inp, *overrides):
    # The regex verifier unless the test names its own (a key of another verifier type is refused).
    verifier = () if any(o.startswith("verifier.type=") for o in overrides) else (
        "verifier.type=regex", "verifier.pattern=is cold")
    return make_config(tmp_path, server, inp, "environment.type=python", f"environment.module={TOOLS}",
                       *verifier, "agent.max_steps=4", *overrides)


@pytest.mark.parametrize("api", ["chat", "responses"])
def test_episodes_in_both_apis(tmp_path, api):
    n = 40
    with MockServer(MockConfig(latency_ms=20)) as server:
        inp = write_jsonl(tmp_path / "in.jsonl", [nemo_row(i, f"weather in city{i}?") for i in range(n)])
        cfg = agent_config(tmp_path, server, inp, f"model.api={api}", "num_samples_in_parallel=8")
        assert run(cfg, say=lambda s: None) == EXIT_OK
        stats = server.state
    rows = read_rows(tmp_path / "run" / "rollouts")
    assert len(rows) == n and not read_rows(tmp_path / "run" / "failed")
    assert stats.max_in_flight <= 8  # every model call of every episode counts against the cap
    assert stats.requests == 2 * n  # two model calls per episode, nothing re-sent
    for r in rows:
        i = int(r["id"][1:])
        assert r["termination"] == "final" and r["num_model_calls"] == 2 and r["num_tool_calls"] == 1
        assert r["num_tool_errors"] == 0 and r["num_malformed_tool_calls"] == 0
        assert r["attempts"] == 1  # nothing retried (not one per model call)
        system, user, call, result, final = r["messages"]
        assert system == {"role": "system", "content": "You are a helpful assistant."}  # developer -> system
        assert call["role"] == "assistant" and call["content"] is None
        (tc,) = call["tool_calls"]
        assert tc["type"] == "function" and tc["function"]["name"] == "get_weather"
        assert json.loads(tc["function"]["arguments"]) == {"city": f"weather in city{i}?"}
        assert result == {"role": "tool", "tool_call_id": tc["id"], "name": "get_weather",
                          "content": json.dumps({"city": f"weather in city{i}?",
                                                 "weather_description": f"The weather in weather in city{i}? is cold."},
                                                separators=(",", ":"))}
        assert final["role"] == "assistant" and "is cold" in final["content"] and r["response"] == final["content"]
        assert r["tools"] == [{"type": "function", "function": {"name": "get_weather", "description": "",
                                                                "parameters": WEATHER_TOOL["parameters"],
                                                                "strict": True}}]
        assert r["reward"] == 1.0 and r["usage"]["output_tokens"] > 0


def test_parallel_calls_stateful_episodes_and_bad_calls(tmp_path):
    """Several calls in one turn, run in order against per-episode state under concurrency;
    an unknown tool and bad JSON are answered to the model and counted; an exception in a
    tool is a model-visible error."""
    log = tmp_path / "closed.txt"
    n = 30
    rows = [{"id": f"s{i}", "close_log": str(log),
             "prompt": f'[[tool:write {{"text": "note-{i}"}}]] [[tool:read {{}}]] [[tool:nope {{}}]]'}
            for i in range(n)]
    with MockServer(MockConfig(latency_ms=10)) as server:
        inp = write_jsonl(tmp_path / "in.jsonl", rows)
        cfg = make_config(tmp_path, server, inp, "environment.type=python", f"environment.module={TOOLS}",
                          "environment.episode_class=Notebook", "verifier.type=none", "num_samples_in_parallel=16")
        assert run(cfg, say=lambda s: None) == EXIT_OK
    out = {r["id"]: r for r in read_rows(tmp_path / "run" / "rollouts")}
    for i in range(n):
        r = out[f"s{i}"]
        turn = r["messages"][1]
        assert [c["function"]["name"] for c in turn["tool_calls"]] == ["write", "read", "nope"]
        assert len({c["id"] for c in turn["tool_calls"]}) == 3
        results = r["messages"][2:5]
        assert [m["tool_call_id"] for m in results] == [c["id"] for c in turn["tool_calls"]]
        assert json.loads(results[1]["content"]) == [f"note-{i}"]  # this episode's notes only
        assert "Unknown tool" in json.loads(results[2]["content"])["error"]
        assert r["num_tool_calls"] == 3 and r["num_malformed_tool_calls"] == 1 and r["termination"] == "final"
    assert sorted(log.read_text().split()) == sorted(f"s{i}" for i in range(n))  # each episode closed once


def test_arguments_that_are_not_json_are_answered_and_counted(tmp_path):
    with MockServer(MockConfig(tool_malformed_rate=1.0)) as server:
        inp = write_jsonl(tmp_path / "in.jsonl", [nemo_row(i, f"c{i}") for i in range(5)])
        cfg = agent_config(tmp_path, server, inp, "verifier.type=none")
        assert run(cfg, say=lambda s: None) == EXIT_OK
    for r in read_rows(tmp_path / "run" / "rollouts"):
        assert r["num_malformed_tool_calls"] == 1 and r["num_tool_calls"] == 1 and r["termination"] == "final"
        assert "Invalid tool call arguments" in json.loads(r["messages"][3]["content"])["error"]


def test_tool_exception_max_steps_and_episode_timeout(tmp_path):
    rows = [{"id": "boom", "prompt": '[[tool:explode {"reason": "x"}]]'},
            {"id": "loop", "prompt": '[[steps:10]] [[tool:add {"a": 1, "b": 2}]]'},
            {"id": "slow", "prompt": '[[tool:slow {"seconds": 30}]]'}]
    with MockServer(MockConfig()) as server:
        inp = write_jsonl(tmp_path / "in.jsonl", rows)
        cfg = agent_config(tmp_path, server, inp, "agent.max_steps=3", "agent.timeout_s=2", "verifier.type=none",
                           "max_error_fraction=1")
        run(cfg, say=lambda s: None)
    out = {r["id"]: r for r in read_rows(tmp_path / "run" / "rollouts")}
    failed = {r["id"]: r for r in read_rows(tmp_path / "run" / "failed")}
    boom = out["boom"]
    assert json.loads(boom["messages"][2]["content"]) == {"error": "RuntimeError: boom: x"}
    assert boom["num_tool_errors"] == 1 and boom["termination"] == "final"
    loop = out["loop"]
    assert loop["termination"] == "max_steps" and loop["num_model_calls"] == 3 and loop["num_tool_calls"] == 3
    assert loop["messages"][-1]["role"] == "tool" and loop["response"] is None
    assert failed["slow"]["error"]["type"] == "episode_timeout"  # infrastructure: retried by a rerun, no reward
    assert failed["slow"]["reward"] is None


def test_rows_with_tools_need_an_environment(tmp_path):
    with MockServer(MockConfig()) as server:
        inp = write_jsonl(tmp_path / "in.jsonl", [nemo_row(0, "sf?")])
        cfg = make_config(tmp_path, server, inp, "verifier.type=none", "max_error_fraction=1")
        run(cfg, say=lambda s: None)
    (row,) = read_rows(tmp_path / "run" / "failed")
    assert row["error"]["type"] == "environment_error" and "environment.type" in row["error"]["message"]


def test_bad_tool_module_is_one_clear_error(tmp_path):
    from sft_ray.job import RunError

    with MockServer(MockConfig()) as server:
        inp = write_jsonl(tmp_path / "in.jsonl", [nemo_row(0, "sf?")])
        cfg = make_config(tmp_path, server, inp, "environment.type=python",
                          f"environment.module={tmp_path / 'missing.py'}")
        with pytest.raises(RunError, match="environment: environment.module: file not found"):
            run(cfg, say=lambda s: None)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("api", ["chat", "responses"])
def test_nemo_gym_resources_server(tmp_path, api):
    """Seed, tools, verify and close per episode, each episode with its own session cookie."""
    n = 24
    rows = [nemo_row(i, f"[[tool:get_weather {{\"city\": \"c{i}\"}}]] [[tool:remember {{\"value\": \"v{i}\"}}]] "
                        f"[[tool:recall {{}}]]") for i in range(n)]
    rows.append(nemo_row(99, "[[tool:broken_tool {}]]"))
    for r in rows:
        r["responses_create_params"]["tools"] += [
            {"type": "function", "name": name, "parameters": {"type": "object", "properties": {}}}
            for name in ("remember", "recall", "broken_tool")]
    with MockServer(MockConfig(latency_ms=10)) as server, NemoGymServer() as gym:
        inp = write_jsonl(tmp_path / "in.jsonl", rows)
        cfg = make_config(tmp_path, server, inp, f"model.api={api}", "environment.type=nemo_gym",
                          f"environment.base_url={gym.base_url}", "verifier.type=nemo_gym",
                          "num_samples_in_parallel=8")
        assert run(cfg, say=lambda s: None) == EXIT_OK
        counts = dict(gym.counts)
        sessions = dict(gym.sessions)
        closed = list(gym.closed)
    out = {r["id"]: r for r in read_rows(tmp_path / "run" / "rollouts")}
    assert counts["seed_session"] == counts["verify"] == counts["close_session"] == n + 1
    for i in range(n):
        r = out[f"r{i}"]
        results = [m for m in r["messages"] if m["role"] == "tool"]
        assert json.loads(results[2]["content"]) == {"value": f"v{i}"}  # this session's state, not another's
        assert r["reward"] == 1.0 and r["verify_result"]["session_tool_calls"] == 3
        assert r["verify_result"]["seeded"] == 1.0
    broken = out["r99"]
    assert broken["num_tool_errors"] == 1 and broken["reward"] == 0.0  # a real verdict: no get_weather call
    # every episode used one session from seed to verify (the server saw its cookie on each later call)
    assert len(sessions) == n + 1  # a lost cookie would have opened a new session
    assert all(s["routes"][0] == "seed_session" and s["routes"][-2:] == ["verify", "close_session"]
               for s in sessions.values())
    assert len({c["resources_session_id"] for c in closed}) == n + 1


def test_nemo_gym_server_down_is_an_infrastructure_failure(tmp_path):
    with MockServer(MockConfig()) as server:
        inp = write_jsonl(tmp_path / "in.jsonl", [nemo_row(0, "sf?")])
        cfg = make_config(tmp_path, server, inp, "environment.type=nemo_gym",
                          "environment.base_url=http://127.0.0.1:9", "environment.max_retries=1",
                          "environment.base_retry_wait_s=0.01", "verifier.type=nemo_gym", "max_error_fraction=1")
        run(cfg, say=lambda s: None)
    (row,) = read_rows(tmp_path / "run" / "failed")
    assert row["error"]["type"] == "environment_error" and row["reward"] is None
    assert not read_rows(tmp_path / "run" / "rollouts")


def test_rerun_finishes_an_interrupted_agent_run_without_resending(tmp_path):
    """An episode that fails at any model call fails as a whole and a rerun runs it again from
    the start; finished episodes are never sent again. The mock fails the first attempt of
    every model call of the marked rows, so with no retries they fail at their first call in
    run 1, at their second call (mid-episode) in run 2, and finish in run 3."""
    n = 20
    bad = n // 4
    rows = [nemo_row(i, f"sf{i}?" + (" [[fail:500:1]]" if i % 4 == 0 else "")) for i in range(n)]
    with MockServer(MockConfig(latency_ms=5)) as server:
        inp = write_jsonl(tmp_path / "in.jsonl", rows)
        cfg = agent_config(tmp_path, server, inp, "model.max_retries=0", "max_error_fraction=1")
        sent = []
        for _ in range(3):
            before = server.state.requests
            run(cfg, say=lambda s: None)
            sent.append(server.state.requests - before)
        assert sent == [2 * (n - bad) + bad, 2 * bad, 2 * bad]
    rollouts = read_rows(tmp_path / "run" / "rollouts")
    assert sorted(r["id"] for r in rollouts) == sorted(f"r{i}" for i in range(n))  # every sample once
    assert all(r["termination"] == "final" and r["num_model_calls"] == 2 for r in rollouts)


@pytest.mark.parametrize("keep", [False, True])
def test_arguments_against_the_schema_python_and_nemo_gym(tmp_path, keep):
    """For every environment type: a call whose JSON object violates the tool's schema is not run,
    the model reads why (and may call again), the call is counted, and the episode is dropped from
    train/ unless filter.keep_invalid_tool_arguments."""
    py_rows = [{"id": "ok", "prompt": '[[tool:add {"a": 1, "b": 2}]]'},
               {"id": "wrong_type", "prompt": '[[tool:add {"a": "one"}]]'},
               {"id": "missing", "prompt": '[[tool:add {"b": 2}]]'}]
    gym_rows = [nemo_row(0, '[[tool:get_weather {"city": "Paris", "units": "C"}]]'),
                nemo_row(1, '[[tool:get_weather {"city": 7}]]')]
    with MockServer(MockConfig()) as server, NemoGymServer() as gym:
        inp = write_jsonl(tmp_path / "py.jsonl", py_rows)
        cfg = make_config(tmp_path, server, inp, "environment.type=python", f"environment.module={TOOLS}",
                          "verifier.type=regex", "verifier.pattern=.", f"filter.keep_invalid_tool_arguments={keep}",
                          "train.include_fields=[id]")
        assert run(cfg, say=lambda s: None) == EXIT_OK
        inp = write_jsonl(tmp_path / "gym.jsonl", gym_rows)
        gym_cfg = make_config(tmp_path, server, inp, "environment.type=nemo_gym", f"output={tmp_path / 'gym'}",
                              f"environment.base_url={gym.base_url}", "verifier.type=none")
        assert run(gym_cfg, say=lambda s: None) == EXIT_OK
        gym_calls = dict(gym.counts)
    out = {r["id"]: r for r in read_rows(tmp_path / "run" / "rollouts")}
    answer = {k: json.loads(r["messages"][2]["content"]) for k, r in out.items()}
    assert answer["ok"] == 3 and out["ok"]["num_invalid_tool_arguments"] == 0
    assert answer["wrong_type"] == {"error": "Invalid arguments for add: 'one' is not of type 'integer' (at $.a)"}
    assert answer["missing"] == {"error": "Invalid arguments for add: 'a' is a required property"}
    for k in ("wrong_type", "missing"):
        assert out[k]["num_invalid_tool_arguments"] == 1 and out[k]["num_tool_errors"] == 0
        assert out[k]["num_malformed_tool_calls"] == 0 and out[k]["termination"] == "final"
    stats = json.loads((tmp_path / "run" / "stats.json").read_text())
    train = {r["id"] for r in read_rows(tmp_path / "run" / "train")}
    if keep:
        assert train == {"ok", "wrong_type", "missing"} and not stats["drops_by_reason"]
    else:
        assert train == {"ok"} and stats["drops_by_reason"] == {"invalid_tool_arguments": 2}
    gym_out = {r["id"]: r for r in read_rows(tmp_path / "gym" / "rollouts")}
    extra = json.loads(gym_out["r0"]["messages"][3]["content"])["error"]
    assert extra == "Invalid arguments for get_weather: Additional properties are not allowed ('units' was unexpected)"
    assert "7 is not of type 'string' (at $.city)" in gym_out["r1"]["messages"][3]["content"]
    assert all(r["num_invalid_tool_arguments"] == 1 for r in gym_out.values())
    assert "get_weather" not in gym_calls  # never sent to the resources server


@pytest.mark.parametrize("schema, message", [
    ({"type": "object", "properties": {"a": {"type": "nope"}}}, "its parameters are not a valid JSON Schema"),
    ({"$ref": "#"}, r"refers to itself without end \(\$ref\)"),
    ({"$ref": "http://169.254.169.254/latest/meta-data"}, "references to other documents are not fetched"),
    ({"type": "object", "description": "x" * 300_000}, "over the 262144 bytes allowed"),
])
def test_hostile_tool_schemas_are_clear_bad_input_errors(tmp_path, schema, message):
    from sft_ray.job import RunError

    tools = [{"type": "function", "function": {"name": "add", "parameters": schema}}]
    rows = [{"id": "fine", "prompt": '[[tool:add {"a": 1}]]'},
            {"id": "hostile", "prompt": '[[tool:add {"a": 1}]]', "tools": tools}]
    with MockServer(MockConfig()) as server:
        inp = write_jsonl(tmp_path / "in.jsonl", rows)
        cfg = make_config(tmp_path, server, inp, "environment.type=python", f"environment.module={TOOLS}",
                          "verifier.type=none")
        with pytest.raises(RunError, match=rf"bad input line: {inp}:2: row 'hostile': tool 'add': .*{message}"):
            run(cfg, say=lambda s: None)
    assert [r["id"] for r in read_rows(tmp_path / "run" / "rollouts")] == ["fine"]  # work done is kept


def test_a_row_whose_tools_are_bad_input_is_skipped_and_counted_with_skip_bad_lines(tmp_path):
    # Issue 29: the stop above says "use read.skip_bad_lines=true to skip and count such lines"; with it,
    # the row whose tools are bad (found in its episode, not at read) is a counted bad_input failure and
    # the run goes on.
    tools = [{"type": "function", "function": {"name": "add", "parameters": {"$ref": "#"}}}]
    rows = [{"id": "fine", "prompt": '[[tool:add {"a": 1}]]'},
            {"id": "hostile", "prompt": '[[tool:add {"a": 1}]]', "tools": tools},
            {"id": "after", "prompt": "no tools"}]
    with MockServer(MockConfig()) as server:
        inp = write_jsonl(tmp_path / "in.jsonl", rows)
        cfg = make_config(tmp_path, server, inp, "environment.type=python", f"environment.module={TOOLS}",
                          "verifier.type=none", "read.skip_bad_lines=true", "max_error_fraction=1")
        run(cfg, say=lambda s: None)
    assert sorted(r["id"] for r in read_rows(tmp_path / "run" / "rollouts")) == ["after", "fine"]
    [failed] = read_rows(tmp_path / "run" / "failed")
    assert failed["id"] == "hostile" and failed["error"]["type"] == "bad_input"
    assert f"{inp}:2: row 'hostile': tool 'add'" in failed["error"]["message"]
    stats = json.loads((tmp_path / "run" / "stats.json").read_text())
    assert stats["errors_by_type"] == {"bad_input": 1}, stats
