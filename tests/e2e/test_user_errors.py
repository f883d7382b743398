"""A careless user's mistakes get one clear line and a non-zero exit, never a traceback or a
run that reports success over nothing (issue 22)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import write_jsonl

ROOT = Path(__file__).resolve().parents[2]


def sft_ray(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sft_ray.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300, env={**__import__("os").environ, "PYTHONPATH": str(ROOT)})


def _config(tmp_path: Path) -> Path:
    # A server nobody listens on: these runs must stop before any request.
    cfg = tmp_path / "c.yaml"
    cfg.write_text('model: {name: m, base_url: "http://127.0.0.1:9/v1"}\n')
    return cfg


@pytest.mark.parametrize("output, reason", [
    ("afile/out", "afile is a file, not a folder"),
    ("afile", "afile is a file, not a folder"),
    ("/proc/sft-ray-out", "no folder can be made in /proc"),
])
def test_output_path_that_cannot_be_a_folder_is_one_line(tmp_path, output, reason):
    (tmp_path / "afile").write_text("not a folder\n")
    write_jsonl(tmp_path / "in.jsonl", [{"prompt": "p", "expected_answer": "a"}])
    proc = sft_ray("run", str(_config(tmp_path)), "input=in.jsonl", f"output={output}", cwd=tmp_path)
    assert proc.returncode == 1
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr + proc.stdout, proc.stderr
    assert proc.stderr.startswith(f"error: output {output}: cannot be a run folder (") and reason in proc.stderr
    assert (tmp_path / "afile").read_text() == "not a folder\n"


@pytest.mark.parametrize("contents", ["", "\n  \n\t\n"])
def test_empty_or_blank_input_is_refused_unless_allowed(tmp_path, contents):
    (tmp_path / "a.jsonl").write_text(contents)
    (tmp_path / "b.jsonl").write_text("\n")
    cfg = _config(tmp_path)
    proc = sft_ray("run", str(cfg), f"input={tmp_path}/*.jsonl", "output=run", cwd=tmp_path)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "input has no rows" in proc.stderr and "read.allow_empty=true" in proc.stderr
    assert f"{tmp_path}/a.jsonl" in proc.stderr and f"{tmp_path}/b.jsonl" in proc.stderr
    assert not (tmp_path / "run").exists()  # nothing written, no _SUCCESS over nothing

    proc = sft_ray("run", str(cfg), f"input={tmp_path}/*.jsonl", "output=run", "read.allow_empty=true", cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (tmp_path / "run" / "_SUCCESS").exists()
    assert json.loads((tmp_path / "run" / "stats.json").read_text())["expected"] == 0


def test_input_whose_lines_are_all_skipped_is_refused(tmp_path):
    write_jsonl(tmp_path / "in.jsonl", ['{"prompt": ', "not json"])
    proc = sft_ray("run", str(_config(tmp_path)), "input=in.jsonl", "output=run", "read.skip_bad_lines=true",
                   cwd=tmp_path)
    assert proc.returncode == 2 and "all 2 non-blank line(s) are bad" in proc.stderr, proc.stderr


def test_validate_reports_an_empty_input_too(tmp_path):
    (tmp_path / "a.jsonl").write_text("\n\n")
    proc = sft_ray("validate", str(_config(tmp_path)), "input=a.jsonl", "output=run", cwd=tmp_path)
    assert proc.returncode == 2 and "input has no rows" in proc.stderr, proc.stdout + proc.stderr
    ok = sft_ray("validate", str(_config(tmp_path)), "input=a.jsonl", "output=run", "read.allow_empty=true",
                 cwd=tmp_path)
    assert "input has no rows" not in ok.stderr
    (tmp_path / "b.jsonl").write_text("\n" * 150 + '{"prompt": "late", "expected_answer": "x"}\n')
    late = sft_ray("validate", str(_config(tmp_path)), "input=b.jsonl", "output=run", cwd=tmp_path)
    assert "input has no rows" not in late.stderr  # only the first 100 lines were read: not known to be empty
