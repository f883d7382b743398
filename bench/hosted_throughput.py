"""Hosted-path throughput against the local mock server with fixed latency.

For each concurrency C, runs the real `sft-ray run` CLI on N rows against
`sft-ray serve-mock --latency-ms L` (its own process) and reports rows/s and the
ratio to the limit C / L (no client can beat C requests per L seconds).

    python bench/hosted_throughput.py --rows 20000 --latency-ms 50 --concurrency 64 256
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout: float = 30) -> None:
    end = time.time() + timeout
    while time.time() < end:
        try:
            urllib.request.urlopen(url, timeout=1).read()
            return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"{url} did not come up")


def prompts_and_mock(prefix: str, rows: int, latency_ms: float) -> tuple[str, str, int, subprocess.Popen]:
    """A temporary folder with ``rows`` numbered prompts (``prompts.jsonl``) and ``sft-ray serve-mock``
    started on a free port with ``latency_ms``: (folder, input file, port, server process)."""
    work = tempfile.mkdtemp(prefix=prefix)
    inp = os.path.join(work, "prompts.jsonl")
    with open(inp, "w") as f:
        for i in range(rows):
            f.write(json.dumps({"responses_create_params": {"input": [{"role": "user", "content": f"{i}"}]},
                                "expected_answer": str(i)}) + "\n")
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "sft_ray.cli", "serve-mock", "--port", str(port),
                               "--latency-ms", str(latency_ms)], stdout=subprocess.DEVNULL)
    return work, inp, port, server


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=20_000)
    ap.add_argument("--latency-ms", type=float, default=50.0)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[64, 256])
    ap.add_argument("--api", default="chat", choices=["chat", "responses"])
    ap.add_argument("--verifier", default="exact_match")
    ap.add_argument("--keep", action="store_true", help="keep the temporary folder")
    args = ap.parse_args()

    work, inp, port, server = prompts_and_mock("sft-ray-bench-", args.rows, args.latency_ms)
    results = []
    try:
        wait_http(f"http://127.0.0.1:{port}/stats")
        for c in args.concurrency:
            out = os.path.join(work, f"run-c{c}")
            cfg = os.path.join(work, "config.yaml")
            open(cfg, "w").write("{}\n")
            cmd = [sys.executable, "-m", "sft_ray.cli", "run", cfg, f"input={inp}", f"output={out}",
                   "model.name=mock", f"model.base_url=http://127.0.0.1:{port}/v1", f"model.api={args.api}",
                   f"num_samples_in_parallel={c}", f"verifier.type={args.verifier}"]
            before = json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/stats"))
            t0 = time.time()
            proc = subprocess.run(cmd, capture_output=True, text=True)
            wall = time.time() - t0
            if proc.returncode != 0:
                print(proc.stdout[-3000:], proc.stderr[-3000:])
                raise SystemExit(f"run failed with exit code {proc.returncode}")
            after = json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/stats"))
            session = json.load(open(os.path.join(out, "run.json")))["sessions"][-1]
            stats = json.load(open(os.path.join(out, "stats.json")))
            limit = c / (args.latency_ms / 1000)
            done = session["written"] + session["failed"]
            rate = done / session["generate_wall_s"]
            steady = session.get("steady_samples_per_s", rate)
            results.append({"concurrency": c, "rows": done, "limit_rows_per_s": limit,
                            "generate_rows_per_s": round(rate, 1), "ratio": round(rate / limit, 3),
                            "steady_rows_per_s": steady, "steady_ratio": round(steady / limit, 3),
                            "command_wall_s": round(wall, 1), "first_rows_after_s": session.get("first_rows_after_s"), "finalize_s": stats["finalize_wall_s"],
                            "failed": stats["failed"], "server_max_in_flight": after["max_in_flight"],
                            "server_mean_in_flight_cumulative": round(after["mean_in_flight"], 1),
                            "requests": after["requests"] - before["requests"]})
            print(json.dumps(results[-1]), flush=True)
    finally:
        server.terminate()
        server.wait()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print("\n| concurrency | limit rows/s | generate rows/s | ratio | steady rows/s | steady ratio | whole command s |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['concurrency']} | {r['limit_rows_per_s']:.0f} | {r['generate_rows_per_s']} | {r['ratio']} | "
              f"{r['steady_rows_per_s']} | {r['steady_ratio']} | {r['command_wall_s']} |")


if __name__ == "__main__":
    main()
