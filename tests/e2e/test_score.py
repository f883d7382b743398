"""The scoring stage: any verifier output becomes a clean metric or a row-level failure
(issue 9.3), through the real pipeline (local Ray cluster, mock server over real sockets)."""

from __future__ import annotations

import asyncio
import json

import orjson
import pytest
from conftest import make_config, read_rows, score_one, write_jsonl

from sft_ray.stages.score import ScoreStage
from sft_ray.verifiers import build_verifier

VERIFIER_SRC = '''
import numpy as np

def score(row, response):
    kind = row["kind"]
    if kind == "numpy":
        return {"reward": np.float64(0.75), "n_items": np.int64(3), "flag": np.bool_(True),
                "vec": np.arange(2), "hist": {"a": np.float32(0.5)}}
    if kind == "nan":
        return float("nan")
    if kind == "inf":
        return {"reward": 1.0, "ratio": float("inf"), "label": "long", "obj": object(), "none": None}
    if kind == "clash":
        return {"reward": 1, "error": "not mine", "id": 7, "messages": [], "kind": "overwritten?",
                "expected_answer": "x", "accuracy": 1}
    if kind == "raise":
        raise RuntimeError("verifier bug")
    if kind == "string":
        return {"reward": "high"}
    return np.float32(0.5)
'''

KINDS = ["numpy", "nan", "inf", "clash", "raise", "string", "plain"]


@pytest.mark.usefixtures("ray_cluster")
def test_any_python_verifier_output_through_the_pipeline(tmp_path, mock_server):
    """Before the fix: np.int64 metrics crashed the job with a Ray traceback, a NaN reward or a
    verifier exception became reward 0, and metrics named `error` / `id` overwrote the row."""
    from sft_ray.job import EXIT_BUDGET, run

    (tmp_path / "verif.py").write_text(VERIFIER_SRC)
    inp = write_jsonl(tmp_path / "in.jsonl", [{"prompt": f"row {k}", "kind": k, "id": f"r-{k}"} for k in KINDS])
    cfg = make_config(tmp_path, mock_server, inp, "verifier.type=python", f"verifier.function={tmp_path}/verif.py:score")
    assert run(cfg, say=lambda s: None) == EXIT_BUDGET  # 3 of 7 rows have no verdict: over the failure budget
    ok = {r["kind"]: r for r in read_rows(tmp_path / "run" / "rollouts")}
    failed = {r["kind"]: r for r in read_rows(tmp_path / "run" / "failed")}
    assert set(ok) == {"numpy", "inf", "clash", "plain"} and set(failed) == {"nan", "raise", "string"}

    assert ok["numpy"]["reward"] == 0.75
    assert ok["numpy"]["metrics"] == {"n_items": 3.0, "flag": 1.0, "vec": [0, 1], "hist": {"a": 0.5}}
    assert ok["numpy"]["n_items"] == 3.0  # clean metrics also sit at the top level (jq .n_items)
    assert ok["inf"]["metrics"] == {"label": "long", "none": None}  # inf and an object are dropped
    clash = ok["clash"]
    assert clash["error"] is None and clash["id"] == "r-clash" and clash["kind"] == "clash"
    assert clash["messages"][-1] == {"role": "assistant", "content": "row clash"}
    assert clash["expected_answer"] == "x"  # neither a rollout nor an input field of this row: top level too
    assert clash["metrics"]["error"] == "not mine" and clash["metrics"]["id"] == 7.0  # clashing ones: metrics only
    assert clash["metrics"]["kind"] == "overwritten?"
    assert clash["accuracy"] == 1.0 and clash["reward"] == 1.0
    assert ok["plain"]["reward"] == 0.5
    for kind, words in (("nan", "NaN"), ("raise", "verifier bug"), ("string", "not a number")):
        assert failed[kind]["reward"] is None, kind  # no verdict is never a reward of 0
        assert failed[kind]["error"]["type"] == "verifier_error" and words in failed[kind]["error"]["message"]
        assert failed[kind]["response"] == f"row {kind}"
    stats = json.loads((tmp_path / "run" / "stats.json").read_text())
    assert stats["failed"] == 3 and stats["errors_by_type"] == {"verifier_error": 3}
    assert stats["reward"]["mean"] == pytest.approx((0.75 + 1 + 1 + 0.5) / 4)

    # A rerun retries exactly the rows without a verdict (they were failures, not zeros).
    served = dict(mock_server.state.served)
    run(cfg, say=lambda s: None)
    again = {k: mock_server.state.served[k] - served.get(k, 0) for k in mock_server.state.served}
    assert {k for k, n in again.items() if n} == {"row nan", "row raise", "row string"}


