"""Resume state (issue 9): global sample keys, failure records kept until retried, completion
counted sample by sample, read.limit global and in the fingerprint, train/ swapped in whole."""

from __future__ import annotations

import json
import time

import orjson
import pytest
from conftest import make_config, read_rows, write_jsonl

from sft_ray import io
from sft_ray.configload import load_config
from sft_ray.finalize import passes as fin
from sft_ray.job import RunError, run
from sft_ray.runfolder.completion import EXIT_BUDGET, EXIT_OK, EXIT_PENDING, Budget, Completion
from sft_ray.runfolder.manifest import prepare_run_dir, save_manifest
from sft_ray.runfolder.parts import Writers
from sft_ray.runfolder.state import FolderState, compact_failures, load_failures
from sft_ray.stages.read import read_samples, scan_input


def _keys(plan, num_repeats=1):
    out = []
    for f in plan.used():
        for cols in read_samples(f.path, num_repeats, limit=f.rows, qualifier=f.qualifier, renamed=f.renamed):
            out += list(zip(cols["id"], cols["sample_index"]))
    return out


def test_ids_are_unique_across_shards_and_stable(tmp_path):
    (tmp_path / "in").mkdir()
    a = write_jsonl(tmp_path / "in" / "shard-0.jsonl", [{"id": i, "prompt": f"a{i}"} for i in range(3)])
    b = write_jsonl(tmp_path / "in" / "shard-1.jsonl", [{"id": i, "prompt": f"b{i}"} for i in range(3)])
    c = write_jsonl(tmp_path / "in" / "shard-2.jsonl", [{"id": f"c{i}", "prompt": "same"} for i in range(2)]
                    + [{"prompt": "x"}, {"prompt": "x"}])  # identical rows without id
    d = write_jsonl(tmp_path / "in" / "shard-3.jsonl", [{"prompt": "x"}])  # identical to a row of shard-2
    plan = scan_input([str(a), str(b), str(c), str(d)], None, False)
    keys = _keys(plan)
    assert len(keys) == len(set(keys)) == 11
    assert {k for k, _ in keys} == plan.ids  # the read tasks make the ids the driver counted
    assert ("0", 0) in keys and ("shard-1.jsonl:0", 0) in keys  # first file keeps its ids
    assert [f.qualifier for f in plan.files] == [None, "shard-1.jsonl", None, "shard-3.jsonl"]
    again = scan_input([str(a), str(b), str(c), str(d)], None, False)
    assert _keys(again) == keys  # a rerun makes the same keys


def test_a_repeat_suffix_never_collides_with_a_given_id(tmp_path):
    f = write_jsonl(tmp_path / "in.jsonl", [{"id": "a", "prompt": "1"}, {"id": "a", "prompt": "2"},
                                            {"id": "a-1", "prompt": "3"}])
    keys = _keys(scan_input([str(f)], None, False))
    # "a-1" names the row whose id is "a-1", not the second "a" (which takes the first free suffix)
    assert keys == [("a", 0), ("a-2", 0), ("a-1", 0)]


def _ids(tmp_path, rows, limit=None):
    f = write_jsonl(tmp_path / "in.jsonl", rows)
    plan = scan_input([str(f)], limit, False)
    keys = [k for k, _ in _keys(plan)]
    assert set(keys) == plan.ids and len(keys) == len(set(keys))  # the read task makes the scan's ids
    # read_samples on its own (no scan given) makes the same ids
    assert [k for cols in read_samples(str(f), 1, limit=plan.files[0].rows) for k in cols["id"]] == keys
    return keys


