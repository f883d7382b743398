"""The package's layering is a checked contract: `lint-imports` reads [tool.importlinter] in
pyproject.toml (layers from the CLI down to the schema, phase 1's stages independent of phase 2,
no import cycles, function-level imports included) and must pass on this checkout."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _lint_imports(cwd: Path, extra_path: str = "") -> subprocess.CompletedProcess:
    exe = shutil.which("lint-imports") or str(Path(sys.executable).parent / "lint-imports")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (extra_path, str(ROOT)) if p)}
    return subprocess.run([exe, "--config", str(ROOT / "pyproject.toml"), "--no-cache"], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def test_the_layers_hold():
    out = _lint_imports(ROOT)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
    assert "0 broken" in out.stdout


def test_an_import_up_the_layers_is_caught(tmp_path):
    """A copy of the package in which the run folder imports the job (a function-level import,
    the kind that used to tie phase 1 to phase 2) breaks the contract."""
    copy = tmp_path / "sft_ray"
    shutil.copytree(ROOT / "sft_ray", copy, ignore=shutil.ignore_patterns("__pycache__"))
    state = copy / "runfolder" / "state.py"
    state.write_text(state.read_text() + "\n\ndef _reach_up():\n    from sft_ray.job import run\n\n    return run\n")
    out = _lint_imports(tmp_path, str(tmp_path))
    assert out.returncode != 0 and "sft_ray.runfolder.state -> sft_ray.job" in out.stdout, out.stdout[-4000:]
