"""MCP servers as agent environments, over real processes and sockets: a server written with the
official SDK (tests/fixtures/mcp_server.py) over stdio and Streamable HTTP, a published server
from PyPI (mcp-server-time), the mock model of sft_ray/devserver.py, and a real Ray cluster."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import find_process, make_config, read_rows, write_jsonl

from sft_ray.devserver import MockConfig, MockServer
from sft_ray.job import EXIT_OK, run

SERVER = str(Path(__file__).parents[1] / "fixtures" / "mcp_server.py")
SECRET = "mcp-s3cret-value-1234"
QWEN_TEMPLATE = (Path(__file__).parents[1] / "fixtures" / "qwen2_5_tool_template.jinja").read_text()


def stdio(*overrides: str) -> list[str]:
    return ["environment.type=mcp", f"environment.command={sys.executable}", f"environment.args=[{SERVER}]",
            "agent.max_steps=4", "verifier.type=regex", "verifier.pattern=.", *overrides]


def marker(*calls: tuple[str, dict]) -> str:
    return " ".join(f"[[tool:{name} {json.dumps(args)}]]" for name, args in calls)


def all_output_text(run_dir: Path) -> str:
    return "\n".join(p.read_text(errors="replace") for p in run_dir.rglob("*") if p.is_file()
                     and p.suffix in (".json", ".jsonl", ".txt", ".html", ".log", ""))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def secret_env(monkeypatch):
    monkeypatch.setenv("SFT_RAY_TEST_MCP_SECRET", SECRET)


@pytest.mark.usefixtures("ray_cluster", "secret_env")
def test_stdio_server_episodes_tool_results_and_training_rows(tmp_path):
    """1-3 tool calls per episode against a stdio server shared by the actor: results of every
    content kind, isError, invalid arguments answered and dropped, a row's own tools, a declared
    tool the server lacks; the train rows render through a tool template and prepare in TRL."""
    rows = [
        {"id": "one", "prompt": marker(("add", {"a": 2, "b": 3}))},
        {"id": "two", "prompt": marker(("weather", {"city": "Paris"}), ("picture", {}))},
        {"id": "three", "prompt": marker(("add", {"a": 1, "b": 1}), ("fail", {"reason": "r"}),
                                         ("secret_env", {}))},
        {"id": "invalid", "prompt": marker(("add", {"a": "two", "b": 3}))},
        {"id": "own", "prompt": marker(("add", {"a": 4, "b": 4})),
         "tools": [{"type": "function", "function": {"name": "add", "description": "mine", "parameters": {
             "type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
             "required": ["a", "b"]}}}]},
    ]
    with MockServer(MockConfig(latency_ms=5)) as server:
        inp = write_jsonl(tmp_path / "in.jsonl", rows)
        cfg = make_config(tmp_path, server, inp, *stdio("environment.env_from={MCP_TEST_SECRET: SFT_RAY_TEST_MCP_SECRET}",
                                                        "train.include_fields=[id]"))
        assert run(cfg, say=lambda s: None) == EXIT_OK
    out = {r["id"]: r for r in read_rows(tmp_path / "run" / "rollouts")}
    failed = {r["id"]: r for r in read_rows(tmp_path / "run" / "failed")}
    results = {rid: [m["content"] for m in r["messages"] if m["role"] == "tool"] for rid, r in out.items()}
    assert results["one"] == ['{"result":"5"}']  # structured content as JSON
    assert results["two"] == ['{"city":"Paris","temperature_c":5}', "a red pixel\n[image content: image/png, 12 bytes]"]
    assert results["three"][0] == '{"result":"2"}' and "failed on purpose: r" in results["three"][1]
    assert results["three"][2] == '{"result":"secret set"}'  # env_from reached the server
    assert out["three"]["num_tool_calls"] == 3 and out["three"]["num_tool_errors"] == 1  # isError counted
    inv = out["invalid"]
    assert inv["num_invalid_tool_arguments"] == 1 and inv["num_tool_errors"] == 0 and inv["termination"] == "final"
    assert json.loads(results["invalid"][0]) == {"error": "Invalid arguments for add: 'two' is not of type 'integer' "
                                                          "(at $.a)"}
    # rows with no tools are offered the server's; a row with its own gets those
    names = [t["function"]["name"] for t in out["one"]["tools"]]
    assert names[:2] == ["add", "weather"] and "hang" in names
    assert out["one"]["tools"][0]["function"]["description"] == "Add two integers."
    assert out["one"]["tools"][0]["function"]["parameters"]["required"] == ["a", "b"]
    assert [t["function"]["description"] for t in out["own"]["tools"]] == ["mine"] and results["own"] == ['{"result":"8"}']
    assert not failed
    stats = json.loads((tmp_path / "run" / "stats.json").read_text())
    assert stats["drops_by_reason"] == {"invalid_tool_arguments": 1}
    assert stats["episodes"]["invalid_tool_arguments"] == 1
    assert SECRET not in all_output_text(tmp_path / "run")  # run.json, rows, stats, logs
    train = read_rows(tmp_path / "run" / "train")
    assert sorted(r["id"] for r in train) == ["one", "own", "three", "two"]
    _renders_and_prepares(tmp_path, train)


@pytest.mark.usefixtures("ray_cluster")
def test_a_row_declaring_a_tool_the_server_lacks_is_a_bad_input_line(tmp_path):
    from sft_ray.job import RunError

    rows = [{"id": "fine", "prompt": marker(("add", {"a": 1, "b": 1}))},
            {"id": "lacking", "prompt": "x", "tools": [{"type": "function", "function": {
                "name": "launch_rockets", "parameters": {"type": "object", "properties": {}}}}]}]
    with MockServer(MockConfig()) as server:
        inp = write_jsonl(tmp_path / "in.jsonl", rows)
        cfg = make_config(tmp_path, server, inp, *stdio())
        with pytest.raises(RunError, match=rf"bad input line: {inp}:2: row 'lacking' declares tool\(s\) the MCP "
                                           r"server .* does not offer: launch_rockets \(it offers: add, fail"):
            run(cfg, say=lambda s: None)


def _renders_and_prepares(tmp_path: Path, train: list[dict]) -> None:
    """MCP rows through a Qwen2.5 tool template, and prepared by TRL's SFTTrainer on the embedded model."""
    import datasets
    from transformers import AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from sft_ray.models import resolve_model

    tok = AutoTokenizer.from_pretrained(resolve_model(None))
    tok.chat_template = QWEN_TEMPLATE  # SmolLM2's own template ignores tools
    for row in train:
        text = tok.apply_chat_template(row["messages"], tools=row["tools"], tokenize=False)
        for tool in row["tools"]:
            assert json.dumps(tool) in text
        for m in row["messages"]:
            if m["role"] == "tool":
                assert f"<tool_response>\n{m['content']}\n</tool_response>" in text
    ds = datasets.load_dataset(str(tmp_path / "run"), split="train")
    trainer = SFTTrainer(model=resolve_model(None), train_dataset=ds, processing_class=tok,
                         args=SFTConfig(output_dir=str(tmp_path / "out"), max_steps=1, report_to=[], use_cpu=True))
    texts = [tok.decode(ex["input_ids"]) for ex in trainer.train_dataset]
    assert any('{"name": "weather", "arguments": {"city": "Paris"}}' in t and
               '<tool_response>\n{"city":"Paris","temperature_c":5}\n</tool_response>' in t for t in texts)


