"""Resume state (issue 9) through real runs (Ray, the mock server): shards with the same ids, a
Ctrl-C during a retry run, pending samples, the journal's answers scored on resume, reads beside
actors, stall messages. (The state itself, in process: tests/unit/test_resume_state.py.)"""

from __future__ import annotations

import json
import time

import orjson
import pytest
from conftest import make_config, read_rows, write_jsonl

from sft_ray.job import RunError, run
from sft_ray.runfolder.completion import EXIT_OK, EXIT_PENDING
from sft_ray.stages.read import scan_input


@pytest.mark.usefixtures("ray_cluster")
def test_shards_with_the_same_ids_resume_retry_and_train_right(tmp_path, mock_server):
    (tmp_path / "in").mkdir()
    for s in range(2):
        write_jsonl(tmp_path / "in" / f"shard-{s}.jsonl",
                    [{"id": i, "prompt": f"s{s} r{i}" + (" [[fail:500:1]]" if (s, i) == (1, 3) else ""),
                      "expected_answer": f"s{s} r{i}"} for i in range(5)])
    cfg = make_config(tmp_path, mock_server, tmp_path / "in", "model.max_retries=0", "max_error_fraction=0.5",
                      "model.timeout_s=60")
    said = []
    assert run(cfg, say=said.append) == EXIT_OK, said
    ok, failed = read_rows(tmp_path / "run" / "rollouts"), read_rows(tmp_path / "run" / "failed")
    assert len(ok) == 9 and [f["id"] for f in failed] == ["shard-1.jsonl:3"]
    assert "3" in {r["id"] for r in ok}  # shard-0's row 3 succeeded: it must not hide shard-1's failure
    said = []
    assert run(cfg, say=said.append) == EXIT_OK, said
    assert "9 already done, 1 to generate" in said[0]
    assert mock_server.state.requests == 11
    stats = json.loads((tmp_path / "run" / "stats.json").read_text())
    assert (stats["expected"], stats["done"], stats["pending"], stats["complete"]) == (10, 10, 0, True)
    assert (tmp_path / "run" / "_SUCCESS").exists()
    train = read_rows(tmp_path / "run" / "train")
    assert sorted(t["messages"][-1]["content"].split(" [[")[0] for t in train) == sorted(
        f"s{s} r{i}" for s in range(2) for i in range(5))  # both shards' rows, each once


@pytest.mark.usefixtures("ray_cluster")
def test_ctrl_c_during_a_retry_run_keeps_the_failures(tmp_path, mock_server):
    rows = [{"prompt": f"fine {i}", "expected_answer": "x"} for i in range(5)]
    rows += [{"prompt": "broken [[fail:500:99]]", "expected_answer": "x", "id": "broken"}]
    inp = write_jsonl(tmp_path / "in.jsonl", rows)
    cfg = make_config(tmp_path, mock_server, inp, "model.max_retries=0", "max_sample_attempts=2",
                      "max_error_fraction=0.5", "model.timeout_s=60")
    assert run(cfg, say=lambda s: None) == EXIT_OK

    def interrupt(line):
        raise KeyboardInterrupt  # Ctrl-C once the retry run has started

    with pytest.raises(KeyboardInterrupt):
        run(cfg, say=interrupt)
    assert [(f["id"], f["failed_runs"]) for f in read_rows(tmp_path / "run" / "failed")] == [("broken", 1)]
    said = []
    assert run(cfg, say=said.append) == EXIT_OK
    assert "1 failed before and retried now" in said[0]
    assert [(f["id"], f["failed_runs"]) for f in read_rows(tmp_path / "run" / "failed")] == [("broken", 2)]
    said = []
    assert run(cfg, say=said.append) == EXIT_OK and "1 failed for good" in said[0]


@pytest.mark.usefixtures("ray_cluster")
def test_a_stopped_run_exits_non_zero_while_samples_are_pending(tmp_path, mock_server):
    rows = [{"prompt": f"row {i}" + (" [[fail:500:99]]" if i % 3 == 0 else ""), "expected_answer": "x"}
            for i in range(300)]  # a third fail, in every block
    inp = write_jsonl(tmp_path / "in.jsonl", rows)
    cfg = make_config(tmp_path, mock_server, inp, "model.max_retries=0", "max_error_fraction=0.2",
                      "min_rows_for_budget=10", "num_samples_in_parallel=4", "resources.batch_size=8",
                      "model.timeout_s=60")
    said = []
    code = run(cfg, say=said.append)
    stats = json.loads((tmp_path / "run" / "stats.json").read_text())
    assert "stopped early: failure budget exceeded" in said
    assert stats["pending"] > 0 and not stats["complete"] and not (tmp_path / "run" / "_SUCCESS").exists()
    assert stats["pending"] == 300 - stats["done"] - stats["failed"]
    assert code == EXIT_PENDING, said
    with pytest.raises(RunError):
        run(make_config(tmp_path, mock_server, inp, "read.limit=5"), say=lambda s: None)


