"""Credentials in headers: read from the environment, sent to the server, and found nowhere else:
not in the run folder, not in Ray's session folder (worker logs included), not in what the
commands print. Also: a normal run prints none of Ray's own noise."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml
from conftest import read_rows, write_jsonl

from sft_ray.devserver import MockConfig, MockServer

AZURE_KEY = "azk-DO-NOT-LEAK-7f3e9a"
BEARER_KEY = "sk-DO-NOT-LEAK-b41c"
ROOT = Path(__file__).resolve().parents[2]


def _grep_tree(root: Path, needles: list[bytes]) -> tuple[list[str], int]:
    """Files under root that contain any needle, and how many files were read."""
    hits, read = [], 0
    for dirpath, _, files in os.walk(root):
        for f in files:
            p = Path(dirpath) / f
            if not p.is_file() or p.is_symlink():
                continue  # sockets, fifos
            try:
                data = p.read_bytes()
            except OSError:
                continue
            read += 1
            if any(n in data for n in needles):
                hits.append(str(p))
    return hits, read


def test_header_secrets_reach_the_server_and_nothing_else(tmp_path):
    rows = [{"prompt": f"\\boxed{{{i}}}", "expected_answer": str(i)} for i in range(20)]
    rows.append({"prompt": "careless server [[echo_auth]]", "expected_answer": "x"})
    inp = write_jsonl(tmp_path / "in.jsonl", rows)
    # A short private temp dir for the job's own local Ray cluster (socket paths stay short),
    # so that its whole session folder, worker logs included, can be searched afterwards.
    ray_tmp = tempfile.mkdtemp(prefix="sr-sec-", dir="/tmp")
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(RAY_TMPDIR=ray_tmp, SFT_AZURE_KEY=AZURE_KEY, SFT_BEARER_KEY=BEARER_KEY,
               PYTHONPATH=str(ROOT) + os.pathsep + env.get("PYTHONPATH", ""))
    try:
        with MockServer(MockConfig()) as server:
            cfg = {"input": str(inp), "output": str(tmp_path / "run"),
                   "model": {"name": "mock", "base_url": server.url, "api_key_env": "SFT_BEARER_KEY",
                             "extra_headers": {"x-team": "research"},
                             "extra_headers_env": {"api-key": "SFT_AZURE_KEY"},
                             "timeout_s": 5, "base_retry_wait_s": 0.01},
                   "num_samples_in_parallel": 8, "verifier": {"type": "math"}, "max_error_fraction": 0.5,
                   "resources": {"ray_address": "local"}}
            path = tmp_path / "job.yaml"
            path.write_text(yaml.safe_dump(cfg))
            cli = [sys.executable, "-m", "sft_ray.cli"]
            val = subprocess.run(cli + ["validate", str(path)], env=env, capture_output=True, text=True, timeout=120)
            run = subprocess.run(cli + ["run", str(path)], env=env, capture_output=True, text=True, timeout=300,
                                 cwd=tmp_path)
            assert run.returncode == 0, run.stdout + run.stderr
            assert server.state.api_key_headers == {AZURE_KEY}  # the secret did reach the server
            assert server.state.auth_headers == {f"Bearer {BEARER_KEY}"}
        printed = val.stdout + val.stderr + run.stdout + run.stderr
        # the last line, not `"ok" in stdout`: "config ok: ..." heads the output whatever the problems
        assert val.returncode == 0 and val.stdout.splitlines()[-1] == "ok" and not val.stderr, printed
        for key in (AZURE_KEY, BEARER_KEY):
            assert key not in printed
        # The careless server echoed both keys into its error body; the row keeps it, redacted.
        [failed] = read_rows(tmp_path / "run" / "failed")
        assert failed["error"]["type"] == "auth_error" and failed["error"]["message"].count("***") == 2
        needles = [AZURE_KEY.encode(), BEARER_KEY.encode()]
        hits, n_run = _grep_tree(tmp_path / "run", needles)
        assert not hits and n_run >= 4, hits  # run.json, rollouts, failed, train, stats.json
        sessions = list(Path(ray_tmp, "ray").glob("session_2*"))
        assert len(sessions) == 1, sessions
        logs = list((sessions[0] / "logs").glob("worker-*.out")) + list((sessions[0] / "logs").glob("*.log"))
        assert logs, "the job's Ray session left no logs to search"
        hits, n_ray = _grep_tree(sessions[0], needles)
        assert not hits and n_ray >= 10, hits
        # No Ray noise on a normal run (issue 9, item 16): the constructor-arguments false
        # alarm and Ray Data's INFO lines are silenced at their source.
        assert "core_worker.cc" not in printed and "constructor arguments" not in printed, printed
        assert "streaming_executor" not in printed, printed
        # Nor the GCS's "Failed to kill actor NIL_ID" (printed in about one run in two while the
        # notice's throwaway actor was killed as it was being placed; it is never placed now).
        assert "gcs_actor_scheduler" not in printed and "Failed to kill actor" not in printed, printed
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)


def test_long_and_partial_keys_are_redacted_before_any_cut(tmp_path, monkeypatch, capfd, ray_cluster):
    """Issue 22 item 6: the error body was cut to 300 characters before redaction, so a long
    key, cut, was not matched (82 characters of a 164-character key reached failed/). Keys
    longer than every cut, and servers that quote only a prefix of a key."""
    import random
    import string

    from conftest import make_config

    from sft_ray.job import run

    rng = random.Random(7)
    alphabet = string.ascii_letters + string.digits
    bearer = "sk-" + "".join(rng.choice(alphabet) for _ in range(5000))  # longer than any cut or cap
    azure = "az-" + "".join(rng.choice(alphabet) for _ in range(161))  # 164 characters
    monkeypatch.setenv("SFT_LONG_BEARER", bearer)
    monkeypatch.setenv("SFT_LONG_AZURE", azure)
    rows = [{"id": "echo", "prompt": "careless [[echo_auth]]"},
            {"id": "prefix", "prompt": "careless [[echo_key_prefix]]"},
            {"id": "ok", "prompt": "fine"}]
    printed = []
    with MockServer(MockConfig()) as server:
        inp = write_jsonl(tmp_path / "in.jsonl", rows)
        cfg = make_config(tmp_path, server, inp, "model.api_key_env=SFT_LONG_BEARER",
                          "model.extra_headers_env.api-key=SFT_LONG_AZURE", "verifier.type=none",
                          "max_error_fraction=1")
        run(cfg, say=printed.append)
        assert server.state.api_key_headers == {azure}  # the keys did reach the server
    failed = {r["id"]: r for r in read_rows(tmp_path / "run" / "failed")}
    assert failed["echo"]["error"]["type"] == "auth_error" and "***" in failed["echo"]["error"]["message"]
    assert "Incorrect API key provided: ***" in failed["prefix"]["error"]["message"]
    out, err = capfd.readouterr()
    texts = ["\n".join(printed), out, err]
    for dirpath, _, files in os.walk(tmp_path / "run"):
        texts += [(Path(dirpath) / f).read_bytes().decode("utf-8", "replace") for f in files]
    for key in (bearer, azure):
        grams = {key[i:i + 20] for i in range(len(key) - 19)}  # no 20 characters of a key, anywhere
        for text in texts:
            assert not any(text[i:i + 20] in grams for i in range(len(text) - 19))
