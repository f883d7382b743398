"""Finalize's worker processes (spawned for real) against one process, on a run cut into many
byte ranges and buckets. (Finalize's passes in one process: tests/unit/finalize/test_passes.py.)"""

from __future__ import annotations

import json

import pytest
from handmade import make_run, train_rows

from sft_ray.finalize import passes as fin
from sft_ray.finalize.passes import finalize

TRAIN = {"rows_per_shard": 100, "format": "jsonl", "include_fields": ["id", "sample_index", "reward"]}


@pytest.mark.parametrize("curated", [True, False], ids=["prompt-rules", "kept-from-the-scan"])
def test_worker_processes_give_the_result_of_one_process(tmp_path, monkeypatch, curated):
    """Files cut into many byte ranges, many prompt and shuffle buckets, two worker processes (spawned
    for real): train/, validation/ and the statistics are exactly those of a single process. With
    no prompt rule, rows go to the shuffle from the scan; with one, from the per-prompt pass."""
    runs = {}
    for workers in (1, 2):
        run = tmp_path / f"w{workers}"
        make_run(run, n=3000, failed=5)
        with open(run / "rollouts" / "part-000-00001.jsonl", "a") as f:
            f.write('{"id": "torn", "rew')  # a torn last line
        with open(run / "failed" / "part-000-00000.jsonl", "a") as f:  # failed once, succeeded on a rerun
            f.write(json.dumps({"id": "r0", "sample_index": 0, "error": {"type": "timeout"}}) + "\n")
        monkeypatch.setattr(fin, "PIECE_BYTES", 20_000)
        monkeypatch.setattr(fin, "GROUP_BUCKET_BYTES", 50_000)
        monkeypatch.setattr(fin, "BUCKET_BYTES", 100_000)
        flt = {"min_reward": 0.25, "dedup": "exact" if curated else "none"}
        train = {**TRAIN, "max_per_prompt": 1 if curated else None, "validation_fraction": 0.2}
        stats = finalize(str(run), flt, 7, train, workers=workers)
        val = [json.loads(line) for f in sorted((run / "validation").glob("*.jsonl"))
               for line in f.read_text().splitlines()]
        runs[workers] = (stats, train_rows(run), val)
    (one, train1, val1), (two, train2, val2) = runs[1], runs[2]
    files = sorted((tmp_path / "w1" / "rollouts").glob("*.jsonl"))
    assert len(fin._pieces([str(f) for f in files], [f.stat().st_size for f in files], 20_000)) > 2 * len(files)
    assert one == two and train1 == train2 and val1 == val2
    assert one["failed"] == 5 and one["torn_lines"] == 1 and one["succeeded"] == 3000
    assert len(train1) == one["train_rows"] > 0 and len(val1) == one["validation"] > 0
    assert one["prompts"]["count"] == 1500
    assert (one["drops_by_reason"].get("over_max_per_prompt", 0) > 0) == curated
