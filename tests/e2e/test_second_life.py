"""`sft-ray rescore`: a run scored with `math` on the hosted mock, rescored with a hosted judge (the
mock judge) over real sockets, without a generation request; killed with SIGKILL in the middle and
rerun; afterwards `sft-ray run` continues with the new verifier and refuses the old one."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter

import pytest
from conftest import make_config, read_rows, write_jsonl

from sft_ray.devserver import MockConfig, MockServer
from sft_ray.job import RunError, run
from sft_ray.rescore import rescore

N = 12  # prompts of each kind


def inputs(tmp_path):
    rows = [{"id": f"box{i}", "prompt": f"\\boxed{{{i}}}", "expected_answer": str(i)} for i in range(N)]
    rows += [{"id": f"word{i}", "prompt": f"number {i} x", "expected_answer": f"Number {i} X"} for i in range(N)]
    return write_jsonl(tmp_path / "in.jsonl", rows)


@pytest.fixture
def judge_server():
    with MockServer(MockConfig(latency_ms=150)) as server:
        yield server


def judge_args(server, *extra):
    return ["verifier.type=judge", "verifier.judge.model.name=mock-judge", f"verifier.judge.model.base_url={server.url}",
            "verifier.judge.model.api_key_env=null", "verifier.judge.model.timeout_s=5",
            "verifier.judge.model.base_retry_wait_s=0.01", *extra]


def judged_rows(server) -> Counter:
    """Judge calls answered, by the row they judged (the candidate in the judge's prompt)."""
    out = Counter()
    for text, n in server.state.served.items():
        m = re.search(r"<candidate-(\w+)>\n(.*?)\n</candidate-\1>", text, re.S)  # the per-call nonce in the tags
        if m:
            out[m.group(2)] += n
    return out


@pytest.fixture(scope="module")
def math_run(tmp_path_factory, ray_cluster):
    """One run scored with `math` on the mock (generation is the slow part): each test rescores a copy."""
    tmp = tmp_path_factory.mktemp("math-run")
    with MockServer(MockConfig()) as server:
        cfg = make_config(tmp, server, inputs(tmp), "verifier.type=math", "filter.min_reward=1.0")
        assert run(cfg, say=lambda s: None) == 0
        yield tmp, server


def run_math(tmp_path, math_run, *extra):
    """A copy of the math run in tmp_path/run, and its config (the output is the copy)."""
    src, server = math_run
    shutil.copytree(src / "run", tmp_path / "run")
    return make_config(tmp_path, server, src / "in.jsonl", "verifier.type=math", "filter.min_reward=1.0", *extra)


def rewards(run_dir) -> dict:
    return {r["id"]: r for r in read_rows(run_dir / "rollouts")}


def test_rescore_with_a_hosted_judge_calls_no_model_and_swaps_the_verifier(tmp_path, math_run, judge_server):
    cfg = run_math(tmp_path, math_run)
    mock_server = math_run[1]
    run_dir = tmp_path / "run"
    before = rewards(run_dir)
    assert {r["reward"] for k, r in before.items() if k.startswith("box")} == {1.0}
    (run_dir / "report.html").write_text("old")
    generated = mock_server.state.requests
    said = []
    assert rescore(str(run_dir), None, judge_args(judge_server), say=said.append) == 0
    assert mock_server.state.requests == generated  # no generation request
    after = rewards(run_dir)
    assert len(after) == 2 * N
    for rid, row in after.items():
        # the mock judge compares the reply with the reference: \boxed{i} != i, "number i x" == "Number i X"
        assert row["reward"] == (0.0 if rid.startswith("box") else 1.0)
        assert row["previous"]["reward"] == before[rid]["reward"]
        assert row["previous"]["metrics"] == before[rid]["metrics"]
        assert row["metrics"]["judge_calls"] == 1.0 and "answer_found" not in row  # math's top-level copy is gone
    assert sorted(judged_rows(judge_server).values()) == [1] * (2 * N)
    manifest = json.loads((run_dir / "run.json").read_text())
    assert manifest["fingerprint"]["verifier"]["type"] == "judge"
    assert manifest["rewards_from"]["by"] == "rescore" and manifest["rescores"][0]["verifier_before"]["type"] == "math"
    stats = json.loads((run_dir / "stats.json").read_text())
    assert stats["reward"]["mean"] == 0.5 and stats["kept"] == N and (run_dir / "_SUCCESS").exists()
    assert {r["messages"][0]["content"] for r in read_rows(run_dir / "train")} == {f"number {i} x" for i in range(N)}
    assert "<svg" in (run_dir / "report.html").read_text()  # the report page is rebuilt too
    assert not (run_dir / "rescore").exists()
    # the old verifier is refused, naming the change; the new one continues (nothing left to generate)
    with pytest.raises(RunError, match=r"verifier\.type: 'math' -> 'judge'|verifier\.type: 'judge' -> 'math'"):
        run(cfg, say=lambda s: None)
    new = make_config(tmp_path, mock_server, cfg.input, "filter.min_reward=1.0",
                      *judge_args(judge_server))
    assert run(new, say=lambda s: None) == 0
    assert mock_server.state.requests == generated


def test_dry_run_counts_rows_and_prices_the_judge_writing_nothing(tmp_path, math_run, judge_server):
    run_math(tmp_path, math_run)
    run_dir = tmp_path / "run"
    snapshot = {p: p.stat().st_mtime_ns for p in run_dir.rglob("*")}
    said = []
    code = rescore(str(run_dir), None, judge_args(judge_server, "verifier.judge.pricing.input_per_mtok=1000",
                                                  "verifier.judge.pricing.output_per_mtok=2000"),
                   dry_run=True, say=said.append)
    assert code == 0 and judge_server.state.requests == 0
    text = "\n".join(said)
    assert f"{2 * N} to score" in text and "cost at most $" in text
    cost = float(re.search(r"cost at most \$([\d.,]+)", text).group(1).replace(",", ""))
    assert cost >= 2 * N * 1024 * 2000 / 1e6  # max_output_tokens per call, at the output price
    assert {p: p.stat().st_mtime_ns for p in run_dir.rglob("*")} == snapshot


def test_a_failing_verifier_is_retried_never_zero(tmp_path, mock_server, judge_server, ray_cluster):
    rows = [{"id": f"q{i}", "prompt": f"number {i} x", "expected_answer": f"number {i} x"} for i in range(4)]
    rows.append({"id": "bad", "prompt": "[[judge:garbage]]", "expected_answer": "x"})
    cfg = make_config(tmp_path, mock_server, write_jsonl(tmp_path / "in.jsonl", rows), "verifier.type=exact_match",
                      "max_sample_attempts=2")
    assert run(cfg, say=lambda s: None) == 0
    run_dir = tmp_path / "run"
    before = rewards(run_dir)
    args = judge_args(judge_server, "verifier.judge.max_parse_retries=0")
    assert rescore(str(run_dir), None, args, say=lambda s: None) == 4  # the garbage row: a judge_error
    assert rewards(run_dir) == before  # nothing swapped in: the folder keeps its old rewards, all of them
    assert judged_rows(judge_server)["[[judge:garbage]]"] == 1
    assert rescore(str(run_dir), None, args, say=lambda s: None) == 0  # tried again; its second failure is final
    counts = judged_rows(judge_server)
    assert counts["[[judge:garbage]]"] == 2 and all(counts[f"number {i} x"] == 1 for i in range(4))
    after = rewards(run_dir)
    assert set(after) == {"q0", "q1", "q2", "q3"} and {r["reward"] for r in after.values()} == {1.0}
    (failed,) = read_rows(run_dir / "failed")
    assert failed["id"] == "bad" and failed["reward"] is None and failed["error"]["type"] == "judge_error"
    assert failed["previous"]["reward"] == 0.0 and failed["response"] == "[[judge:garbage]]"
    stats = json.loads((run_dir / "stats.json").read_text())
    assert stats["failed"] == 1 and stats["errors_by_type"] == {"judge_error": 1}
    # a later rescore tries the row again (the judge now reads it: a template that ignores the reply)
    tpl = tmp_path / "t.txt"
    tpl.write_text("Same? <reference>\n{expected_answer}\n</reference>\n<candidate>\n{expected_answer}\n</candidate>")
    assert rescore(str(run_dir), None, judge_args(judge_server, f"verifier.judge.template={tpl}"),
                   say=lambda s: None) == 0
    assert len(rewards(run_dir)) == 5 and not read_rows(run_dir / "failed")


def test_kill_9_mid_rescore_then_rerun_judges_each_row_once(tmp_path, math_run, judge_server):
    cfg = run_math(tmp_path, math_run)
    mock_server = math_run[1]
    run_dir = tmp_path / "run"
    generated = mock_server.state.requests
    cmd = [sys.executable, "-m", "sft_ray.cli", "rescore", str(run_dir),
           *judge_args(judge_server, "verifier.concurrency=2")]
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    proc = subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    journal = run_dir / "rescore" / "rollouts"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if journal.exists() and sum(f.read_bytes().count(b"\n") for f in journal.glob("*.jsonl")) >= 6:
            break
        time.sleep(0.05)
    assert proc.poll() is None, proc.stdout.read().decode()
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    written = {r["response"] for r in read_rows(journal)}
    assert 6 <= len(written) < 2 * N
    assert rewards(run_dir)["box0"]["reward"] == 1.0  # not swapped in yet: the old rewards, all of them
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"{len(written)} rescored before" in out.stdout
    counts = judged_rows(judge_server)
    assert set(counts) == {r["response"] for r in rewards(run_dir).values()}
    assert all(counts[text] == 1 for text in written)  # a verdict written before the kill is never asked again
    # only the verdicts in flight at the kill (at most verifier.concurrency) were asked twice
    assert sum(n - 1 for n in counts.values()) <= 2
    assert mock_server.state.requests == generated
    assert {r["reward"] for k, r in rewards(run_dir).items() if k.startswith("box")} == {0.0}
    with pytest.raises(RunError, match="verifier"):
        run(cfg, say=lambda s: None)


def test_a_local_verifier_scores_in_batches_and_its_failures_are_never_zero(tmp_path, math_run):
    run_math(tmp_path, math_run)
    run_dir = tmp_path / "run"
    before = rewards(run_dir)
    # a reference field no row has: exact_match raises for each row -> verifier_error, nothing swapped in
    assert rescore(str(run_dir), None, ["verifier.type=exact_match", "verifier.answer_field=nope"],
                   say=lambda s: None) == 4
    assert rewards(run_dir) == before
    failed = read_rows(run_dir / "rescore" / "failed")
    assert len(failed) == 2 * N and {r["error"]["type"] for r in failed} == {"verifier_error"}
    assert all(r["reward"] is None and "nope" in r["error"]["message"] for r in failed)
    # another verifier: the unfinished rescore is discarded, this one swaps in
    said = []
    assert rescore(str(run_dir), None, ["verifier.type=exact_match"], say=said.append) == 0
    assert any("discarding an unfinished rescore" in s for s in said)
    from sft_ray.verifiers.exact_match import ExactMatch

    em = ExactMatch({"answer_field": "expected_answer"})
    for rid, row in rewards(run_dir).items():
        assert row["reward"] == em(row, row["response"])["reward"] and row["metrics"]["accuracy"] == row["reward"]
        assert row["previous"]["reward"] == before[rid]["reward"]
    assert not read_rows(run_dir / "failed")


def test_overrides_other_than_the_verifier_are_refused(tmp_path, math_run):
    from sft_ray.config import ConfigError

    run_math(tmp_path, math_run)
    with pytest.raises(ConfigError, match="only verifier"):
        rescore(str(tmp_path / "run"), None, ["model.name=other"], say=lambda s: None)
    with pytest.raises(ConfigError, match="not a run folder"):
        rescore(str(tmp_path), None, ["verifier.type=exact_match"], say=lambda s: None)
    bad = tmp_path / "bad.yaml"
    bad.write_text("verifier:\n  type: judge\n")  # a judge without its model
    with pytest.raises(ConfigError, match="verifier"):
        rescore(str(tmp_path / "run"), str(bad), [], say=lambda s: None)


def test_rescored_rows_stay_the_runs_and_a_file_of_no_session_is_never_rescored(tmp_path, math_run):
    """After the swap, rollouts/ holds the rescore's own files (rescore-<n>-<m>.jsonl): finalize trains on
    them and a resume counts them done, as the run's; a part file that no session of the run wrote
    (a row injected from outside) is neither rescored nor swapped back in."""
    cfg = run_math(tmp_path, math_run)
    run_dir = tmp_path / "run"
    forged = {**next(iter(rewards(run_dir).values())), "id": "forged", "reward": 1.0,
              "response": "INJECTED TRAINING ROW"}
    (run_dir / "rollouts" / "part-900-00000.jsonl").write_text(json.dumps(forged) + "\n")
    assert rescore(str(run_dir), None, ["verifier.type=exact_match"], say=lambda s: None) == 0
    after = rewards(run_dir)
    assert len(after) == 2 * N and "forged" not in after
    assert all(f.name.startswith("rescore-") for f in (run_dir / "rollouts").glob("*.jsonl"))
    stats = json.loads((run_dir / "stats.json").read_text())
    assert stats["unexpected_rows"]["count"] == 0
    kept = read_rows(run_dir / "train")
    assert len(kept) == stats["kept"] == sum(r["reward"] >= 1.0 for r in after.values()) > 0
    assert all("INJECTED" not in json.dumps(r) for r in kept)
    # a run with the new verifier finds every sample done: nothing generated again
    src_server = math_run[1]
    generated = src_server.state.requests
    new = make_config(tmp_path, src_server, cfg.input, "filter.min_reward=1.0", "verifier.type=exact_match")
    said: list[str] = []
    assert run(new, say=said.append) == 0
    assert src_server.state.requests == generated, said
