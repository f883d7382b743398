"""Crash re-send: samples sent to the model again after `kill -9` of a run, then a resume.

Starts the bundled mock server (it counts requests per prompt), runs `sft-ray run` in a
subprocess with its own local Ray cluster, kills the driver (or the driver with its whole
Ray cluster, or the driver's process group: ``os.killpg``, which Ray's workers, each in a
process group of its own, outlive for seconds) with SIGKILL once ``--kill-at`` rollouts are on
disk (or, with ``--kill-at-requests``, once the server has had that many requests), reruns the
same command, and counts prompts the server answered more than once, and the requests that
reached the server after the kill. Goal (issues 9.14, 22.20): at most 2 x num_samples_in_parallel
re-sent on a local filesystem.

    python bench/crash_resend.py --rows 600 --parallel 16 --kill-at 100 300 --victim driver cluster
    python bench/crash_resend.py --rows 600 --parallel 16 --latency-ms 100 --kill-at-requests 250 --victim group
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sft_ray.devserver import MockConfig, MockServer  # noqa: E402


def count_rows(folder: Path) -> int:
    return sum(f.read_bytes().count(b"\n") for f in folder.glob("*.jsonl")) if folder.exists() else 0


def session_alive(sid: int) -> bool:
    for p in psutil.process_iter():
        try:
            if os.getsid(p.pid) == sid:
                return True
        except (ProcessLookupError, PermissionError, psutil.Error):
            pass
    return False


def one(rows: int, parallel: int, kill_at: int, victim: str, latency_ms: float, at_requests: bool = False) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix="sft-crash-"))
    with MockServer(MockConfig(latency_ms=latency_ms)) as server:
        inp = tmp / "in.jsonl"
        inp.write_text("".join(json.dumps({"prompt": f"p{i}", "expected_answer": "x"}) + "\n" for i in range(rows)))
        cfg = tmp / "c.yaml"
        cfg.write_text(json.dumps({"input": str(inp), "output": str(tmp / "run"),
                                   "model": {"name": "mock", "base_url": server.url},
                                   "num_samples_in_parallel": parallel, "resources": {"ray_address": "local"}}))
        cmd = [sys.executable, "-m", "sft_ray.cli", "run", str(cfg)]
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
                                start_new_session=True)
        deadline = time.time() + 300
        def reached() -> bool:
            return (server.state.requests if at_requests else count_rows(tmp / "run" / "rollouts")) >= kill_at

        while not reached() and time.time() < deadline and proc.poll() is None:
            time.sleep(0.005)
        if proc.poll() is not None:
            raise SystemExit("the run ended before it could be killed: use more --rows or a smaller --kill-at")
        answered_at_kill = server.state.requests
        requests_at_kill = server.state.requests
        if victim == "driver":
            os.kill(proc.pid, signal.SIGKILL)
        elif victim == "group":
            os.killpg(proc.pid, signal.SIGKILL)
        else:
            for p in psutil.process_iter():
                try:
                    if os.getsid(p.pid) == proc.pid:
                        p.kill()
                except (ProcessLookupError, PermissionError, psutil.Error):
                    pass
        proc.wait()
        written = count_rows(tmp / "run" / "rollouts")
        deadline = time.time() + 60
        while session_alive(proc.pid) and time.time() < deadline:
            time.sleep(0.2)
        after_kill = server.state.requests - requests_at_kill
        second = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
        if second.returncode != 0:
            raise SystemExit(second.stdout[-2000:] + second.stderr[-2000:])
        served = dict(server.state.served)
    resent = sum(c - 1 for c in served.values())
    return {"victim": victim, "kill_at": kill_at, "written_at_kill": written, "answered_at_kill": answered_at_kill,
            "resent": resent, "after_kill": after_kill, "goal": 2 * parallel}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=600)
    ap.add_argument("--parallel", type=int, default=16)
    ap.add_argument("--latency-ms", type=float, default=20.0)
    ap.add_argument("--kill-at", type=int, nargs="+", default=[150])
    ap.add_argument("--kill-at-requests", action="store_true",
                    help="--kill-at counts requests the server has had, not rollouts on disk")
    ap.add_argument("--victim", nargs="+", default=["driver"], choices=["driver", "cluster", "group"])
    args = ap.parse_args()
    print("| victim | rollouts on disk at the kill | answered by then | requests after the kill | re-sent | "
          "goal (2 x parallel) |")
    print("|---|---|---|---|---|---|")
    for victim in args.victim:
        for k in args.kill_at:
            r = one(args.rows, args.parallel, k, victim, args.latency_ms, args.kill_at_requests)
            print(f"| {r['victim']} | {r['written_at_kill']} | {r['answered_at_kill']} | {r['after_kill']} | "
                  f"{r['resent']} | {r['goal']} |", flush=True)


if __name__ == "__main__":
    main()
