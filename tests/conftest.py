"""Shared fixtures: a real local Ray cluster and a real HTTP mock server on 127.0.0.1."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

import pytest

from sft_ray.configload import load_config
from sft_ray.devserver import MockConfig, MockServer
from sft_ray.scoring import score_rollouts

# The suite runs on two processes (pytest-xdist: `-n 2 --dist loadfile` in pyproject.toml's
# addopts): on one, a core sat idle much of the time (a test waiting on a server, a sandbox, a
# killed run). Each module runs whole on one process, in order, so what it shares (a module's
# fixture: an engine, a cluster) starts once. The longest module goes first, so that it does not
# start last and run alone at the end.
LONGEST_MODULE = "test_vllm.py"


def pytest_collection_modifyitems(config, items):
    items.sort(key=lambda item: item.path.name != LONGEST_MODULE)  # stable: the rest as collected


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray cluster for the whole test session (starting one costs seconds)."""
    import ray

    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    # Read tasks on workers take S3 credentials from their own environment (the endpoint
    # travels with the filesystem the driver resolved): give them moto's fake ones, and no
    # instance-metadata lookups, so tests/e2e/test_s3.py works in whatever order tests run.
    fake_aws = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                "AWS_EC2_METADATA_DISABLED": "true"}
    # Set for the node's processes only (workers inherit the raylet's environment), not as a
    # runtime_env: a worker with a runtime_env starts through Ray's setup_worker.py, a second
    # Python start-up for each of the hundreds of workers the suite's runs start.
    with pytest.MonkeyPatch.context() as env:  # the driver's own environment restored after
        for k, v in fake_aws.items():
            env.setenv(k, v)
        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=True, configure_logging=False)
    yield ray
    ray.shutdown()


@pytest.fixture
def mock_server():
    with MockServer(MockConfig(retry_after_s=0.05, hang_s=3.0)) as server:
        yield server


def score_one(verifier, rollout: dict) -> dict:
    """Score one successful rollout in place, as the score stage does (outside an event loop)."""
    asyncio.run(score_rollouts(verifier, [rollout]))
    return rollout


def write_jsonl(path: Path, rows: list) -> Path:
    with open(path, "w") as f:
        for r in rows:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return path


def make_config(tmp_path: Path, server: MockServer, input_path: Path, *overrides: str):
    base = [f"input={input_path}", f"output={tmp_path / 'run'}", "model.name=mock",
            f"model.base_url={server.url}", "model.timeout_s=1", "model.base_retry_wait_s=0.01",
            "model.max_retry_wait_s=0.2", "num_samples_in_parallel=16"]
    return load_config(None, base + list(overrides))


def read_rows(folder: Path) -> list[dict]:
    rows = []
    for f in sorted(folder.glob("*.jsonl")):
        rows += [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
    return rows


def count_rows(folder: Path) -> int:
    """Lines written so far in a run's rollouts/ (or failed/) folder."""
    return sum(f.read_bytes().count(b"\n") for f in folder.glob("*.jsonl")) if folder.exists() else 0


def find_process(fragment: str, other_than: int | None = None):
    """A live process of this test process's making whose name or command line contains
    ``fragment`` (psutil), or None. Of its making: a descendant (the session cluster's workers and
    what they start, a CLI run and its Ray) or an orphan (one whose parent died, as a killed run's
    leave behind); not another test process's, when the suite runs on several (pytest-xdist)."""
    import psutil

    mine = {p.pid for p in psutil.Process().children(recursive=True)}
    for p in psutil.process_iter(["name", "cmdline", "ppid"]):
        if p.pid not in mine and p.info["ppid"] != 1:
            continue
        label = (p.info["name"] or "") + " " + " ".join(p.info["cmdline"] or [])
        if fragment in label and p.pid != other_than:
            return p
    return None


def start_run(cfg):
    """`job.run(cfg)` in a thread, so a test can hurt the job while it runs.
    Returns the thread and a dict that receives the exit code as "code"."""
    import threading

    from sft_ray.job import run

    result: dict = {}
    t = threading.Thread(target=lambda: result.setdefault("code", run(cfg, say=lambda s: None)))
    t.start()
    return t, result
