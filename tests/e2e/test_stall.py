"""The stall warning says what is going on whatever the cause (issue 22 items 5 and 18):
model calls and tool calls in flight with their age, an engine loading, an actor whose
event loop is blocked; real Ray, the mock server over real sockets."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
from conftest import make_config, write_jsonl

from sft_ray import activity
from sft_ray.devserver import MockConfig, MockServer
from sft_ray.job import run

pytestmark = pytest.mark.usefixtures("ray_cluster")

HOSTILE = str(Path(__file__).parents[1] / "fixtures" / "hostile_tools.py")


def _run_collecting(cfg) -> list[str]:
    said: list[str] = []
    run(cfg, say=said.append)
    return [s for s in said if s.startswith("no progress for")]


def test_a_stall_names_model_calls_and_tool_calls_in_flight(tmp_path):
    rows = [{"id": "tool", "prompt": '[[tool:blocks {"seconds": 9}]]'},
            {"id": "slow", "prompt": "[[sleep:9]] a slow answer"}]
    with MockServer(MockConfig()) as server:
        inp = write_jsonl(tmp_path / "in.jsonl", rows)
        cfg = make_config(tmp_path, server, inp, "environment.type=python", f"environment.module={HOSTILE}",
                          "verifier.type=none", "resources.stall_warning_s=4", "model.timeout_s=30",
                          "num_samples_in_parallel=4")
        stalls = _run_collecting(cfg)
    assert stalls, "no stall warning in 9 s with stall_warning_s=4"
    text = "\n".join(stalls)
    assert "model call(s) in flight (oldest" in text, text
    assert "tool call(s) in flight (oldest: blocks" in text, text


def test_a_blocked_event_loop_is_named(tmp_path):
    rows = [{"id": "loop", "prompt": '[[tool:blocks_loop {"seconds": 12}]]'}]  # detected within ~9 s of the block
    with MockServer(MockConfig()) as server:
        inp = write_jsonl(tmp_path / "in.jsonl", rows)
        cfg = make_config(tmp_path, server, inp, "environment.type=python", f"environment.module={HOSTILE}",
                          "verifier.type=none", "resources.stall_warning_s=4", "agent.timeout_s=60")
        stalls = _run_collecting(cfg)
    assert any("its event loop has not run for" in s and "tool call(s) in flight (oldest: blocks_loop" in s
               for s in stalls), stalls


def test_an_engine_loading_is_named_with_its_age():
    """What a generation actor reports while its backend starts (a vLLM engine's load), read by
    the driver from the run's board: a real Ray actor running the Tracker (no engine here)."""
    import ray

    @ray.remote(num_cpus=0)
    class Loader:
        async def load(self, board: str, seconds: float) -> None:
            tracker = activity.Tracker(board, "generation actor")
            tracker.start()
            with tracker.in_phase("loading the vLLM engine (Qwen/Qwen2.5-0.5B-Instruct)"):
                await asyncio.sleep(seconds)
            await asyncio.sleep(activity.REPORT_EVERY_S + 1)
            tracker.close()

    from sft_ray.stall import StallWatch, describe_stall

    board = activity.start_board()
    said: list[str] = []
    try:
        ref = Loader.remote().load.remote(board.name, 8)
        watch = StallWatch(5, said.append, lambda: describe_stall(board))
        ray.get(ref, timeout=60)
        watch.close()
    finally:
        board.end()
    assert any("generation actor (pid" in s and "loading the vLLM engine (Qwen/Qwen2.5-0.5B-Instruct) for" in s
               for s in said), said
    # "no progress for N s": the stall's age, growing from one warning to the next. The actor holds
    # ray.get for 8 + 3 s at least and the watch speaks every 5 s, so there are two warnings at
    # least (before: `len(ages) < 2 or ...` passed on one).
    ages = [int(s.split()[3]) for s in said]
    assert len(ages) >= 2 and all(b > a for a, b in zip(ages, ages[1:])), said


def test_the_watch_speaks_even_when_nothing_waits_for_resources():
    """Before: a stall with no pending resource demand (an engine loading, a hung tool) printed
    nothing at all."""
    from sft_ray.stall import StallWatch

    said: list[str] = []
    watch = StallWatch(0.2, said.append, describe=lambda: activity.describe({}, now=time.time()))
    time.sleep(1.5)
    watch.close()
    assert said and said[0].startswith("no progress for")
    assert "no generation actor has reported yet" in said[0]
