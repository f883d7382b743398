"""Resume state, in process (issue 9): global sample keys and stable ids over shards, read.limit
global and in the fingerprint, one input however spelled, failure records kept until retried,
completion counted sample by sample, train/ swapped in whole, the journal read back once.
(Runs that resume through Ray and the mock server: tests/e2e/test_resume.py.)"""

from __future__ import annotations

import json

import orjson
import pytest
from conftest import read_rows, write_jsonl

from sft_ray import io
from sft_ray.configload import load_config
from sft_ray.finalize import passes as fin
from sft_ray.runfolder.completion import EXIT_BUDGET, EXIT_OK, EXIT_PENDING, Completion, FailureBudget
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
    assert state.failed_sessions == {("a", 0): 2} and ("b", 0) in state.done
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
    budget = FailureBudget(max_fraction=0.5, min_rows=1)
    assert c.verdict(budget)[0] == EXIT_PENDING and not c.as_stats(budget)["complete"]
    c = Completion.of(set("abcdefghi"), state, 1)
    assert c.verdict(budget) == (EXIT_OK, None) and c.as_stats(budget)["complete"]
    assert c.verdict(FailureBudget(max_fraction=0.1, min_rows=1))[0] == EXIT_BUDGET
    # The early stop applies the same rule, once min_rows samples have a result.
    assert not FailureBudget(0.1, 200).exceeded(8, 1) and FailureBudget(0.1, 200).exceeded(8, 1, final=True)


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


def test_restart_discards_the_journal(tmp_path):
    inp = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "p"}])
    cfg = load_config(None, [f"input={inp}", f"output={tmp_path / 'run'}", "model.name=m"])
    save_manifest(cfg.output, prepare_run_dir(cfg, False, {}))
    (tmp_path / "run" / "journal").mkdir()
    (tmp_path / "run" / "journal" / "a.jsonl").write_text('{"id": "x", "sample_index": 0}\n')
    prepare_run_dir(cfg, True, {})
    assert not (tmp_path / "run" / "journal").exists()  # answers made under the old config
