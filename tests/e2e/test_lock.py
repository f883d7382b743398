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


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sft_ray.cli", *args], capture_output=True, text=True, timeout=120)


def test_filter_refuses_while_a_run_holds_the_lock_and_its_recut_is_recorded(tmp_path):
    """`sft-ray filter` rewrites train/, stats.json and run.json: never under a live run (issue 22.8)."""
    import hashlib

    from sft_ray.configload import load_config
    from sft_ray.job import finalize_run
    from sft_ray.runfolder.manifest import prepare_run_dir, save_manifest

    run_dir = tmp_path / "run"
    cfg = load_config(None, [f"input={tmp_path / 'in.jsonl'}", f"output={run_dir}", "model.name=m"])
    manifest = prepare_run_dir(cfg, False, {})
    manifest["sessions"].append({"session": 0})  # as a run records its session before it writes part-000-*
    (run_dir / "rollouts").mkdir()
    (run_dir / "rollouts" / "part-000-00000.jsonl").write_text("".join(json.dumps(
        {"id": f"p{i}", "sample_index": 0, "messages": [{"role": "user", "content": f"q{i}"},
                                                         {"role": "assistant", "content": f"a{i}"}],
         "response": f"a{i}", "reward": i / 10, "error": None, "finish_reason": "stop",
         "usage": {"input_tokens": 1, "output_tokens": 1}}) + "\n" for i in range(10)))
    save_manifest(str(run_dir), manifest)
    finalize_run(str(run_dir), cfg.filter.model_dump(), 0, cfg.train.model_dump(), manifest, lambda s: None)

    def outputs() -> dict[str, str]:
        return {str(p.relative_to(run_dir)): hashlib.sha256(p.read_bytes()).hexdigest()
                for p in sorted(run_dir.rglob("*")) if p.is_file() and p.name != "run.lock"}

    before = outputs()
    with RunLock(str(run_dir)).acquire():  # a live run: this process
        proc = _cli("filter", str(run_dir), "--min-reward", "0.5")
        assert proc.returncode == 1, proc.stdout + proc.stderr
        assert f"is in use by another sft-ray run (pid {os.getpid()} on host {socket.gethostname()}" in proc.stderr
        assert proc.stderr.startswith("error: not re-cut: ") and "Traceback" not in proc.stderr
        assert outputs() == before
    proc = _cli("filter", str(run_dir), "--min-reward", "0.5", "train.reasoning=drop")
    assert proc.returncode == 0, proc.stderr
    assert not (run_dir / "run.lock").exists()
    saved = json.loads((run_dir / "run.json").read_text())
    [recut] = saved["recuts"]
    assert recut["given"] == {"filter.min_reward": 0.5} and recut["overrides"] == ["train.reasoning=drop"]
    assert recut["filter"]["min_reward"] == 0.5 and recut["train_rows"] == 5 and recut["shuffle_seed"] == 0
    assert saved["config"]["filter"]["min_reward"] == 0.5  # what train/ now holds
    # A later `sft-ray run` of the folder re-finalizes with its own settings: the re-cut stays on record.
    again = prepare_run_dir(cfg, False, {})
    assert again["recuts"] == saved["recuts"] and again["config"]["filter"]["min_reward"] == 0.0


def test_a_run_is_refused_while_a_recut_holds_the_folder(tmp_path):
    with RunLock(str(tmp_path / "run"), "filter").acquire():
        with pytest.raises(LockError, match="in use by another sft-ray filter"):
            RunLock(str(tmp_path / "run")).acquire()
    assert "not a run folder" in _cli("filter", str(tmp_path / "nothing")).stderr
    assert not (tmp_path / "nothing").exists()  # refused before any lock is made
