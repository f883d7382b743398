"""One run per run folder (issue 9.8): a lock file locally, a conditional-write lease on S3."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import pytest
from test_s3 import moto_url, s3  # noqa: F401, F811  (the moto S3 fixtures)

from sft_ray.runfolder import lock as lockmod
from sft_ray.runfolder.lock import LockError, RunLock


def test_second_run_is_refused_naming_the_holder_and_the_lock_is_released(tmp_path):
    run_dir = str(tmp_path / "run")
    with RunLock(run_dir).acquire():
        info = json.loads((tmp_path / "run" / "run.lock").read_text())
        assert info["pid"] == os.getpid() and info["host"] == socket.gethostname()
        with pytest.raises(LockError) as e:
            RunLock(run_dir).acquire()
        assert f"pid {os.getpid()} on host {socket.gethostname()}" in str(e.value)
    assert not (tmp_path / "run" / "run.lock").exists()
    RunLock(run_dir).acquire().release()  # free again


def test_lock_of_a_dead_process_on_this_host_is_stale(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "run.lock").write_text(json.dumps(
        {"pid": dead.pid, "host": socket.gethostname(), "started_at": time.time() - 5}))
    with RunLock(str(tmp_path / "run")).acquire():
        assert json.loads((tmp_path / "run" / "run.lock").read_text())["pid"] == os.getpid()


def test_lock_held_by_a_live_process_or_another_host_is_not_taken(tmp_path):
    (tmp_path / "run").mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (tmp_path / "run" / "run.lock").write_text(json.dumps(
            {"pid": holder.pid, "host": socket.gethostname(), "started_at": time.time()}))
        with pytest.raises(LockError, match=f"pid {holder.pid}"):
            RunLock(str(tmp_path / "run")).acquire()
    finally:
        holder.kill()
        holder.wait()
    (tmp_path / "run" / "run.lock").write_text(json.dumps({"pid": 1, "host": "elsewhere", "started_at": 0}))
    with pytest.raises(LockError, match="host elsewhere.*delete"):
        RunLock(str(tmp_path / "run")).acquire()


def test_run_refuses_a_folder_in_use(tmp_path):
    from sft_ray.configload import load_config
    from sft_ray.job import RunError, run

    inp = tmp_path / "in.jsonl"
    inp.write_text('{"prompt": "p"}\n')
    cfg = load_config(None, [f"input={inp}", f"output={tmp_path / 'run'}", "model.name=m"])
    with RunLock(cfg.output).acquire():
        with pytest.raises(RunError, match="in use by another sft-ray run"):
            run(cfg, say=lambda s: None)
        assert not (tmp_path / "run" / "run.json").exists()  # nothing touched


def test_s3_lease_is_conditional_and_a_stale_one_is_taken_over(s3):  # noqa: F811
    run_dir = f"s3://{s3.bucket}/runs/r"
    first = RunLock(run_dir).acquire()
    body = json.loads(s3.get_object(Bucket=s3.bucket, Key="runs/r/run.lock")["Body"].read())
    assert body["pid"] == os.getpid()
    with pytest.raises(LockError, match="in use by another sft-ray run"):
        RunLock(run_dir).acquire()
    first.release()
    assert "Contents" not in s3.list_objects_v2(Bucket=s3.bucket, Prefix="runs/r/run.lock")
    # A lease its holder stopped renewing (killed driver) expires.
    s3.put_object(Bucket=s3.bucket, Key="runs/r/run.lock", Body=json.dumps(
        {"pid": 123, "host": "gone", "started_at": 0, "renewed_at": time.time() - lockmod.LEASE_TTL_S - 1}))
    with RunLock(run_dir).acquire():
        body = json.loads(s3.get_object(Bucket=s3.bucket, Key="runs/r/run.lock")["Body"].read())
        assert body["pid"] == os.getpid()