@pytest.mark.usefixtures("ray_cluster")
def test_session_episode_gives_each_episode_its_own_server(tmp_path):
    n = 6
    rows = [{"id": f"e{i}", "prompt": marker(("remember", {"value": f"v{i}"}), ("recall", {}))} for i in range(n)]
    with MockServer(MockConfig(latency_ms=5)) as server:
        inp = write_jsonl(tmp_path / "in.jsonl", rows)
        cfg = make_config(tmp_path, server, inp, *stdio("environment.session=episode"))
        assert run(cfg, say=lambda s: None) == EXIT_OK
    out = read_rows(tmp_path / "run" / "rollouts")
    assert len(out) == n
    for r in out:
        tool = [m["content"] for m in r["messages"] if m["role"] == "tool"]
        assert tool == ['{"result":"stored 1"}', json.dumps({"result": f"v{r['id'][1:]}"}, separators=(",", ":"))]


@pytest.mark.usefixtures("ray_cluster", "secret_env")
def test_killed_server_fails_its_episodes_as_environment_errors_and_a_rerun_finishes(tmp_path):
    flag = tmp_path / "crash-next"
    flag.touch()
    n = 8
    rows = [{"id": f"k{i}", "prompt": marker(("work", {"n": i}))} for i in range(n)]
    with MockServer(MockConfig(latency_ms=5)) as server:
        inp = write_jsonl(tmp_path / "in.jsonl", rows)
        cfg = make_config(tmp_path, server, inp, *stdio(
            f"environment.env={{MCP_TEST_CRASH_FLAG: {flag}}}",
            "environment.env_from={MCP_TEST_SECRET: SFT_RAY_TEST_MCP_SECRET}", "max_error_fraction=1",
            "environment.max_concurrent_calls=1"))
        run(cfg, say=lambda s: None)
        failed = read_rows(tmp_path / "run" / "failed")
        done = read_rows(tmp_path / "run" / "rollouts")
        # the call in flight when the server died fails; the calls queued behind it go to the restarted one
        assert not flag.exists() and len(failed) == 1 and len(done) == n - 1
        for r in failed:
            assert r["error"]["type"] == "environment_error" and r["reward"] is None
            assert "connection closed" in r["error"]["message"]
        # the server's last stderr lines are in the record, its secret redacted
        assert any("crashing on purpose with secret=***" in r["error"]["message"] for r in failed)
        assert run(cfg, say=lambda s: None) == EXIT_OK
    rollouts = read_rows(tmp_path / "run" / "rollouts")
    assert sorted(r["id"] for r in rollouts) == sorted(f"k{i}" for i in range(n))  # each once
    assert all(r["messages"][-1]["content"] == json.dumps({"result": f"worked {r['id'][1:]}"}, separators=(",", ":"))
               for r in rollouts)
    assert SECRET not in all_output_text(tmp_path / "run")


