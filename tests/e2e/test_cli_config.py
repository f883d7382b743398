"""Config validated at the edge, through the CLI in a process of its own: a bad config fails before
Ray starts, naming the field; `--help` and the driver's modules import nothing heavy.
(Loading and overrides in process: tests/unit/test_config.py.)"""

from __future__ import annotations

import re
import subprocess
import sys


def test_cli_rejects_bad_config_before_ray(tmp_path):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("input: a.jsonl\noutput: out\nmodle: {name: m}\n")
    proc = subprocess.run([sys.executable, "-m", "sft_ray.cli", "run", str(cfg_file)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    assert "modle: unknown key" in proc.stderr
    assert "ray" not in proc.stderr.lower().replace("sft-ray", "").replace("sft_ray", "")


def test_help_does_not_import_heavy_modules():
    code = ("import sys\nfrom sft_ray.cli import app\n"
            "try:\n    app(['--help'])\nexcept SystemExit:\n    pass\n"
            "heavy = [m for m in ('ray', 'vllm', 'torch', 'transformers', 'aiohttp', 'pyarrow') if m in sys.modules]\n"
            "print('HEAVY', heavy)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert "HEAVY []" in proc.stdout, proc.stdout + proc.stderr
    # each command is a row of the listing (not `"run" in stdout`, which any word with "run" in it meets)
    listed = set(re.findall(r"^\W*([a-z][a-z-]+)\s{2,}\S", proc.stdout, re.M))
    assert {"run", "validate", "stats", "filter", "rescore", "models", "serve-mock"} <= listed, proc.stdout


def test_driver_side_modules_do_not_import_vllm_or_torch():
    code = ("import sys\n"
            "import sft_ray.job, sft_ray.driver, sft_ray.stages.generate, sft_ray.stages.score, sft_ray.scoring\n"
            "import sft_ray.backends.vllm\n"
            "import sft_ray.models, sft_ray.backends.openai\n"
            "from sft_ray.backends import get_backend\n"
            "get_backend('vllm')\n"
            "print('HEAVY', [m for m in ('vllm', 'torch', 'transformers') if m in sys.modules])\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "HEAVY []" in proc.stdout, proc.stdout + proc.stderr


def test_validate_command_reports_bad_rows_and_verifier(tmp_path):
    inp = tmp_path / "in.jsonl"
    inp.write_text('{"prompt": "a", "expected_answer": "a"}\n{"prompt": "b"\n{"prompt": "c"}\n')
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"input: {inp}\noutput: {tmp_path / 'out'}\nmodel: {{name: m, base_url: 'http://127.0.0.1:1/v1'}}\n"
                   "verifier: {type: python, function: 'no_such_mod_q:f'}\n")
    proc = subprocess.run([sys.executable, "-m", "sft_ray.cli", "validate", str(cfg)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert f"{inp}:2: not valid JSON" in proc.stderr
    assert f"{inp}:3: field expected_answer: missing" not in proc.stderr  # python verifier needs none
    assert "verifier: verifier.function: cannot import 'no_such_mod_q'" in proc.stderr
    assert not (tmp_path / "out").exists()  # validate writes nothing