def test_score_stage_marks_verifier_failures_failed_and_reads_the_input_row(tmp_path):
    (tmp_path / "verif.py").write_text(VERIFIER_SRC)
    stage = ScoreStage({"type": "python", "function": f"{tmp_path}/verif.py:score", "options": {}})
    rows = [{"id": "a", "kind": "numpy", "response": "x"}, {"id": "b", "kind": "raise", "response": "x"},
            {"id": "c", "response": None, "error": {"type": "timeout", "message": ""}}]
    batch = {"id": ["a", "b", "c"], "sample_index": [0, 0, 0], "failed": [False, False, True],
             "ready_at": [1.0] * 3, "rollout": [orjson.dumps(r).decode() for r in rows]}
    out = asyncio.run(stage(batch))
    assert out["failed"] == [False, True, True] and out["reward"] == [0.75, None, None]
    assert orjson.loads(out["rollout"][2]) == rows[2]  # a generation failure passes untouched

    # issue 9.2: the reference lives in the input row's own `response`, kept under input_fields
    em = ScoreStage({"type": "exact_match", "answer_field": "response", "options": {}})
    rollout = {"id": "d", "response": "Paris", "input_fields": {"response": "London"}}
    batch = {"id": ["d"], "sample_index": [0], "failed": [False], "ready_at": [1.0],
             "rollout": [orjson.dumps(rollout).decode()]}
    assert asyncio.run(em(batch))["reward"] == [0.0]  # compared with the input's answer, not with itself


def test_math_verify_that_hangs_is_bounded():
    mv = build_verifier({"type": "math", "options": {"timeout_s": 2}})
    row = score_one(mv, {"response": "\\boxed{9^{9^{9^{9}}}}", "expected_answer": "1"})  # sympy spins for ages
    assert row["reward"] is None and row["error"]["type"] == "verifier_error"
    assert "within 2 s" in row["error"]["message"]
    assert score_one(mv, {"response": "\\boxed{1}", "expected_answer": "1"})["reward"] == 1.0  # restarted


