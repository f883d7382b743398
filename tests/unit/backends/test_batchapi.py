"""The Batch API's custom_id: every sample key round-trips, and a foreign id is no key."""

from __future__ import annotations

from sft_ray.backends.batchapi import custom_id, parse_custom_id


def test_custom_id_round_trips_any_id():
    for rid in ["r1", "3:7", "a\nb", "ü 🙂", ":", "", "x" * 500, "0:0:0"]:
        for k in (0, 7, 123456):
            assert parse_custom_id(custom_id(rid, k)) == (rid, k)
    for foreign in [None, 3, "abc", ":x", "-1:x", "1e3:x", "12345678901:x"]:
        assert parse_custom_id(foreign) is None