def test_a_type_clash_gives_the_string_id_to_the_string(tmp_path):
    # integer 7 and string "7": the string keeps "7", whichever comes first; the integer gets a free suffix
    assert _ids(tmp_path, [{"id": 7, "prompt": "int"}, {"id": "7", "prompt": "str"}]) == ["7-1", "7"]
    assert _ids(tmp_path, [{"id": "7", "prompt": "str"}, {"id": 7, "prompt": "int"}]) == ["7", "7-1"]
    assert _ids(tmp_path, [{"id": 7, "prompt": "i"}, {"id": "7", "prompt": "s"}, {"id": "7-1", "prompt": "t"},
                           {"id": 7, "prompt": "i2"}]) == ["7-2", "7", "7-1", "7-3"]
    # other JSON types and the content hash of rows without id follow the same rule
    h = _ids(tmp_path, [{"prompt": "x"}])[0]
    assert _ids(tmp_path, [{"prompt": "x"}, {"id": h, "prompt": "y"}, {"id": True, "prompt": "z"},
                           {"id": "true", "prompt": "w"}]) == [f"{h}-1", h, "true-1", "true"]


def test_ids_without_a_collision_are_as_before(tmp_path):
    # Run folders made before the look-ahead resume: ids that collide with no input id keep their old form.
    h = _ids(tmp_path, [{"prompt": "x"}])[0]
    assert _ids(tmp_path, [{"id": "a", "prompt": "1"}, {"id": "a", "prompt": "2"}, {"id": "b", "prompt": "3"},
                           {"id": "a", "prompt": "4"}, {"id": 7, "prompt": "5"}, {"id": 7, "prompt": "6"},
                           {"prompt": "x"}, {"prompt": "x"}, {"prompt": "x"}]) == \
        ["a", "a-1", "b", "a-2", "7", "7-1", h, f"{h}-1", f"{h}-2"]
    # only the rows the run uses count: an "a-1" beyond read.limit does not move the repeat
    assert _ids(tmp_path, [{"id": "a", "prompt": "1"}, {"id": "a", "prompt": "2"}, {"id": "a-1", "prompt": "3"}],
                limit=2) == ["a", "a-1"]


def test_limit_is_global_over_files_in_order(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [{"prompt": f"a{i}"} for i in range(3)])
    b = write_jsonl(tmp_path / "b.jsonl", [{"prompt": f"b{i}"} for i in range(3)])
    c = write_jsonl(tmp_path / "c.jsonl", [{"prompt": f"c{i}"} for i in range(3)])
    plan = scan_input([str(a), str(b), str(c)], 4, False)
    assert plan.rows == 4 and [f.rows for f in plan.files] == [3, 1, 0]
    assert [f.path for f in plan.used()] == [str(a), str(b)]
    assert len(_keys(plan)) == 4 and len(plan.ids) == 4
    assert len(plan.digests) == 3  # every file's content still guards the resume


def test_changed_read_limit_is_refused_on_resume(tmp_path):
    inp = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "p"}])
    base = [f"input={inp}", f"output={tmp_path / 'run'}", "model.name=m"]
    cfg = load_config(None, base + ["read.limit=10"])
    manifest = prepare_run_dir(cfg, False, {})
    save_manifest(cfg.output, manifest)
    prepare_run_dir(cfg, False, {})  # the same limit resumes
    with pytest.raises(ValueError, match="read.limit: 10 -> 20"):
        prepare_run_dir(load_config(None, base + ["read.limit=20"]), False, {})
    with pytest.raises(ValueError, match=r"read: \{'limit': 10\} -> None"):
        prepare_run_dir(load_config(None, base), False, {})


def test_send_seed_is_part_of_the_fingerprint(tmp_path):
    base = [f"input={tmp_path / 'in.jsonl'}", f"output={tmp_path / 'run'}", "model.name=m"]
    cfg = load_config(None, base)
    save_manifest(cfg.output, prepare_run_dir(cfg, False, {}))
    with pytest.raises(ValueError, match="model.send_seed: True -> False"):
        prepare_run_dir(load_config(None, base + ["model.send_seed=false"]), False, {})