def test_hung_server_is_restarted_and_its_call_fails_as_an_environment_failure():
    """Directly in an event loop (as the generation actor runs it): a call past call_timeout_s."""
    from sft_ray.environments.base import EnvironmentFailure
    from sft_ray.environments.mcp import McpEnvironment

    async def go():
        env = McpEnvironment({"type": "mcp", "command": sys.executable, "args": [SERVER], "call_timeout_s": 1.5})
        await env.start()
        try:
            ep = await env.open({}, "a")
            t0 = time.monotonic()
            with pytest.raises(EnvironmentFailure, match=r"hang got no answer within call_timeout_s=1.5 s; "
                                                         r"server stderr: test server starting"):
                await ep.call("hang", {})
            assert time.monotonic() - t0 < 5
            ep2 = await env.open({}, "b")  # a new server
            assert (await ep2.call("add", {"a": 1, "b": 2})).text == '{"result":"3"}'
        finally:
            await env.close()

    asyncio.run(go())
    assert find_process(SERVER) is None  # the hung server was killed, the new one stopped


def test_session_episode_servers_are_stopped_with_their_episodes():
    from sft_ray.environments.mcp import McpEnvironment

    async def go():
        env = McpEnvironment({"type": "mcp", "command": sys.executable, "args": [SERVER], "session": "episode"})
        await env.start()
        episodes = [await env.open({}, f"e{i}") for i in range(3)]
        for i, ep in enumerate(episodes):
            await ep.call("remember", {"value": f"v{i}"})
        assert [(await ep.call("recall", {})).text for ep in episodes] == [
            '{"result":"v0"}', '{"result":"v1"}', '{"result":"v2"}']
        for ep in episodes:
            await ep.close()
        assert find_process(SERVER) is None
        await env.close()

    asyncio.run(go())


