"""The generation journal on a local folder: each append is in the file at once, a torn line and
a key already done are skipped on reading, and a journal that cannot be written does not stop
generation."""

from __future__ import annotations

import json

from sft_ray.runfolder.journal import Journal, clear_journal, read_journal


def test_appends_are_in_the_file_at_once_and_read_back_once(tmp_path):
    a, b = Journal(str(tmp_path), "a"), Journal(str(tmp_path), "b")
    a.append(json.dumps({"id": "x", "sample_index": 0, "response": "first"}).encode())
    b.append(json.dumps({"id": "x", "sample_index": 0, "response": "again"}).encode())  # the same key twice
    b.append(json.dumps({"id": 7, "sample_index": 1}).encode())
    # before any close: what a kill -9 would leave
    assert (tmp_path / "journal" / "a.jsonl").read_bytes().count(b"\n") == 1
    with open(tmp_path / "journal" / "b.jsonl", "ab") as f:
        f.write(b'{"id": "torn", "sample_in')
    rows = list(read_journal(str(tmp_path), skip=set()))
    assert [(r["id"], r["sample_index"]) for r in rows] == [("x", 0), (7, 1)] and rows[0]["response"] == "first"
    assert [r["id"] for r in read_journal(str(tmp_path), skip={("x", 0)})] == [7]  # keys as strings and ints
    a.close()
    b.close()
    clear_journal(str(tmp_path))
    assert not (tmp_path / "journal").exists() and list(read_journal(str(tmp_path), skip=set())) == []


def test_a_journal_that_cannot_be_written_is_skipped_with_one_warning(tmp_path, caplog):
    (tmp_path / "journal").write_text("a file where the folder should be")
    j = Journal(str(tmp_path), "a")
    j.append(b'{"id": "x", "sample_index": 0}')
    j.append(b'{"id": "y", "sample_index": 0}')
    j.close()
    warnings = [r for r in caplog.records if "generation journal unavailable" in r.getMessage()]
    assert j.broken and len(warnings) == 1