def test_one_input_spelled_differently_is_the_same_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "in").mkdir()
    (tmp_path / "v.py").write_text("def score(row, response):\n    return 1.0\n")

    def cfg(inp: str, function: str = "v.py:score"):
        return load_config(None, [f"input={inp}", "output=run", "model.name=m", "verifier.type=python",
                                  f"verifier.function={function}"])

    save_manifest("run", prepare_run_dir(cfg("./in"), False, {}))
    for inp, function in (("in", "v.py:score"), ("in/", "./v.py:score"), (str(tmp_path / "in"), str(tmp_path / "v.py:score")),
                          ("./sub/../in", "v.py:score")):
        prepare_run_dir(cfg(inp, function), False, {})  # the same input and verifier: resumes
    with pytest.raises(ValueError, match="input: "):
        prepare_run_dir(cfg("other"), False, {})
    with pytest.raises(ValueError, match="verifier.function: "):
        prepare_run_dir(cfg("in", "v.py:other"), False, {})
    # URIs are kept as written
    from sft_ray.runfolder.manifest import canonical_fingerprint

    assert canonical_fingerprint({"input": "s3://b/in/"})["input"] == "s3://b/in/"


def test_a_folder_made_before_paths_and_send_seed_were_canonical_resumes(tmp_path, monkeypatch):
    # run.json of an earlier version: the input as typed (relative), no model.send_seed
    monkeypatch.chdir(tmp_path)
    cfg = load_config(None, ["input=./in.jsonl", "output=run", "model.name=m"])
    manifest = prepare_run_dir(cfg, False, {})
    manifest["fingerprint"]["input"] = "./in.jsonl"
    del manifest["fingerprint"]["model"]["send_seed"]
    save_manifest("run", manifest)
    prepare_run_dir(load_config(None, ["input=in.jsonl", "output=run", "model.name=m"]), False, {})
    prepare_run_dir(load_config(None, ["input=in.jsonl", "output=run", "model.name=m", "model.send_seed=false"]),
                    False, {})  # unknown then: not refused


def _failed_row(rid: str, runs: int | None = None) -> bytes:
    row = {"id": rid, "sample_index": 0, "error": {"type": "server_error", "message": "500"}}
    if runs:
        row["failed_runs"] = runs
    return orjson.dumps(row)


def test_failure_records_survive_a_run_that_stops_before_retrying(tmp_path):
    run_dir = str(tmp_path / "run")
    io.makedirs(io.join(run_dir, "failed"))
    io.write_bytes(io.join(run_dir, "failed", "part-000-00000.jsonl"),
                   _failed_row("a", 1) + b"\n" + _failed_row("b", 2) + b"\n")
    # A retry run starts (reads the records) and dies before writing anything.
    assert load_failures(run_dir, set()) == {("a", 0): 1, ("b", 0): 2}
    assert load_failures(run_dir, set()) == {("a", 0): 1, ("b", 0): 2}  # nothing lost, counts kept
    # A session retried "a" (it failed again) and "b" succeeded; compaction keeps what is live.
    state = FolderState(run_dir, 3)
    w = Writers(run_dir, 1, state)
    w.write([("a", 0), ("b", 0)], [_failed_row("a").decode(), json.dumps({"id": "b", "sample_index": 0})],
            [True, False])
    w.close()
    assert state.failed_runs == {("a", 0): 2} and ("b", 0) in state.done
    compact_failures(run_dir, 1, state.done)
    files = io.list_files(io.join(run_dir, "failed"), ".jsonl")
    assert [f.rsplit("/", 1)[1] for f in files] == ["part-001-compact.jsonl"]
    assert read_rows(tmp_path / "run" / "failed") == [{**json.loads(_failed_row("a")), "failed_runs": 2}]
    assert load_failures(run_dir, state.done) == {("a", 0): 2}