def test_server_that_does_not_start_fails_episodes_not_the_actor(tmp_path):
    from sft_ray.environments.base import EnvironmentFailure
    from sft_ray.environments.mcp import McpEnvironment

    bad = tmp_path / "bad_server.py"
    bad.write_text("import sys\nprint('cannot start: missing database', file=sys.stderr)\nsys.exit(3)\n")

    async def go():
        env = McpEnvironment({"type": "mcp", "command": sys.executable, "args": [str(bad)], "connect_timeout_s": 20})
        await env.start()  # no exception: the actor stays up
        with pytest.raises(EnvironmentFailure, match="cannot start: missing database"):
            await env.open({}, "a")
        await env.close()

    asyncio.run(go())


@pytest.fixture
def http_server(tmp_path):
    port = free_port()
    env = {**os.environ, "MCP_TEST_SECRET": SECRET}
    log = open(tmp_path / "http_server.log", "wb")
    proc = subprocess.Popen([sys.executable, SERVER, "http", str(port)], env=env, stdout=log, stderr=log)
    try:
        end = time.time() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert proc.poll() is None and time.time() < end, (tmp_path / "http_server.log").read_text()
                time.sleep(0.2)
        yield f"http://127.0.0.1:{port}/mcp"
    finally:
        proc.terminate()
        proc.wait(15)
        log.close()


@pytest.mark.usefixtures("ray_cluster", "secret_env")
def test_streamable_http_server_with_a_secret_header(tmp_path, http_server):
    rows = [{"id": f"h{i}", "prompt": marker(("add", {"a": i, "b": 1}), ("header_check", {}))} for i in range(4)]
    with MockServer(MockConfig(latency_ms=5)) as server:
        inp = write_jsonl(tmp_path / "in.jsonl", rows)
        cfg = make_config(tmp_path, server, inp, "environment.type=mcp", f"environment.url={http_server}",
                          "environment.headers_env={X-Test-Key: SFT_RAY_TEST_MCP_SECRET}",
                          "verifier.type=regex", "verifier.pattern=.")
        assert run(cfg, say=lambda s: None) == EXIT_OK
    out = read_rows(tmp_path / "run" / "rollouts")
    assert len(out) == 4
    for r in out:
        i = int(r["id"][1:])
        assert [m["content"] for m in r["messages"] if m["role"] == "tool"] == [
            json.dumps({"result": str(i + 1)}, separators=(",", ":")), '{"result":"header ok"}']
    run_json = (tmp_path / "run" / "run.json").read_text()
    assert "SFT_RAY_TEST_MCP_SECRET" in run_json and SECRET not in all_output_text(tmp_path / "run")


