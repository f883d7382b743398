"""`sft-ray filter` and `sft-ray stats` re-cut a finished run without a model, in a process of
their own, with every option. (Curation itself, in process: tests/unit/finalize/test_curate.py.)"""

from __future__ import annotations

import json
import subprocess
import sys

from handmade import episodes, make_run_folder, prompt_samples, read_rows


def cli(*args):
    return subprocess.run([sys.executable, "-m", "sft_ray.cli", *args], capture_output=True, text=True, timeout=300)


def test_filter_and_stats_recut_a_run_with_every_option(tmp_path):
    run = make_run_folder(tmp_path, prompt_samples(n_prompts=40, n=4) + episodes())
    out = cli("filter", str(run), "--min-reward", "0.5", "--max-per-prompt", "1", "--dedup", "exact",
              "--validation-fraction", "0.2", "--format", "openai", "--file-format", "parquet", "--seed", "4",
              "filter.drop_tool_errors=true", "train.reasoning=drop", "train.include_fields=[id,reward]")
    assert out.returncode == 0, out.stderr
    saved = json.loads((run / "stats.json").read_text())
    assert saved["filter"] == {"min_reward": 0.5, "drop_tool_errors": True, "dedup": "exact"}
    assert saved["train"] == {"format": "openai", "file_format": "parquet", "rows_per_shard": 50,
                              "max_per_prompt": 1, "validation_fraction": 0.2, "reasoning": "drop"}
    train, val = read_rows(run / "train"), read_rows(run / "validation")
    ids = [r["id"] for r in train + val]
    assert len(ids) == len(set(ids)) and min(r["reward"] for r in train + val) >= 0.5  # one per prompt
    assert saved["drops_by_reason"]["tool_errors"] == 2 and "over_max_per_prompt" in saved["drops_by_reason"]
    manifest = json.loads((run / "run.json").read_text())
    assert manifest["config"]["train"]["max_per_prompt"] == 1 and manifest["config"]["shuffle"] == {"seed": 4}
    # stats re-cuts without writing: same numbers, train/ untouched
    before = sorted(p.name for p in (run / "train").iterdir())
    out = cli("stats", str(run), "--max-per-prompt", "2")
    assert out.returncode == 0, out.stderr
    assert "over_max_per_prompt=" in out.stdout and "pass@k" in out.stdout
    assert sorted(p.name for p in (run / "train").iterdir()) == before
    assert json.loads((run / "stats.json").read_text()) == saved
    bad = cli("filter", str(run), "model.name=x")
    assert bad.returncode == 1 and "only filter.*, train.*, shuffle.* and preference.*" in bad.stderr, bad.stderr
    # Before: `rc != 0 and "filter.dedup" in err or "dedup" in err` held on pydantic's own text (which
    # named `dedup` alone and sent the user to errors.pydantic.dev).
    bad = cli("filter", str(run), "--dedup", "fuzzy")
    assert bad.returncode == 1, bad.stderr
    assert "filter.dedup: Input should be 'none', 'exact' or 'near' (got 'fuzzy')" in bad.stderr, bad.stderr
    assert "pydantic" not in bad.stderr and "Traceback" not in bad.stderr, bad.stderr
    assert sorted(p.name for p in (run / "train").iterdir()) == before  # a refused re-cut writes nothing