def test_completion_counts_each_sample_and_one_rule_sets_the_exit_code(tmp_path):
    run_dir = str(tmp_path / "run")
    io.makedirs(io.join(run_dir, "rollouts"))
    io.makedirs(io.join(run_dir, "failed"))
    io.write_bytes(io.join(run_dir, "rollouts", "part-000-00000.jsonl"),
                   b"".join(orjson.dumps({"id": r, "sample_index": 0}) + b"\n" for r in "abcdefgh")
                   + orjson.dumps({"id": "stale", "sample_index": 0}) + b"\n")  # not an expected sample
    io.write_bytes(io.join(run_dir, "failed", "part-000-00000.jsonl"), _failed_row("i", 2) + b"\n")
    state = FolderState(run_dir, 2)
    c = Completion.of(set("abcdefghij"), state, 1)
    assert (c.expected, c.done, c.failed, c.failed_final, c.pending) == (10, 8, 1, 1, 1)
    budget = Budget(max_fraction=0.5, min_rows=1)
    assert c.verdict(budget)[0] == EXIT_PENDING and not c.as_stats(budget)["complete"]
    c = Completion.of(set("abcdefghi"), state, 1)
    assert c.verdict(budget) == (EXIT_OK, None) and c.as_stats(budget)["complete"]
    assert c.verdict(Budget(max_fraction=0.1, min_rows=1))[0] == EXIT_BUDGET
    # The early stop applies the same rule, once min_rows samples have a result.
    assert not Budget(0.1, 200).exceeded(8, 1) and Budget(0.1, 200).exceeded(8, 1, final=True)


def test_train_is_swapped_in_whole(tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    (run_dir / "rollouts").mkdir(parents=True)
    write_jsonl(run_dir / "rollouts" / "part-000-00000.jsonl",
                [{"id": str(i), "sample_index": 0, "reward": 1.0, "messages": [], "error": None} for i in range(6)])
    train_cfg = {"rows_per_shard": 2, "format": "jsonl", "include_fields": []}
    fin.finalize(str(run_dir), {"min_reward": 0.0}, 0, train_cfg)
    before = {p.name: p.read_bytes() for p in (run_dir / "train").iterdir()}
    assert len(before) == 3
    calls = []

    def failing(job, split, i, uri, real=fin._write_part):
        calls.append(uri)
        if len(calls) == 2:
            raise OSError("disk full")
        real(job, split, i, uri)

    monkeypatch.setattr(fin, "_write_part", failing)
    with pytest.raises(OSError):
        fin.finalize(str(run_dir), {"min_reward": 0.0}, 7, {**train_cfg, "rows_per_shard": 3})
    assert {p.name: p.read_bytes() for p in (run_dir / "train").iterdir()} == before  # old train/ whole
    monkeypatch.undo()
    fin.finalize(str(run_dir), {"min_reward": 0.0}, 7, {**train_cfg, "rows_per_shard": 3})
    assert sorted(p.name for p in (run_dir / "train").iterdir()) == ["part-00000.jsonl", "part-00001.jsonl"]
    assert sorted(p.name for p in run_dir.iterdir()) == ["README.md", "rollouts", "train"]  # nothing left aside


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


def test_journal_appends_and_reads_back_each_sample_once(tmp_path):
    from sft_ray.runfolder.journal import Journal, clear_journal, read_journal

    a, b = Journal(str(tmp_path), "a"), Journal(str(tmp_path), "b")
    a.append(orjson.dumps({"id": "x", "sample_index": 0, "response": "1"}))
    b.append(orjson.dumps({"id": "x", "sample_index": 0, "response": "1"}))  # a batch retried elsewhere
    b.append(orjson.dumps({"id": "y", "sample_index": 0, "response": "2"}))
    with open(tmp_path / "journal" / "a.jsonl", "ab") as f:
        f.write(b'{"id": "z", "sam')  # torn by a kill in mid-append
    assert [r["id"] for r in read_journal(str(tmp_path), set())] == ["x", "y"]
    assert [r["id"] for r in read_journal(str(tmp_path), {("x", 0)})] == ["y"]
    a.close()
    b.close()
    clear_journal(str(tmp_path))
    assert not (tmp_path / "journal").exists()


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


def test_restart_discards_the_journal(tmp_path):
    inp = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "p"}])
    cfg = load_config(None, [f"input={inp}", f"output={tmp_path / 'run'}", "model.name=m"])
    save_manifest(cfg.output, prepare_run_dir(cfg, False, {}))
    (tmp_path / "run" / "journal").mkdir()
    (tmp_path / "run" / "journal" / "a.jsonl").write_text('{"id": "x", "sample_index": 0}\n')
    prepare_run_dir(cfg, True, {})
    assert not (tmp_path / "run" / "journal").exists()  # answers made under the old config


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
