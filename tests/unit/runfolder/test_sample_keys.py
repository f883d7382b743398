"""A sample key's string and JSON forms (sft_ray/runfolder/layout.py): each round-trips any row id,
hostile ones included, and stays the form old run folders and providers hold; a foreign value is no key."""

from __future__ import annotations

import re

import orjson

from sft_ray.runfolder.layout import (
    anthropic_custom_id,
    batch_custom_id,
    episode_id,
    key_from_json,
    key_to_json,
    parse_anthropic_custom_id,
    parse_batch_custom_id,
    parse_episode_id,
    parse_request_id,
    request_id,
)

HOSTILE = ["r1", "", "#", "a#b", "1#2", "3:7", ":", "0:0:0", ".", "a.b", "1.2", "a\nb", "ü 🙂", "==",
           "0_0-0", "x" * 500, "#:." * 400, "🙂" * 100]
INDEXES = (0, 7, 123456)


def test_json_form_round_trips_and_is_a_list():
    for rid in HOSTILE:
        for k in INDEXES:
            as_json = key_to_json((rid, k))
            assert orjson.dumps(as_json) == orjson.dumps([rid, k])  # batches.jsonl / run.json as written before
            assert key_from_json(orjson.loads(orjson.dumps(as_json))) == (rid, k)


def test_batch_custom_id_round_trips_and_keeps_its_form():
    assert batch_custom_id(("p3", 2)) == "2:p3"  # what providers and old batches.jsonl runs hold
    for rid in HOSTILE:
        for k in INDEXES:
            assert parse_batch_custom_id(batch_custom_id((rid, k))) == (rid, k)
    for foreign in [None, 3, "abc", ":x", "-1:x", "1e3:x", "12345678901:x"]:
        assert parse_batch_custom_id(foreign) is None


def test_anthropic_custom_id_fits_the_pattern_and_round_trips():
    assert anthropic_custom_id(("r1", 0)) == "0_cjE"  # the form already sent to Anthropic
    hashed: dict = {}
    for rid in HOSTILE:
        for k in INDEXES:
            cid = anthropic_custom_id((rid, k))
            assert re.fullmatch(r"[a-zA-Z0-9_-]{1,64}", cid), cid
            if "_" not in cid:
                hashed[cid] = (rid, k)
            assert parse_anthropic_custom_id(cid, hashed) == (rid, k)
    assert any("-" in c for c in hashed)  # long and empty ids took the hashed form
    for foreign in [None, 3, "abc", "_x", "x_abc", "1_!!", "12345678901_YQ", "7-deadbeef"]:
        assert parse_anthropic_custom_id(foreign, hashed) is None


def test_request_and_episode_ids_round_trip_and_keep_their_forms():
    assert request_id(("row", 3)) == "row#3"  # vLLM's request id (logs)
    assert episode_id(("row", 3)) == "row.3"  # NeMo Gym's rollout id
    for rid in HOSTILE:
        for k in INDEXES:
            assert parse_request_id(request_id((rid, k))) == (rid, k)
            assert parse_episode_id(episode_id((rid, k))) == (rid, k)
    for foreign in ["", "abc", "a#", "a#b", "a#-1"]:
        assert parse_request_id(foreign) is None
    for foreign in ["", "abc", "a.", "a.b", "a.-1"]:
        assert parse_episode_id(foreign) is None
