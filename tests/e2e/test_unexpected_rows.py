"""Defence in depth at finalize (issue 17): a rollout that no session of the run wrote (a part
file of no recorded session) or whose key is none of the run's samples is never trained on, is
counted in stats.json (``unexpected_rows``, by reason) and named in the reports, and a resumed
run does not take it as done."""

from __future__ import annotations

import json

import pytest
from conftest import make_config, read_rows, write_jsonl
from typer.testing import CliRunner

from sft_ray.cli import app
from sft_ray.finalize.passes import finalize
from sft_ray.finalize.report_html import render
from sft_ray.finalize.stats import format_report
from sft_ray.job import EXIT_OK, RunError, finalize_run
from sft_ray.runfolder.state import FolderState, compact_failures

TRAIN = {"rows_per_shard": 100, "format": "jsonl", "include_fields": ["id", "sample_index", "reward"]}


def rollout(rid, k, text="a", reward=1.0):
    return {"id": rid, "sample_index": k, "reward": reward, "error": None, "finish_reason": "stop",
            "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": text}],
            "usage": {"input_tokens": 3, "output_tokens": 5, "total_tokens": 8}}


def append(path, row):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")


def make_folder(run):
    """Session 0's files (real rows p0..p9), plus rows no session wrote and rows with odd keys."""
    (run / "rollouts").mkdir(parents=True)
    (run / "failed").mkdir()
    write_jsonl(run / "rollouts" / "part-000-00000.jsonl", [rollout(f"p{i}", 0, f"real {i}") for i in range(10)])
    append(run / "rollouts" / "part-900-00000.jsonl", rollout("p1", 0, "INJECTED TRAINING ROW"))
    append(run / "rollouts" / "part-900-00000.jsonl", rollout("p11", 0, "INJECTED TRAINING ROW"))
    (run / "rollouts" / "notes.jsonl").write_text("not json at all\n")  # no session's name at all
    hostile = "\x1b[2J" + "x" * 5000  # a terminal escape and a huge id: shown quoted and cut short
    append(run / "rollouts" / "part-000-00000.jsonl", rollout(hostile, 0, "INJECTED TRAINING ROW"))
    append(run / "rollouts" / "part-000-00000.jsonl", rollout("p2", 7, "INJECTED TRAINING ROW"))
    write_jsonl(run / "failed" / "part-000-compact.jsonl",
                [{"id": "f0", "sample_index": 0, "reward": None, "error": {"type": "timeout", "message": "m"}}])
    append(run / "failed" / "part-901-compact.jsonl",
           {"id": "p3", "sample_index": 0, "reward": None, "error": {"type": "timeout", "message": "m"}})
    return hostile


def train_texts(run):
    return [r["messages"][-1]["content"] for r in read_rows(run / "train")]


@pytest.mark.parametrize("workers", [1, 2])
def test_finalize_never_trains_on_rows_of_no_session_or_unexpected_keys(tmp_path, workers):
    hostile = make_folder(tmp_path)
    train = {**TRAIN, "include_fields": []}
    stats = finalize(str(tmp_path), {}, 0, train, workers=workers, sessions=frozenset({0}),
                     unexpected=frozenset({(hostile, 0), ("p2", 7)}))
    assert sorted(train_texts(tmp_path)) == sorted(f"real {i}" for i in range(10))
    assert stats["samples"] == 11 and stats["succeeded"] == 10 and stats["failed"] == 1  # f0; not p3
    odd = stats["unexpected_rows"]
    assert odd["count"] == 6
    assert odd["by_reason"] == {"unexpected_key": 2, "unknown_part_file": 4}
    assert odd["files"] == {"failed/part-901-compact.jsonl": 1, "rollouts/notes.jsonl": 1,
                            "rollouts/part-000-00000.jsonl": 2, "rollouts/part-900-00000.jsonl": 2}
    named = {(e["reason"], e["file"], e["id"]) for e in odd["examples"]}
    assert ("unknown_part_file", "rollouts/part-900-00000.jsonl", "p11") in named
    assert ("unexpected_key", "rollouts/part-000-00000.jsonl", "p2") in named
    assert max(len(str(e["id"])) for e in odd["examples"]) < 120
    report = format_report(stats)
    assert "UNEXPECTED ROWS, not trained on: 6" in report and '"rollouts/part-900-00000.jsonl"' in report
    assert '"p11"' in report and "\x1b" not in report  # quoted: no control character reaches a terminal
    page = render(stats)
    assert 'id="unexpected-rows"' in page and "part-900-00000.jsonl" in page and "\x1b" not in page
    # Without the run's sessions and keys (a folder made before they were recorded), every row is the run's.
    assert finalize(str(tmp_path), {}, 0, train, write=False)["unexpected_rows"]["count"] == 0