@pytest.mark.usefixtures("ray_cluster")
def test_a_stall_says_what_ray_waits_for():
    import ray

    from sft_ray.stall import StallWatch

    @ray.remote(num_cpus=64)
    def never():
        return None

    ref = never.remote()
    said: list[str] = []
    watch = StallWatch(0.5, said.append)
    try:
        deadline = time.time() + 60
        while not any("CPU 64" in s for s in said) and time.time() < deadline:
            time.sleep(0.2)
    finally:
        watch.close()
        ray.cancel(ref, force=True)
    report = next(s for s in said if "CPU 64" in s)
    assert report.startswith("no progress for") and "waiting for: 1 x {CPU 64}" in report
    assert "free CPU" in report and "no node has that free" in report


@pytest.mark.usefixtures("ray_cluster")
def test_reads_fit_beside_actors_that_leave_half_a_cpu(tmp_path, mock_server):
    """4 CPUs: the generation actor takes 2, the scoring actor 1.5; a read task asking for a
    whole CPU would wait forever (issue 9.15)."""
    from conftest import start_run

    inp = write_jsonl(tmp_path / "in.jsonl", [{"prompt": f"p{i}", "expected_answer": "x"} for i in range(20)])
    cfg = make_config(tmp_path, mock_server, inp, "resources.generate_num_cpus=2", "resources.score_num_cpus=1.5",
                      "model.timeout_s=60")
    t, result = start_run(cfg)
    t.join(240)
    assert result.get("code") == EXIT_OK


@pytest.mark.usefixtures("ray_cluster")
def test_read_tasks_run_one_at_a_time(tmp_path):
    """At 0.1 CPU, Ray Data would run several read and repartition tasks at once, each extra one
    in a new worker process that imports Ray Data: seconds of start-up on a small machine."""
    from sft_ray.stages.read import READ_CONCURRENCY, READ_NUM_CPUS, make_dataset

    inp = write_jsonl(tmp_path / "in.jsonl", [{"prompt": f"p{i}"} for i in range(20)])
    ds = make_dataset(scan_input([str(inp)], None, False).used(), 1, False, block_rows=8)
    repartition = ds._logical_plan.dag
    [read] = repartition.input_dependencies
    for op in (read, repartition):
        assert op.compute.size == READ_CONCURRENCY == 1, type(op).__name__
        assert op.ray_remote_args["num_cpus"] == READ_NUM_CPUS, type(op).__name__


@pytest.mark.usefixtures("ray_cluster")
def test_answers_in_the_journal_are_scored_on_resume_not_sent_again(tmp_path, mock_server):
    """What a killed run's actors had journaled is written by the next run without a model call (issue 9.14)."""
    rows = [{"prompt": f"\\boxed{{{i}}}", "expected_answer": str(i)} for i in range(10)]
    inp = write_jsonl(tmp_path / "in.jsonl", rows)
    cfg = make_config(tmp_path, mock_server, inp, "verifier.type=math", "model.timeout_s=60")
    from sft_ray.rows import row_id

    (tmp_path / "run" / "journal").mkdir(parents=True)
    with open(tmp_path / "run" / "journal" / "actor-1.jsonl", "wb") as f:
        for r in rows[:4]:  # as the generation actor writes them: unscored rollouts
            f.write(orjson.dumps({**r, "id": row_id(r), "sample_index": 0, "response": r["prompt"], "reward": None,
                                  "messages": [{"role": "user", "content": r["prompt"]},
                                               {"role": "assistant", "content": r["prompt"]}],
                                  "error": None, "usage": {"output_tokens": 3}}) + b"\n")
    said = []
    assert run(cfg, say=said.append) == EXIT_OK, said
    assert "4 recovered from the journal" in said[0] and "6 to generate" in said[0]
    assert mock_server.state.requests == 6
    ok = read_rows(tmp_path / "run" / "rollouts")
    assert len(ok) == 10 and all(r["reward"] == 1.0 for r in ok)  # journaled rows were scored too
    assert not (tmp_path / "run" / "journal").exists()


@pytest.mark.usefixtures("ray_cluster")
def test_a_stall_with_nothing_waiting_for_resources_still_speaks():
    """Nothing waits for resources (an engine loading, a slow endpoint): the watch still says so
    rather than nothing (issue 22 item 5; tests/e2e/test_stall.py has what actors report)."""
    from sft_ray.stall import StallWatch, describe_wait

    deadline = time.time() + 60  # an earlier test's cancelled demand may linger in the status a little
    while describe_wait() != "" and time.time() < deadline:
        time.sleep(0.5)
    assert describe_wait() == ""
    said: list[str] = []
    watch = StallWatch(0.2, said.append)
    time.sleep(1.5)
    watch.close()
    assert said and "nothing is reported in flight and nothing waits for resources" in said[0]
