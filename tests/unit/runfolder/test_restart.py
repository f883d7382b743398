"""`--restart` empties the run folder of everything a run wrote: what it deletes is derived from the
run folder's layout (sft_ray/runfolder/layout.py), so an output added there cannot be forgotten."""

from __future__ import annotations

import json
from pathlib import Path

from sft_ray.configload import load_config
from sft_ray.runfolder import layout
from sft_ray.runfolder.manifest import prepare_run_dir
from tests.conftest import write_jsonl


def _old_run(tmp_path: Path) -> tuple[object, Path]:
    inp = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "p", "expected_answer": "x"}])
    cfg = load_config(None, [f"input={inp}", f"output={tmp_path / 'run'}", "model.name=mock"])
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / layout.MANIFEST).write_text(json.dumps({"fingerprint": {"old": True}, "sessions": [{}]}))
    return cfg, run_dir


def test_restart_deletes_never_passed_and_the_html_report_of_the_replaced_run(tmp_path):
    cfg, run_dir = _old_run(tmp_path)
    for name in ("never_passed.jsonl", "report.html", "stats.json", "_SUCCESS"):
        (run_dir / name).write_text("old\n")
    manifest = prepare_run_dir(cfg, restart=True, input_digests={})
    assert manifest["sessions"] == [] and "old" not in manifest["fingerprint"]
    assert not (run_dir / "never_passed.jsonl").exists()
    assert not (run_dir / "report.html").exists()
    assert not (run_dir / "stats.json").exists() and not (run_dir / "_SUCCESS").exists()


def test_restart_deletes_every_output_the_layout_declares_and_keeps_the_lock_and_foreign_files(tmp_path):
    cfg, run_dir = _old_run(tmp_path)
    outputs = layout.run_outputs()
    assert layout.NEVER_PASSED in outputs and layout.REPORT_HTML in outputs and layout.VALIDATION in outputs
    assert layout.LOCK not in outputs and outputs[-1] == layout.MANIFEST  # run.json goes last
    for name in outputs:
        if name == layout.MANIFEST:
            continue
        if "." in name or name.startswith("_"):
            (run_dir / name).write_text("old\n")
        else:
            (run_dir / name).mkdir()
            (run_dir / name / "part-00000.jsonl").write_text("old\n")
    (run_dir / layout.LOCK).write_text("held by the restarting run\n")
    (run_dir / "notes.txt").write_text("the user's own file\n")
    prepare_run_dir(cfg, restart=True, input_digests={})
    left = sorted(p.name for p in run_dir.iterdir())
    assert left == sorted([layout.LOCK, "notes.txt"])
