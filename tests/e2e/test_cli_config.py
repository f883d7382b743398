"""Config validated at the edge, through the CLI in a process of its own: a bad config fails before
Ray starts, naming the field; `--help` and the driver's modules import nothing heavy.
(Loading and overrides in process: tests/unit/test_config.py.)"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import read_rows, write_jsonl

from sft_ray.devserver import MockConfig, MockServer

ROOT = Path(__file__).resolve().parents[2]


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


@pytest.mark.slow
def test_a_ray_that_does_not_start_is_one_error_line_and_a_rerun_goes_on(tmp_path):
    """Ray's failure to start or connect ("The current node timed out during startup" on a loaded
    machine, a cluster that is down) is one line of ours with advice, not Ray's traceback; the run
    exits non-zero and the same command, rerun, does the whole job."""
    with socket.socket() as s:  # a port where nothing listens
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    inp = write_jsonl(tmp_path / "in.jsonl", [{"prompt": f"p{i}", "expected_answer": f"p{i}"} for i in range(4)])
    with MockServer(MockConfig()) as server:
        config = {"input": str(inp), "output": str(tmp_path / "run"),
                  "model": {"name": "mock", "base_url": server.url}, "verifier": {"type": "exact_match"}}
        path = tmp_path / "config.yaml"
        path.write_text(json.dumps(config))  # JSON is YAML
        # Ray waits ~38 s on an unreachable address (its 30 s py_gcs_connect_timeout_s among them): 2 s here.
        env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_ADDRESS": f"127.0.0.1:{port}",
               "RAY_gcs_server_port_wait_time_s": "1", "RAY_gcs_rpc_server_connect_timeout_s": "2",
               "RAY_py_gcs_connect_timeout_s": "2"}
        cmd = [sys.executable, "-m", "sft_ray.cli", "run", str(path)]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
        said = proc.stdout + proc.stderr
        assert proc.returncode == 1, said[-3000:]
        assert "Traceback" not in said, said[-3000:]
        [line] = [x for x in proc.stderr.splitlines() if x.startswith("error:")]
        assert line.startswith(f"error: could not connect to the Ray cluster at 127.0.0.1:{port}: "), said[-3000:]
        assert "nothing was lost" in proc.stderr and "RAY_ADDRESS" in proc.stderr
        assert server.state.requests == 0
        for k in ("RAY_ADDRESS", "RAY_gcs_server_port_wait_time_s", "RAY_gcs_rpc_server_connect_timeout_s",
                  "RAY_py_gcs_connect_timeout_s"):
            env.pop(k)
        for _ in range(3):  # on a loaded machine the local Ray may time out too: that same line, then rerun
            again = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
            if again.returncode != 1 or "error: Ray did not start on this machine: " not in again.stderr:
                break
            assert "Traceback" not in again.stdout + again.stderr
        assert again.returncode == 0, (again.stdout + again.stderr)[-3000:]
    assert len(read_rows(tmp_path / "run" / "rollouts")) == 4
