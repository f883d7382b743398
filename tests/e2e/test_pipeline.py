"""The whole job on a real local Ray cluster against the mock server over real sockets."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import make_config, read_rows, write_jsonl

from sft_ray.devserver import MockConfig, MockServer
from sft_ray.job import EXIT_BUDGET, EXIT_INPUT, EXIT_OK, RunError, run

pytestmark = pytest.mark.usefixtures("ray_cluster")

NEMO = {"responses_create_params": {"input": [{"role": "user", "content": "What is 2+3? \\boxed{5}"}]},
        "expected_answer": "5", "task": "arith", "meta": {"difficulty": 3, "tags": ["a", 1]}}
NEMO_PARTS = {"responses_create_params": {"input": [
    {"role": "user", "content": [{"type": "input_text", "text": "Final: \\boxed{322372}"}]}], "temperature": 0.1},
    "expected_answer": "322372", "meta": "a string this time"}
CHAT = {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "\\boxed{\\frac{1}{2}}"}],
        "expected_answer": "0.5"}
PLAIN = {"prompt": "no answer here", "system": "sys", "expected_answer": "9", "id": 41}


def run_quiet(cfg, **kw):
    lines = []
    code = run(cfg, say=lines.append, **kw)
    return code, "\n".join(lines)


@pytest.mark.parametrize("api", ["chat", "responses"])
def test_end_to_end_mixed_shapes_repeats_and_contract(tmp_path, mock_server, api):
    inp = write_jsonl(tmp_path / "in.jsonl", [NEMO, NEMO_PARTS, CHAT, PLAIN])
    cfg = make_config(tmp_path, mock_server, inp, "num_repeats=3", f"model.api={api}", "verifier.type=math",
                      "filter.min_reward=1", "train.rows_per_shard=4")
    code, out = run_quiet(cfg)
    assert code == EXIT_OK, out
    rollouts = read_rows(tmp_path / "run" / "rollouts")
    assert len(rollouts) == 12
    keys = {(r["id"], r["sample_index"]) for r in rollouts}
    assert len(keys) == 12 and {k for _, k in keys} == {0, 1, 2}
    assert len({r["sampling_params"]["seed"] for r in rollouts}) == 12
    by_id = {r["id"]: r for r in rollouts}
    plain = by_id["41"]
    assert plain["messages"] == [{"role": "system", "content": "sys"}, {"role": "user", "content": "no answer here"},
                                 {"role": "assistant", "content": "no answer here"}]
    assert plain["reward"] == 0.0 and plain["expected_answer"] == "9"
    big = next(r for r in rollouts if r.get("expected_answer") == "322372")
    assert big["expected_answer"] == "322372" and isinstance(big["expected_answer"], str)  # never coerced
    assert big["meta"] == "a string this time" and big["sampling_params"]["temperature"] == 0.1
    nemo = next(r for r in rollouts if r.get("task") == "arith")
    assert nemo["meta"] == {"difficulty": 3, "tags": ["a", 1]}
    for r in rollouts:
        assert r["error"] is None and r["model"] == "mock" and r["finish_reason"] == "stop"
        assert r["usage"]["output_tokens"] > 0 and "accuracy" in r
    # three of four prompts carry their boxed answer: reward 1 for 9 samples
    stats = json.loads((tmp_path / "run" / "stats.json").read_text())
    assert stats["reward"]["mean"] == pytest.approx(0.75)
    assert stats["kept"] == 9
    train = read_rows(tmp_path / "run" / "train")
    assert len(train) == 9 and all(list(t) == ["messages"] for t in train)
    assert sorted(len(f.read_text().splitlines()) for f in (tmp_path / "run" / "train").glob("*.jsonl")) == [3, 3, 3]
    assert '{"reward": 0.75, "accuracy": 0.75' in out


def test_concurrency_limit_holds_across_actors(tmp_path):
    with MockServer(MockConfig(latency_ms=30)) as server:
        inp = write_jsonl(tmp_path / "in.jsonl", [{"prompt": f"p{i}", "expected_answer": "x"} for i in range(400)])
        cfg = make_config(tmp_path, server, inp, "num_samples_in_parallel=10", "resources.generate_actors=2")
        code, out = run_quiet(cfg)
        assert code == EXIT_OK, out
        assert 2 <= server.state.max_in_flight <= 10
        assert server.state.requests == 400
    assert "10 requests in flight (2-2 actors x 5)" in out


def test_failures_recover_or_become_classified_rows(tmp_path, mock_server):
    rows = [{"prompt": f"ok {i} [[fail:500:1]]", "expected_answer": "x"} for i in range(10)]
    rows += [{"prompt": f"limited {i} [[fail:429:2]]", "expected_answer": "x"} for i in range(10)]
    rows += [{"prompt": "garbled [[fail:malformed:1]]", "expected_answer": "x"}]
    rows += [{"prompt": "never [[fail:500:99]]", "expected_answer": "x"},
             {"prompt": "too long [[status:400]]", "expected_answer": "x"}]
    inp = write_jsonl(tmp_path / "in.jsonl", rows)
    cfg = make_config(tmp_path, mock_server, inp, "model.max_retries=3", "max_error_fraction=0.5")
    code, out = run_quiet(cfg)
    assert code == EXIT_OK, out
    ok = read_rows(tmp_path / "run" / "rollouts")
    failed = read_rows(tmp_path / "run" / "failed")
    assert len(ok) == 21 and len(failed) == 2
    assert {f["error"]["type"] for f in failed} == {"server_error", "context_length"}
    assert all(f["response"] is None for f in failed)
    stats = json.loads((tmp_path / "run" / "stats.json").read_text())
    assert stats["errors_by_type"] == {"context_length": 1, "server_error": 1}
    assert stats["failed"] == 2 and stats["samples"] == 23


def test_failure_budget_sets_the_exit_code(tmp_path, mock_server):
    rows = [{"prompt": f"bad {i} [[fail:500:99]]", "expected_answer": "x"} for i in range(5)]
    rows += [{"prompt": f"good {i}", "expected_answer": "x"} for i in range(15)]
    inp = write_jsonl(tmp_path / "in.jsonl", rows)
    cfg = make_config(tmp_path, mock_server, inp, "model.max_retries=0", "max_error_fraction=0.1")
    code, out = run_quiet(cfg)
    assert code == EXIT_BUDGET
    assert "5/20 samples failed" in out
    assert len(read_rows(tmp_path / "run" / "rollouts")) == 15  # the work done is kept


def test_bad_line_stops_with_file_and_line_and_keeps_nothing_wrong(tmp_path, mock_server):
    inp = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "a"}, '{"prompt": "b",', {"prompt": "c"}])
    cfg = make_config(tmp_path, mock_server, inp)
    with pytest.raises(RunError) as e:
        run_quiet(cfg)
    assert e.value.code == EXIT_INPUT
    assert f"{inp}:2" in str(e.value) and "not valid JSON" in str(e.value)
    assert not read_rows(tmp_path / "run" / "failed")  # the bad line is not a failed sample to retry


def test_input_error_survives_pickling():
    import pickle

    from sft_ray.rows import InputError

    err = pickle.loads(pickle.dumps(InputError("f.jsonl:3", "not valid JSON")))
    assert str(err) == "f.jsonl:3: not valid JSON" and err.source == "f.jsonl:3"


def test_bad_lines_skipped_and_counted(tmp_path, mock_server):
    """Skipped lines are counted apart: no failure, no failure budget, never retried (issue 9.5)."""
    inp = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "a", "expected_answer": "a"}, '{"prompt": "b",',
                                              {"nothing": 1}, {"prompt": "c", "expected_answer": "c"}])
    cfg = make_config(tmp_path, mock_server, inp, "read.skip_bad_lines=true", "max_error_fraction=0")
    code, out = run_quiet(cfg)
    assert code == EXIT_OK, out  # 2 bad lines of 4 would be 50% failures: over a budget of 0
    stats = json.loads((tmp_path / "run" / "stats.json").read_text())
    assert stats["errors_by_type"] == {} and stats["succeeded"] == 2 and stats["failed"] == 0
    assert stats["bad_lines"] == 2 and stats["expected"] == 2 and stats["complete"]
    assert [e.split(": ")[0] for e in stats["bad_line_examples"]] == [f"{inp}:2", f"{inp}:3"]
    assert not read_rows(tmp_path / "run" / "failed")
    sent = mock_server.state.requests
    code, out = run_quiet(cfg)
    assert code == EXIT_OK and "0 to generate" in out and mock_server.state.requests == sent


def test_rerun_resumes_and_config_drift_is_refused(tmp_path, mock_server):
    inp = write_jsonl(tmp_path / "in.jsonl", [{"prompt": f"p{i}", "expected_answer": "x"} for i in range(30)])
    cfg = make_config(tmp_path, mock_server, inp)
    assert run_quiet(cfg)[0] == EXIT_OK
    served = mock_server.state.requests
    code, out = run_quiet(cfg)
    assert code == EXIT_OK and "30 already done, 0 to generate" in out
    assert mock_server.state.requests == served  # nothing sent twice
    assert len(read_rows(tmp_path / "run" / "rollouts")) == 30
    drifted = make_config(tmp_path, mock_server, inp, "responses_create_params.temperature=0.2")
    with pytest.raises(RunError) as e:
        run_quiet(drifted)
    assert "responses_create_params.temperature: 1.0 -> 0.2" in str(e.value)
    assert run_quiet(drifted, restart=True)[0] == EXIT_OK
    assert mock_server.state.requests == served + 30
    # The same path with other content would leave stale rollouts behind: refused too.
    write_jsonl(inp, [{"prompt": f"p{i}", "expected_answer": "y"} for i in range(30)])
    with pytest.raises(RunError) as e:
        run_quiet(drifted)
    assert f"input file {inp}: content changed" in str(e.value)


def test_api_key_reaches_the_server_but_no_output(tmp_path, mock_server, monkeypatch, capfd):
    monkeypatch.setenv("SFT_TEST_KEY", "sk-live-DO-NOT-LEAK-42")
    inp = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "hi", "expected_answer": "hi"},
                                              {"prompt": "x [[echo_auth]]", "expected_answer": "x"}])
    cfg = make_config(tmp_path, mock_server, inp, "model.api_key_env=SFT_TEST_KEY", "max_error_fraction=1")
    code, out = run_quiet(cfg)
    assert code == EXIT_OK
    assert "Bearer sk-live-DO-NOT-LEAK-42" in mock_server.state.auth_headers
    captured = capfd.readouterr()
    assert "DO-NOT-LEAK" not in out + captured.out + captured.err
    for root, _, files in os.walk(tmp_path / "run"):
        for f in files:
            assert b"DO-NOT-LEAK" not in open(os.path.join(root, f), "rb").read(), f
    [failed] = read_rows(tmp_path / "run" / "failed")
    assert failed["error"]["type"] == "auth_error" and "***" in failed["error"]["message"]


def test_stats_and_filter_commands_on_a_run_folder(tmp_path, mock_server):
    rows = [{"prompt": f"\\boxed{{{i}}}", "expected_answer": str(i % 3)} for i in range(30)]
    inp = write_jsonl(tmp_path / "in.jsonl", rows)
    cfg = make_config(tmp_path, mock_server, inp, "verifier.type=math")
    assert run_quiet(cfg)[0] == EXIT_OK
    run_dir = str(tmp_path / "run")
    served = mock_server.state.requests
    cli = [sys.executable, "-m", "sft_ray.cli"]
    stats = subprocess.run(cli + ["stats", run_dir], capture_output=True, text=True, timeout=120)
    assert stats.returncode == 0, stats.stderr
    assert "samples: 30" in stats.stdout and '"reward": 0.1' in stats.stdout
    flt = subprocess.run(cli + ["filter", run_dir, "--min-reward", "1", "--rows-per-shard", "2"],
                         capture_output=True, text=True, timeout=120)
    assert flt.returncode == 0, flt.stderr
    train = read_rows(tmp_path / "run" / "train")
    assert len(train) == 3  # \boxed{0}, {1}, {2} match their expected answers
    assert len(list((tmp_path / "run" / "train").glob("*.jsonl"))) == 2
    saved = json.loads((tmp_path / "run" / "stats.json").read_text())
    assert saved["kept"] == 3 and saved["filter"] == {"min_reward": 1.0}
    assert mock_server.state.requests == served  # no model was called


def test_tensor_parallel_replica_gets_a_placement_group_of_gpu_bundles(ray_cluster):
    """What can be checked without GPUs: the placement group the actor asks for one replica with
    tensor_parallel_size 4 (it stays pending here; the gpu-marked test in test_vllm.py runs one)."""
    from sft_ray import placement

    model, num_gpus = placement.replica_args({"engine_kwargs": {"tensor_parallel_size": 4}}, 1)
    assert num_gpus is None  # the actor takes none: its engine's workers take the group's
    assert model["engine_kwargs"]["distributed_executor_backend"] == "ray"
    pg = placement.acquire_replica_group(model)
    try:
        assert pg.bundle_specs == [{"GPU": 1, "CPU": 1}] * 4
        assert placement.acquire_replica_group(model) is pg  # one per process
    finally:
        assert placement.release_own_placement_group()
