"""The run folder's names: part files carry their session, and only recorded sessions' files are read."""

from __future__ import annotations

from sft_ray.runfolder.layout import (
    compact_name,
    iter_jsonl,
    part_name,
    part_session,
    recorded_sessions,
    shard_name,
    written_by,
)


def test_part_names_carry_the_session_and_read_back():
    assert part_name(3, 12) == "part-003-00012.jsonl"
    assert part_name(1, 0, prefix="rescore") == "rescore-001-00000.jsonl"
    assert compact_name(7) == "part-007-compact.jsonl"
    assert part_session("s3://b/run/rollouts/" + part_name(3, 12)) == 3
    assert part_session(compact_name(7)) == 7
    assert part_session(part_name(2, 5, prefix="rescore")) == "rescore-2"
    for stray in ("notes.jsonl", "part-003-00012.json", "part-x-00001.jsonl", "my-part-001-00001.jsonl"):
        assert part_session(stray) is None, stray


def test_recorded_sessions_come_from_the_manifest():
    assert recorded_sessions(None) is None
    assert recorded_sessions({"config": {}}) is None  # no session record at all: every file is the run's
    assert recorded_sessions({"sessions": []}) == frozenset()
    # a record without its number is numbered by its place; rescore sessions are named apart
    manifest = {"sessions": [{"session": 0}, {}, {"session": 5}], "rescored_sessions": 2}
    assert recorded_sessions(manifest) == frozenset({0, 1, 5, "rescore-0", "rescore-1"})


def test_written_by_splits_the_runs_files_from_strays():
    uris = [part_name(0, 0), part_name(1, 3), compact_name(2), "stray.jsonl", part_name(9, 0),
            part_name(0, 1, prefix="rescore")]
    assert written_by(uris, None) == (uris, [])
    ours, unknown = written_by(uris, frozenset({0, 1, 2, "rescore-0"}))
    assert ours == [part_name(0, 0), part_name(1, 3), compact_name(2), part_name(0, 1, prefix="rescore")]
    assert unknown == ["stray.jsonl", part_name(9, 0)]


def test_shard_names():
    assert shard_name(0, "jsonl") == "part-00000.jsonl" and shard_name(12, "parquet") == "part-00012.parquet"


def test_iter_jsonl_yields_torn_lines_as_none_and_skips_blank_ones(tmp_path):
    f = tmp_path / "part-000-00000.jsonl"
    f.write_bytes(b'{"id": "a", "sample_index": 0}\n\n   \n{"id": "b", "sample_index": 1}\n{"id": "c", "sam')
    got = list(iter_jsonl(str(f)))
    assert [row for row, _ in got] == [{"id": "a", "sample_index": 0}, {"id": "b", "sample_index": 1}, None]
    assert got[-1][1] == b'{"id": "c", "sam'
