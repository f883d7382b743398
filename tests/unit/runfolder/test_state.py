"""What the run folder says about each sample: done, failed in N runs; torn lines cut only under
the lock; failed/ compacted without losing a record."""

from __future__ import annotations

import json
from collections import Counter

from sft_ray.runfolder.layout import compact_name, part_name
from sft_ray.runfolder.state import FolderState, compact_failures, count_failure, done_keys, load_failures


def _write(path, rows, tail: bytes = b""):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"".join(json.dumps(r).encode() + b"\n" for r in rows) + tail)
    return path


def test_done_keys_counts_passing_and_cuts_a_torn_line_only_when_asked(tmp_path):
    rows = [{"id": 1, "sample_index": 0, "reward": 1.0}, {"id": "1", "sample_index": 1, "reward": 0.2},
            {"id": "2", "sample_index": "0", "reward": None}]
    part = _write(tmp_path / "rollouts" / part_name(0, 0), rows, tail=b'{"id": "3", "samp')
    size = part.stat().st_size
    passing: Counter[str] = Counter()
    keys = done_keys(str(tmp_path), passing, threshold=0.5)
    assert keys == {("1", 0), ("1", 1), ("2", 0)}  # ids as strings, indexes as ints
    assert passing == Counter({"1": 1})
    assert part.stat().st_size == size  # a reader leaves every byte
    assert done_keys(str(tmp_path), repair=True) == keys
    assert part.read_bytes().endswith(b'"reward": null}\n')  # the torn tail is cut, the lines kept


def test_done_keys_reads_only_the_recorded_sessions(tmp_path):
    _write(tmp_path / "rollouts" / part_name(0, 0), [{"id": "a", "sample_index": 0}])
    _write(tmp_path / "rollouts" / part_name(4, 0), [{"id": "b", "sample_index": 0}])
    _write(tmp_path / "rollouts" / "foreign.jsonl", [{"id": "c", "sample_index": 0}])
    assert done_keys(str(tmp_path), sessions=frozenset({0})) == {("a", 0)}
    assert done_keys(str(tmp_path)) == {("a", 0), ("b", 0), ("c", 0)}


def test_failures_count_runs_and_a_later_success_clears_them(tmp_path):
    row = {"id": "x", "sample_index": 0, "error": {"type": "timeout"}}
    first = json.loads(count_failure(dict(row), {}))
    assert first["failed_runs"] == 1
    again = json.loads(count_failure(dict(row), {("x", 0): 1}))
    assert again["failed_runs"] == 2
    _write(tmp_path / "failed" / part_name(0, 0), [first, {"id": "y", "sample_index": 2, "failed_runs": 1}])
    _write(tmp_path / "failed" / part_name(1, 0), [again], tail=b'{"id": "z"')
    assert load_failures(str(tmp_path), done=set()) == {("x", 0): 2, ("y", 2): 1}
    assert load_failures(str(tmp_path), done={("y", 2)}) == {("x", 0): 2}  # y succeeded since


def test_compaction_keeps_the_latest_record_of_each_live_failure(tmp_path):
    _write(tmp_path / "failed" / part_name(0, 0), [{"id": "x", "sample_index": 0, "failed_runs": 1, "n": "old"},
                                                   {"id": "y", "sample_index": 0, "failed_runs": 1}])
    _write(tmp_path / "failed" / part_name(1, 0), [{"id": "x", "sample_index": 0, "failed_runs": 2, "n": "new"}])
    _write(tmp_path / "failed" / "foreign.jsonl", [{"id": "q", "sample_index": 0, "failed_runs": 1}])
    compact_failures(str(tmp_path), 2, done={("y", 0)}, sessions=frozenset({0, 1}))
    names = sorted(p.name for p in (tmp_path / "failed").iterdir())
    assert names == ["foreign.jsonl", compact_name(2)]  # a file of no recorded session is left alone
    [kept] = [json.loads(line) for line in (tmp_path / "failed" / compact_name(2)).read_text().splitlines()]
    assert kept == {"id": "x", "sample_index": 0, "failed_runs": 2, "n": "new"}
    before = (tmp_path / "failed" / compact_name(2)).stat().st_mtime_ns
    compact_failures(str(tmp_path), 3, done=set(), sessions=frozenset({0, 1, 2}))  # one file, all live: as is
    assert sorted(p.name for p in (tmp_path / "failed").iterdir()) == names
    assert (tmp_path / "failed" / compact_name(2)).stat().st_mtime_ns == before


def test_folder_state_skips_done_and_finally_failed_samples(tmp_path):
    _write(tmp_path / "rollouts" / part_name(0, 0), [{"id": "a", "sample_index": 0, "reward": 1.0}])
    _write(tmp_path / "failed" / part_name(0, 0), [{"id": "b", "sample_index": 0, "failed_runs": 3},
                                                   {"id": "c", "sample_index": 0, "failed_runs": 1}])
    state = FolderState(str(tmp_path), max_attempts=3, pass_threshold=0.5)
    assert state.done == {("a", 0)} and state.passing == Counter({"a": 1})
    assert state.failed_sessions == {("b", 0): 3, ("c", 0): 1}
    assert state.skip() == {("a", 0), ("b", 0)}  # c has attempts left
