"""run.json as a type (sft_ray/runfolder/manifest.py): the manifest and session record keep run.json
byte for byte, and stop reasons are an enum read back from the record's text."""

from __future__ import annotations

import json

from sft_ray.runfolder.layout import MANIFEST
from sft_ray.runfolder.manifest import Manifest, SessionRecord, StopReason, load_manifest, save_manifest


def test_stop_reasons_round_trip_through_the_records_text():
    for reason in StopReason:
        assert StopReason.of(reason.text()) is reason
        assert StopReason.of(reason.text("line 3: no prompt")) is reason
    assert StopReason.SPENDING_BUDGET.text() == "budget"  # what run.json and the CLI always said
    assert StopReason.INPUT_ERROR.text("in.jsonl:2: bad") == "input error: in.jsonl:2: bad"
    for other in (None, "", "budgetary", "failure budget", 3):
        assert StopReason.of(other) is None


def test_a_manifest_is_saved_as_the_plain_dict_was_and_its_sessions_are_records(tmp_path):
    m = Manifest({"fingerprint": {"input": "in"}, "sessions": []})
    s = m.open_session(planned=5)
    s.add(3, 1, 40)
    s.stop(StopReason.FAILURE_BUDGET)
    s.stop_first("budget")  # the limiter's reason does not replace the first
    s["spend"] = {"requests": 4, "input_tokens": 10, "output_tokens": 40}
    m.set_unexpected(frozenset({("b", 1), ("a", 0)}), kept=1)
    m.save(str(tmp_path))
    plain = json.loads(json.dumps(m))
    (tmp_path / "plain").mkdir()
    save_manifest(str(tmp_path / "plain"), plain)
    assert (tmp_path / MANIFEST).read_bytes() == (tmp_path / "plain" / MANIFEST).read_bytes()
    again = load_manifest(str(tmp_path))
    assert isinstance(again, Manifest) and isinstance(again.sessions[0], SessionRecord)
    rec = again.sessions[0]
    assert (rec.number, rec["written"], rec["failed"], rec.stop_reason) == (0, 3, 1, StopReason.FAILURE_BUDGET)
    assert again.unexpected == {"count": 2, "keys": [["a", 0]]}
    assert again.spent_before() == {"requests": 4, "input_tokens": 10, "output_tokens": 40}
    assert again.open_session(planned=0).number == 1