def test_async_verifier_runs_concurrently_and_python_gets_the_episode(tmp_path):
    (tmp_path / "v.py").write_text(
        "import asyncio\n"
        "async def slow(row, response):\n    await asyncio.sleep(0.2)\n    return 1.0\n"
        "def episode(row, response, messages, rollout, scale=1.0):\n"
        "    return {'reward': scale * (rollout['termination'] == 'final'), 'turns': len(messages)}\n")
    import time

    stage = ScoreStage({"type": "python", "function": f"{tmp_path}/v.py:slow", "options": {}, "concurrency": 50})
    rows = [{"id": str(i), "response": "x"} for i in range(50)]
    batch = {"id": [r["id"] for r in rows], "sample_index": [0] * 50, "failed": [False] * 50, "ready_at": [1.0] * 50,
             "rollout": [orjson.dumps(r).decode() for r in rows]}
    t0 = time.monotonic()
    assert asyncio.run(stage(batch))["reward"] == [1.0] * 50
    assert time.monotonic() - t0 < 2.0  # 50 x 0.2 s one after the other would take 10 s

    ep = build_verifier({"type": "python", "function": f"{tmp_path}/v.py:episode", "options": {"scale": 0.5}})
    rollout = {"response": "done", "termination": "final",
               "messages": [{"role": "user", "content": "q"},
                            {"role": "assistant", "content": None, "tool_calls": [
                                {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
                            {"role": "tool", "tool_call_id": "c1", "name": "f", "content": "1"},
                            {"role": "assistant", "content": "done"}]}
    scored = score_one(ep, rollout)
    assert scored["reward"] == 0.5 and scored["metrics"] == {"turns": 4.0}


def test_score_batch_verifier(tmp_path):
    class Batchy:
        def __init__(self):
            self.calls = 0

        def score_batch(self, items):
            self.calls += 1
            return [{"reward": float(resp == row["want"])} if resp else ValueError("empty")
                    for row, resp, _ in items]

    b = Batchy()
    rows = [{"response": "a", "want": "a"}, {"response": "b", "want": "a"}, {"response": "", "want": "a"}]
    from sft_ray.scoring import score_rollouts

    asyncio.run(score_rollouts(b, rows))
    assert b.calls == 1 and [r["reward"] for r in rows] == [1.0, 0.0, None]
    assert rows[2]["error"]["type"] == "verifier_error"


def test_python_verifier_object_with_score_batch(tmp_path):
    (tmp_path / "batchy.py").write_text(
        "class Scorer:\n"
        "    calls = 0\n"
        "    async def score_batch(self, items, bonus=0.0):\n"
        "        Scorer.calls += 1\n"
        "        return [{'reward': float(resp == row['want']) * (1 - bonus), 'n': len(items)} for row, resp, _ in items]\n"
        "scorer = Scorer()\n")
    stage = ScoreStage({"type": "python", "function": f"{tmp_path}/batchy.py:scorer", "options": {"bonus": 0.5}})
    rows = [{"want": "a", "response": "a"}, {"want": "a", "response": "b"}]
    batch = {"id": ["1", "2"], "sample_index": [0, 0], "failed": [False, False], "ready_at": [1.0, 1.0],
             "rollout": [orjson.dumps(r).decode() for r in rows]}
    out = asyncio.run(stage(batch))
    assert out["reward"] == [0.5, 0.0] and orjson.loads(out["rollout"][0])["metrics"] == {"n": 2.0}
    assert stage.scorer.verifier.fn.calls == 1


def test_a_vllm_judges_engine_loading_is_reported_to_the_stall_warning(monkeypatch):
    # Issue 29: a generation actor says "loading the vLLM engine" while its engine loads; a scoring
    # actor loading a vLLM judge's engine said nothing. The engine's load is held open here (a real one
    # takes minutes) to look at what the actor reports meanwhile.
    from sft_ray.backends.vllm import VLLMBackend
    from sft_ray.stages import score

    loading, release = asyncio.Event(), asyncio.Event()

    async def slow_start(self):
        loading.set()
        await release.wait()

    from sft_ray.configload import load_config

    monkeypatch.setattr(VLLMBackend, "start", slow_start)
    cfg = load_config(None, ["input=in.jsonl", "output=o", "model.name=m", "verifier.type=judge",
                             "verifier.judge.model.backend=vllm"])
    stage = score.ScoreStage(score.verifier_payload(cfg.verifier))
    empty = {"id": [], "sample_index": [], "rollout": [], "failed": [], "ready_at": []}

    async def scenario():
        first = asyncio.ensure_future(stage(empty))  # nothing to score: the engine still loads first
        await asyncio.wait_for(loading.wait(), 60)  # the engine starts before any row is scored
        snap = stage.tracker.snapshot()
        assert snap["phase"] == "loading the vLLM engine of the judge (the embedded default model)", snap
        release.set()
        await first
        assert stage.tracker.snapshot()["phase"] is None

    asyncio.run(scenario())
    assert score.wiring(cfg, {}, activity="board-1")["fn_constructor_kwargs"]["activity"] == "board-1"
