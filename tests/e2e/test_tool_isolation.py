"""Hostile python tools end to end (real Ray, the mock server as the agent model over real
sockets): whatever a tool does costs only its own episode."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from conftest import find_process, make_config, read_rows, start_run, write_jsonl

from sft_ray.devserver import MockConfig, MockServer

pytestmark = pytest.mark.usefixtures("ray_cluster")

HOSTILE = str(Path(__file__).parents[1] / "fixtures" / "hostile_tools.py")
FINE = [{"id": f"fine{i}", "prompt": f'[[tool:fine {{"x": "{i}"}}]]'} for i in range(6)]


def run_bounded(cfg, limit_s: float) -> tuple[int | None, float]:
    """Run the pipeline in a thread; (exit code or None if it did not end within limit_s, seconds)."""
    t0 = time.monotonic()
    thread, result = start_run(cfg)
    thread.join(limit_s)
    return result.get("code"), time.monotonic() - t0


def tool_result(row: dict) -> dict:
    (msg,) = [m for m in row["messages"] if m["role"] == "tool"]
    return json.loads(msg["content"]) if msg["content"].startswith("{") else msg["content"]


def test_exits_cancellations_interrupts_and_blocking_tools_cost_only_their_episode(tmp_path):
    rows = [{"id": "exit", "prompt": '[[tool:exits {"code": 2}]]'},
            {"id": "cancel", "prompt": "[[tool:cancels {}]]"},
            {"id": "cancel_async", "prompt": "[[tool:cancels_async {}]]"},
            {"id": "interrupt", "prompt": "[[tool:interrupts {}]]"},
            {"id": "block", "prompt": '[[tool:blocks {"seconds": 60}]]'}] + FINE
    with MockServer(MockConfig()) as server:
        inp = write_jsonl(tmp_path / "in.jsonl", rows)
        cfg = make_config(tmp_path, server, inp, "environment.type=python", f"environment.module={HOSTILE}",
                          "verifier.type=none", "agent.timeout_s=5", "max_error_fraction=1")
        code, _ = run_bounded(cfg, 120)
    assert code is not None, "the run hung"
    out = {r["id"]: r for r in read_rows(tmp_path / "run" / "rollouts")}
    failed = {r["id"]: r for r in read_rows(tmp_path / "run" / "failed")}
    expected = {"exit": "SystemExit: 2", "cancel": "CancelledError: tool gave up",
                "cancel_async": "CancelledError: async tool gave up", "interrupt": "KeyboardInterrupt: "}
    for rid, error in expected.items():
        r = out[rid]
        assert tool_result(r) == {"error": error}
        assert r["termination"] == "final" and r["num_tool_errors"] == 1
    assert failed["block"]["error"]["type"] == "episode_timeout"  # ended at agent.timeout_s, not after 60 s
    assert failed["block"]["latency_s"] < 30, failed["block"]["latency_s"]
    assert set(failed) == {"block"}
    assert all(r["latency_s"] < 30 for r in out.values())  # nobody waited for the blocked tool
    for i in range(6):
        r = out[f"fine{i}"]
        assert r["termination"] == "final" and tool_result(r) == f"fine {i}"


def test_process_isolation_kills_hung_and_survives_dying_tools(tmp_path):
    rows = [{"id": "die", "prompt": '[[tool:dies {"code": 3}]] [[tool:fine {"x": "after"}]]'},
            {"id": "exit", "prompt": '[[tool:exits {"code": 2}]]'},
            {"id": "block", "prompt": '[[tool:blocks {"seconds": 60}]]'}] + FINE + [
            {"id": f"pid{i}", "prompt": "[[tool:pid {}]]"} for i in range(3)]
    with MockServer(MockConfig()) as server:
        inp = write_jsonl(tmp_path / "in.jsonl", rows)
        cfg = make_config(tmp_path, server, inp, "environment.type=python", f"environment.module={HOSTILE}",
                          "environment.isolation=process", "verifier.type=none", "agent.timeout_s=5",
                          "max_error_fraction=1")
        code, _ = run_bounded(cfg, 120)
        assert code is not None, "the run hung"
        # The hung tool's process was killed with its episode, not left running for 60 s.
        assert find_process("sft_ray.environments.toolproc") is None
    out = {r["id"]: r for r in read_rows(tmp_path / "run" / "rollouts")}
    failed = {r["id"]: r for r in read_rows(tmp_path / "run" / "failed")}
    die = out["die"]
    died, after = [json.loads(m["content"]) if m["content"].startswith("{") else m["content"]
                   for m in die["messages"] if m["role"] == "tool"]
    assert died == {"error": "the tool process exited with code 3 during 'dies'"}
    assert after == "fine after"  # the next call got a fresh process
    assert die["num_tool_errors"] == 1 and die["termination"] == "final"
    assert tool_result(out["exit"]) == {"error": "SystemExit: 2"}
    assert failed["block"]["error"]["type"] == "episode_timeout" and set(failed) == {"block"}
    assert failed["block"]["latency_s"] < 30
    assert all(out[f"fine{i}"]["termination"] == "final" for i in range(6))
    pids = {int(tool_result(out[f"pid{i}"])) for i in range(3)}
    assert len(pids) == 3  # a process per episode


def test_a_sample_that_keeps_killing_its_actor_is_a_failure_record_not_a_crash_loop(tmp_path):
    """Without process isolation a tool's os._exit ends the actor; Ray Data restarts it and retries
    the batch without limit, so before the fix the run never ended (nor did the batch's other
    samples). Now the sample in flight at 2 actor deaths is a failure record, and the others,
    suspects after the first death, run one at a time and finish."""
    rows = [{"id": "die", "prompt": '[[tool:dies {"code": 3}]]'}] + FINE
    with MockServer(MockConfig()) as server:
        inp = write_jsonl(tmp_path / "in.jsonl", rows)
        cfg = make_config(tmp_path, server, inp, "environment.type=python", f"environment.module={HOSTILE}",
                          "verifier.type=none", "max_error_fraction=1")
        code, _ = run_bounded(cfg, 240)
    assert code is not None, "crash loop: the run did not end"
    out = {r["id"]: r for r in read_rows(tmp_path / "run" / "rollouts")}
    failed = {r["id"]: r for r in read_rows(tmp_path / "run" / "failed")}
    assert set(failed) == {"die"} and set(out) == {f"fine{i}" for i in range(6)}
    err = failed["die"]["error"]
    assert err["type"] == "internal_error" and "died 2 times while this sample was in flight" in err["message"]
    assert "environment.isolation: process" in err["message"]
