"""`sft-ray run` with `model.backend: anthropic` on Ray against the mock's /v1/messages and Message Batches:
single-turn rows of every input shape with thinking and caching, agent episodes with tools and thinking,
and Message Batches (errored lines retried, expired ones sent again, any row id, batch prices)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from sft_ray.configload import load_config
from sft_ray.devserver import MockConfig, MockServer
from sft_ray.job import EXIT_OK, run
from tests.conftest import read_rows, write_jsonl

ROOT = Path(__file__).resolve().parents[2]
KEY = "sk-ant-api03-RUNSECRET-abcdefghijklmnopqrstuvwxyz0123"


def _config(tmp_path: Path, server: MockServer, rows: list, *extra: str):
    inp = write_jsonl(tmp_path / "in.jsonl", rows)
    return load_config(None, [
        f"input={inp}", f"output={tmp_path / 'run'}", "model.backend=anthropic", "model.name=claude-sonnet-4-5",
        f"model.base_url={server.url[:-len('/v1')]}", "model.timeout_s=5", "model.base_retry_wait_s=0.01",
        "model.max_retry_wait_s=0.2", "model.api_key_env=SFT_RAY_TEST_ANTHROPIC_KEY", "num_samples_in_parallel=8",
        "responses_create_params.max_output_tokens=2048", *extra])


def _everything(run_dir: Path) -> str:
    return "\n".join(p.read_text(errors="replace") for p in run_dir.rglob("*") if p.is_file())


def test_single_turn_rows_of_every_shape_with_thinking_and_a_cached_system_prompt(tmp_path, ray_cluster,
                                                                                 monkeypatch):
    monkeypatch.setenv("SFT_RAY_TEST_ANTHROPIC_KEY", KEY)
    system = "You answer in the words of the question. " * 5
    rows = [{"id": f"p{i}", "prompt": f"answer {i}", "system": system, "expected_answer": f"answer {i}"}
            for i in range(6)]
    rows += [{"id": "chat", "messages": [{"role": "system", "content": system}, {"role": "user", "content": "hi"}],
              "expected_answer": "hi"},
             {"id": "gym", "responses_create_params": {"input": [{"role": "developer", "content": system},
                                                                 {"role": "user", "content": "gym row"}]},
              "expected_answer": "gym row"}]
    with MockServer(MockConfig()) as server:
        server.state.keep_bodies = 20
        cfg = _config(tmp_path, server, rows, "model.thinking.budget_tokens=1024", "verifier.type=exact_match",
                      "pricing.input_per_mtok=3", "pricing.output_per_mtok=15", "train.reasoning=keep")
        assert run(cfg, say=lambda s: None) == EXIT_OK
        assert server.state.api_key_headers == {KEY}
        assert all("system" in b and all(m["role"] != "system" for m in b["messages"]) for b in server.state.bodies)
    run_dir = tmp_path / "run"
    out = {r["id"]: r for r in read_rows(run_dir / "rollouts")}
    assert len(out) == 8 and all(r["reward"] == 1.0 for r in out.values())
    assert out["p0"]["reasoning"] == "Thinking about: answer 0"
    stats = json.loads((run_dir / "stats.json").read_text())
    tok = stats["tokens"]
    assert tok["cache_read_input_tokens"] > 0 and tok["cache_creation_input_tokens"] > 0  # the system prompt
    assert stats["spend"]["cache_saved_usd"] > 0
    train = read_rows(run_dir / "train")
    assert all(m.get("reasoning_content") for t in train for m in t["messages"] if m["role"] == "assistant")
    assert KEY not in _everything(run_dir) and KEY[:16] not in _everything(run_dir)


def test_agent_episodes_with_tools_thinking_and_caching(tmp_path, ray_cluster, monkeypatch):
    monkeypatch.setenv("SFT_RAY_TEST_ANTHROPIC_KEY", KEY)
    weather = [json.loads(line) for line in (ROOT / "examples" / "agent-weather.jsonl").read_text().splitlines()][:3]
    weather[0]["responses_create_params"]["input"][-1]["content"] = "[[steps:3]] Weather in Oslo?"
    with MockServer(MockConfig()) as server:
        server.state.keep_bodies = 50
        cfg = _config(tmp_path, server, weather, "model.thinking.budget_tokens=1024", "environment.type=python",
                      f"environment.module={ROOT / 'examples' / 'tools_weather.py'}", "agent.max_steps=6",
                      "verifier.type=regex", "verifier.pattern=The weather in .+ is",
                      "pricing.input_per_mtok=3", "pricing.output_per_mtok=15")
        assert run(cfg, say=lambda s: None) == EXIT_OK
        # every continuation carried its thinking blocks back (the mock refuses one that does not)
        assert server.state.by_status.get(400, 0) == 0
    run_dir = tmp_path / "run"
    out = {r["id"]: r for r in read_rows(run_dir / "rollouts")}
    assert len(out) == 3 and all(r["reward"] == 1.0 for r in out.values())
    three = out[weather[0]["id"]]
    assert three["num_model_calls"] == 4 and three["num_tool_calls"] == 3
    calls = [m for m in three["messages"] if m["role"] == "assistant" and m.get("tool_calls")]
    assert calls[0]["tool_calls"][0]["function"]["name"] == "get_weather"
    assert all(m["thinking_blocks"][0]["signature"] for m in calls)
    assert three["usage"]["cache_read_input_tokens"] > 0
    train = read_rows(run_dir / "train")
    assert train and "signature" not in json.dumps(train)  # training rows carry the thinking text only


def _rows(n: int) -> list[dict]:
    return [{"id": f"r{i}", "prompt": f"answer {i}", "expected_answer": f"answer {i}"} for i in range(n)]


def test_message_batches_retry_errored_lines_resend_expired_ones_and_take_any_row_id(tmp_path, ray_cluster,
                                                                                    monkeypatch):
    monkeypatch.setenv("SFT_RAY_TEST_ANTHROPIC_KEY", KEY)
    rows = _rows(60)
    rows[0]["id"] = "ünïcode id with spaces/and:colons"
    rows[1]["id"] = "x" * 200
    rows[2]["prompt"] = rows[2]["expected_answer"] = "[[batch_error:1]] flaky"
    rows[3]["prompt"] = "[[status:400]] never"
    with MockServer(MockConfig(batch_expire=1, batch_expire_keep=0.5)) as server:
        cfg = _config(tmp_path, server, rows, "model.batch.enabled=true", "model.batch.poll_interval_s=0.1",
                      "verifier.type=exact_match", "max_error_fraction=0.1", "pricing.input_per_mtok=3",
                      "pricing.output_per_mtok=15", "responses_create_params.max_output_tokens=64")
        lines: list[str] = []
        assert run(cfg, say=lines.append) == EXIT_OK
        assert server.state.requests == 0  # nothing went online
        assert max(server.state.batch_lines.values()) <= 3
    run_dir = tmp_path / "run"
    keys = Counter((r["id"], r["sample_index"]) for r in read_rows(run_dir / "rollouts"))
    assert len(keys) == 59 and set(keys.values()) == {1}
    assert (rows[0]["id"], 0) in keys and (rows[1]["id"], 0) in keys
    failed = read_rows(run_dir / "failed")
    assert [(f["id"], f["error"]["type"]) for f in failed] == [("r3", "context_length")]
    assert "prompt is too long" in failed[0]["error"]["message"]
    events = [json.loads(x) for x in (run_dir / "batches.jsonl").read_text().splitlines()]
    assert [e["status"] for e in events if e["event"] == "collected"][0] == "expired"
    stats = json.loads((run_dir / "stats.json").read_text())
    assert stats["spend"]["pricing"]["input_per_mtok"] == pytest.approx(1.5)  # the batch discount
    assert KEY not in _everything(run_dir)


def test_agent_episodes_go_in_message_batch_rounds(tmp_path, ray_cluster, monkeypatch):
    monkeypatch.setenv("SFT_RAY_TEST_ANTHROPIC_KEY", KEY)
    weather = [json.loads(line) for line in (ROOT / "examples" / "agent-weather.jsonl").read_text().splitlines()][:3]
    with MockServer(MockConfig()) as server:
        cfg = _config(tmp_path, server, weather, "model.batch.enabled=true", "model.batch.poll_interval_s=0.1",
                      "model.thinking.budget_tokens=1024", "environment.type=python",
                      f"environment.module={ROOT / 'examples' / 'tools_weather.py'}", "agent.max_steps=4",
                      "verifier.type=regex", "verifier.pattern=The weather in .+ is")
        assert run(cfg, say=lambda s: None) == EXIT_OK
        assert server.state.requests == 0 and server.state.batches_created == 2  # one round per model turn
    out = read_rows(tmp_path / "run" / "rollouts")
    assert len(out) == 3 and all(r["reward"] == 1.0 and r["num_model_calls"] == 2 for r in out)


def test_kill_9_while_message_batches_wait_then_rerun_submits_nothing_twice(tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    inp = write_jsonl(tmp_path / "in.jsonl", _rows(3000))
    config = {"input": str(inp), "output": str(tmp_path / "run"),
              "model": {"backend": "anthropic", "name": "claude-sonnet-4-5", "timeout_s": 5,
                        "api_key_env": "SFT_RAY_TEST_ANTHROPIC_KEY",
                        "batch": {"enabled": True, "poll_interval_s": 0.1, "max_requests": 1000, "max_in_flight": 2}},
              "responses_create_params": {"max_output_tokens": 64}, "verifier": {"type": "exact_match"}}
    with MockServer(MockConfig(batch_delay_s=4.0)) as server:
        config["model"]["base_url"] = server.url[:-len("/v1")]
        path = tmp_path / "config.yaml"
        path.write_text(json.dumps(config))  # JSON is YAML
        env = {**os.environ, "PYTHONPATH": str(ROOT), "SFT_RAY_TEST_ANTHROPIC_KEY": KEY}
        cmd = [sys.executable, "-m", "sft_ray.cli", "run", str(path)]
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
                                start_new_session=True)
        record = tmp_path / "run" / "batches.jsonl"
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if record.exists() and sum('"submit"' in x for x in record.read_text().splitlines()) >= 2:
                break
            time.sleep(0.05)
        else:
            proc.kill()
            pytest.fail("the run recorded no batch within 120 s")
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)
        assert server.state.batches_created == 2
        second = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
        assert second.returncode == 0, second.stderr[-2000:]
        assert server.state.batches_created == 3 and max(server.state.batch_lines.values()) == 1
    keys = Counter((r["id"], r["sample_index"]) for r in read_rows(tmp_path / "run" / "rollouts"))
    assert len(keys) == 3000 and set(keys.values()) == {1}
    assert KEY not in _everything(tmp_path / "run") and KEY not in second.stderr