@pytest.mark.usefixtures("ray_cluster")
def test_published_pypi_server_mcp_server_time(tmp_path):
    """mcp-server-time, the reference time server from PyPI, unchanged, as an environment."""
    command = shutil.which("mcp-server-time", path=os.path.dirname(sys.executable))
    assert command, "mcp-server-time is in the test extra"
    rows = [{"id": "now", "prompt": marker(("get_current_time", {"timezone": "Europe/Paris"}))},
            {"id": "convert", "prompt": marker(("convert_time", {"source_timezone": "UTC", "time": "12:00",
                                                                 "target_timezone": "Asia/Tokyo"}))},
            {"id": "missing", "prompt": marker(("convert_time", {"source_timezone": "UTC"}))},
            {"id": "bad_zone", "prompt": marker(("get_current_time", {"timezone": "Mars/Olympus"}))}]
    with MockServer(MockConfig(latency_ms=5)) as server:
        inp = write_jsonl(tmp_path / "in.jsonl", rows)
        cfg = make_config(tmp_path, server, inp, "environment.type=mcp", f"environment.command={command}",
                          "environment.args=[--local-timezone, UTC]", "verifier.type=regex", "verifier.pattern=.")
        assert run(cfg, say=lambda s: None) == EXIT_OK
    out = {r["id"]: r for r in read_rows(tmp_path / "run" / "rollouts")}
    assert {t["function"]["name"] for t in out["now"]["tools"]} == {"get_current_time", "convert_time"}
    now = json.loads(out["now"]["messages"][2]["content"])
    assert now["timezone"] == "Europe/Paris" and now["datetime"]
    conv = json.loads(out["convert"]["messages"][2]["content"])
    assert "T21:00" in conv["target"]["datetime"]
    assert out["missing"]["num_invalid_tool_arguments"] == 1  # checked against the server's schema, not sent
    assert "is a required property" in out["missing"]["messages"][2]["content"]
    assert out["bad_zone"]["num_tool_errors"] == 1  # the server's own error, shown to the model


def test_validate_lists_the_servers_tools_and_checks_declared_ones(tmp_path):
    from sft_ray.configload import load_config
    from sft_ray.validate import check_input

    inp = write_jsonl(tmp_path / "in.jsonl", [
        {"id": "a", "prompt": "x"},
        {"id": "b", "prompt": "x", "tools": [{"type": "function", "function": {"name": "add", "parameters": {}}}]},
        {"id": "c", "prompt": "x", "tools": [{"type": "function", "function": {"name": "launch", "parameters": {}}}]},
        {"id": "d", "prompt": "x", "tools": [{"type": "function", "function": {
            "name": "add", "parameters": {"type": "object", "properties": {"a": {"type": "nope"}}}}}]},
    ])
    cfg = load_config(None, [f"input={inp}", f"output={tmp_path / 'run'}", "model.base_url=http://127.0.0.1:9/v1",
                             "model.name=mock", "verifier.type=none",
                             "environment.type=mcp", f"environment.command={sys.executable}",
                             f"environment.args=[{SERVER}]"])
    problems, summary = check_input(cfg)
    assert "MCP server offers 10 tool(s):" in summary
    assert '  add: {"properties":{"a":{"title":"A","type":"integer"}' in summary
    assert problems == [f"{inp}:3: field tools: the MCP server does not offer launch (it offers: add, fail, hang, "
                        "header_check, picture, recall, remember, secret_env, weather, work)",
                        f"{inp}:4: tool 'add': its parameters are not a valid JSON Schema: 'nope' is not valid "
                        "under any of the given schemas (at properties/a/type)"]


@pytest.mark.usefixtures("ray_cluster")
def test_a_server_command_that_does_not_exist_stops_the_run_before_it_starts(tmp_path):
    from sft_ray.job import RunError

    with MockServer(MockConfig()) as server:
        inp = write_jsonl(tmp_path / "in.jsonl", [{"id": "a", "prompt": "x"}])
        cfg = make_config(tmp_path, server, inp, "environment.type=mcp", "environment.command=no-such-mcp-server-xyz")
        with pytest.raises(RunError, match="environment: environment.command: 'no-such-mcp-server-xyz' is not a "
                                           "program on PATH"):
            run(cfg, say=lambda s: None)
        cfg = make_config(tmp_path, server, inp, *stdio("environment.env_from={TOKEN: SFT_RAY_UNSET_VAR_X}"))
        with pytest.raises(RunError, match=r"environment.env_from: environment variable\(s\) not set: TOKEN"):
            run(cfg, say=lambda s: None)
    assert not (tmp_path / "run").exists()
