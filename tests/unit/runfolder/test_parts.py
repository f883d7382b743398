"""Part writers: rotating part files named by session, failures counted per run, the folder's
state kept in step with what is written, and a bad input line raised as the user's error."""

from __future__ import annotations

import json

import pytest

from sft_ray.rows import InputError
from sft_ray.runfolder.layout import part_name
from sft_ray.runfolder.parts import PartWriter, Writers
from sft_ray.runfolder.state import FolderState


def test_parts_rotate_by_rows_and_each_line_is_on_disk_at_once(tmp_path):
    w = PartWriter(str(tmp_path / "rollouts"), session=2, part_rows=3)
    w.write([b'{"n": 0}', b'{"n": 1}'])
    assert (tmp_path / "rollouts" / part_name(2, 0)).read_bytes() == b'{"n": 0}\n{"n": 1}\n'  # before close
    w.write([b'{"n": 2}'])  # the third row closes part 0
    w.write([b'{"n": 3}'])
    w.write([])
    w.close()
    names = sorted(p.name for p in (tmp_path / "rollouts").iterdir())
    assert names == [part_name(2, 0), part_name(2, 1)] and w.rows == 4
    assert (tmp_path / "rollouts" / part_name(2, 1)).read_bytes() == b'{"n": 3}\n'


def test_writers_keep_the_folder_state_in_step(tmp_path):
    state = FolderState(str(tmp_path), max_attempts=2, pass_threshold=0.5)
    w = Writers(str(tmp_path), 0, state)
    rows = [{"id": "a", "sample_index": 0, "reward": 1.0}, {"id": "b", "sample_index": 0, "error": {"type": "timeout"}},
            {"id": "c", "sample_index": 0, "reward": 0.1}]
    written = w.write([("a", 0), ("b", 0), ("c", 0)], [json.dumps(r) for r in rows], [False, True, False],
                      rewards=[1.0, None, 0.1])
    assert written == (2, 1)
    assert state.done == {("a", 0), ("c", 0)} and state.failed_sessions == {("b", 0): 1} and state.passing["a"] == 1
    assert "c" not in state.passing
    # b fails again, then succeeds: its count goes to 2, then it is done
    w.write([("b", 0)], [json.dumps(rows[1])], [True])
    assert state.failed_sessions == {("b", 0): 2}
    w.write([("b", 0)], [json.dumps({"id": "b", "sample_index": 0, "reward": 0.0})], [False])
    assert ("b", 0) in state.done and not state.failed_sessions
    w.close()
    failed = [json.loads(line) for line in (tmp_path / "failed" / part_name(0, 0)).read_text().splitlines()]
    assert [r["failed_runs"] for r in failed] == [1, 2]
    reread = FolderState(str(tmp_path), max_attempts=2)
    assert reread.done == state.done and reread.failed_sessions == {}


def test_a_bad_input_line_is_raised_as_the_users_error(tmp_path):
    w = Writers(str(tmp_path), 0, FolderState(str(tmp_path), max_attempts=3))
    bad = {"id": "x", "sample_index": 0,
           "error": {"type": "bad_input", "message": "in.jsonl:7: field tools: not a list"}}
    with pytest.raises(InputError) as err:
        w.write([("x", 0)], [json.dumps(bad)], [True])
    assert (err.value.source, err.value.reason) == ("in.jsonl:7", "field tools: not a list")
    w.close()
    assert list((tmp_path / "failed").iterdir()) == []  # the user's error is no failure record