def test_a_resumed_run_reads_only_the_files_of_recorded_sessions(tmp_path):
    make_folder(tmp_path)
    state = FolderState(str(tmp_path), 3, sessions=frozenset({0}))
    assert ("p11", 0) not in state.done and ("p2", 7) in state.done  # the key check is finalize's
    assert state.failed_sessions == {("f0", 0): 1}  # p3's record is in a file of no session
    assert ("p11", 0) in FolderState(str(tmp_path), 3).done  # without the sessions, every file counts
    compact_failures(str(tmp_path), 1, state.done, frozenset({0, 1}))
    assert sorted(p.name for p in (tmp_path / "failed").iterdir()) == ["part-000-compact.jsonl",
                                                                       "part-901-compact.jsonl"]


def test_filter_refuses_a_record_of_unexpected_keys_cut_short(tmp_path):
    make_folder(tmp_path)
    manifest = {"sessions": [{"session": 0}], "config": {},
                "unexpected_keys": {"count": 20_000, "keys": [["p2", 7]]}}
    with pytest.raises(RunError, match="20000 rollouts"):
        finalize_run(str(tmp_path), {}, 0, TRAIN, manifest, lambda s: None)
    assert not (tmp_path / "train").exists()
    stats = finalize_run(str(tmp_path), {}, 0, TRAIN, manifest, lambda s: None, write=False)  # `sft-ray stats`
    assert stats["unexpected_rows"]["by_reason"]["unexpected_key"] == 1


@pytest.mark.usefixtures("ray_cluster")
def test_injected_rollouts_never_reach_train_in_a_real_run(tmp_path, mock_server):
    from sft_ray.job import run

    inp = write_jsonl(tmp_path / "in.jsonl", [{"id": f"p{i}", "prompt": f"row {i}", "expected_answer": f"row {i}"}
                                              for i in range(6)])
    cfg = make_config(tmp_path, mock_server, inp, "filter.min_reward=0")
    out = tmp_path / "run"
    # Before the first session: a made-up rollout of an expected sample in a file no session writes.
    append(out / "rollouts" / "part-900-00000.jsonl", rollout("p0", 0, "INJECTED TRAINING ROW"))
    said = []
    assert run(cfg, say=said.append) == EXIT_OK, said
    assert "0 already done, 6 to generate" in said[0]  # the injected row made no sample done
    assert mock_server.state.requests == 6
    # Between sessions: a row of an id that is not in the input, appended to a real part file.
    real_part = sorted((out / "rollouts").glob("part-000-*.jsonl"))[0]
    append(real_part, rollout("not-in-the-input", 0, "INJECTED TRAINING ROW"))
    said = []
    assert run(cfg, say=said.append) == EXIT_OK, said
    assert "6 already done, 0 to generate" in said[0]
    stats = json.loads((out / "stats.json").read_text())
    assert (stats["samples"], stats["expected"], stats["done"], stats["complete"]) == (6, 6, 6, True)
    assert stats["unexpected_rows"]["by_reason"] == {"unexpected_key": 1, "unknown_part_file": 1}
    assert (out / "_SUCCESS").exists()
    texts = train_texts(out)
    assert len(texts) == 6 and not any("INJECTED" in t for t in texts)
    report = "\n".join(said)
    assert "part-900-00000.jsonl" in report and '"not-in-the-input"' in report
    manifest = json.loads((out / "run.json").read_text())
    assert manifest["unexpected_keys"] == {"count": 1, "keys": [["not-in-the-input", 0]]}
    # `sft-ray filter` reads no input: it uses the keys the run recorded.
    result = CliRunner().invoke(app, ["filter", str(out), "--seed", "3"])
    assert result.exit_code == 0, result.output
    assert len(train_texts(out)) == 6 and not any("INJECTED" in t for t in train_texts(out))
    assert json.loads((out / "stats.json").read_text())["unexpected_rows"]["count"] == 2
    result = CliRunner().invoke(app, ["stats", str(out), "--html", "-"])
    assert result.exit_code == 0, result.output
    page = (out / "report.html").read_text()
    assert "part-900-00000.jsonl" in page and "not-in-the-input" in page
