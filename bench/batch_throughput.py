"""Batch API path against the mock server: the driver's CPU and wall time per row, beside the
online path on the same rows.

Runs the real `sft-ray run` CLI twice on the same N rows against `sft-ray serve-mock` (its own
process, no latency): once with `model.batch.enabled=true` (files of `--max-requests` lines,
`--delay-s` of provider wait per batch) and once online (`num_samples_in_parallel` requests in
flight). The client's CPU is the user + system time of the `sft-ray run` process tree (the
driver, and for the online path Ray's processes and workers), sampled every 0.2 s by psutil
(the last reading of each process counts); the server's CPU is reported apart.

    python bench/batch_throughput.py --rows 100000
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import psutil
from hosted_throughput import free_port, wait_http  # the benches' one copy


def cpu_of(proc: psutil.Process) -> float:
    t = proc.cpu_times()
    return t.user + t.system


def run_tree(cmd: list[str], log: str) -> tuple[int, float, float]:
    """(exit code, wall s, CPU s of the process tree) of one command."""
    seen: dict[int, float] = {}
    t0 = time.monotonic()
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        root = psutil.Process(proc.pid)
        while proc.poll() is None:
            try:
                for p in [root, *root.children(recursive=True)]:
                    try:
                        seen[p.pid] = cpu_of(p)
                    except psutil.Error:
                        pass
            except psutil.Error:
                pass
            time.sleep(0.2)
    wall = time.monotonic() - t0
    return proc.returncode, wall, sum(seen.values())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--max-requests", type=int, default=50_000)
    ap.add_argument("--delay-s", type=float, default=0.0, help="the mock's wait before it processes a batch")
    ap.add_argument("--concurrency", type=int, default=256, help="online: requests in flight")
    ap.add_argument("--modes", nargs="+", default=["batch", "online"], choices=["batch", "online"])
    ap.add_argument("--keep", action="store_true", help="keep the temporary folder")
    args = ap.parse_args()

    work = tempfile.mkdtemp(prefix="sft-ray-bench-batch-")
    inp = os.path.join(work, "prompts.jsonl")
    with open(inp, "w") as f:
        for i in range(args.rows):
            f.write(json.dumps({"id": f"r{i}", "prompt": f"answer {i}", "expected_answer": f"answer {i}"}) + "\n")
    config = os.path.join(work, "config.yaml")
    with open(config, "w") as f:
        f.write("{}\n")  # everything comes as overrides below
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "sft_ray.cli", "serve-mock", "--port", str(port),
                               "--batch-delay-s", str(args.delay_s)], stdout=subprocess.DEVNULL)
    sp = psutil.Process(server.pid)
    try:
        wait_http(f"http://127.0.0.1:{port}/v1/models")
        print(f"{'mode':8} {'rows':>7} {'exit':>4} {'wall s':>7} {'rows/s':>7} {'client CPU s':>12} "
              f"{'CPU ms/row':>10} {'server CPU s':>12}")
        for mode in args.modes:
            out = os.path.join(work, f"run-{mode}")
            cmd = [sys.executable, "-m", "sft_ray.cli", "run", config, f"input={inp}", f"output={out}",
                   "model.name=mock", f"model.base_url=http://127.0.0.1:{port}/v1", "verifier.type=exact_match",
                   "responses_create_params.max_output_tokens=64", "model.timeout_s=60"]
            if mode == "batch":
                cmd += ["model.batch.enabled=true", f"model.batch.max_requests={args.max_requests}",
                        "model.batch.poll_interval_s=1"]
            else:
                cmd += [f"num_samples_in_parallel={args.concurrency}"]
            server_cpu0 = cpu_of(sp)
            code, wall, cpu = run_tree(cmd, os.path.join(work, f"{mode}.log"))
            server_cpu = cpu_of(sp) - server_cpu0
            stats = json.load(open(os.path.join(out, "stats.json")))
            rows = stats["samples"]
            print(f"{mode:8} {rows:>7} {code:>4} {wall:>7.1f} {rows / wall:>7.0f} {cpu:>12.1f} "
                  f"{1000 * cpu / max(1, rows):>10.3f} {server_cpu:>12.1f}", flush=True)
    finally:
        server.terminate()
        server.wait(10)
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"kept {work}")


if __name__ == "__main__":
    main()
