"""Rate-limited hosted API: adaptive concurrency against a fixed one (issue 12).

Runs the real `sft-ray run` CLI on N rows against `sft-ray serve-mock` (its own process)
enforcing a request limit (a token bucket of `--window-s` seconds of refill, 429 with
Retry-After and x-ratelimit-* headers beyond it), once per mode:

- `auto`: `num_samples_in_parallel: auto` with `rate_limit.requests_per_minute` set to the limit;
- `auto-blind`: `num_samples_in_parallel: auto` with no client-side limit (AIMD and the headers only);
- `fixed`: a fixed `num_samples_in_parallel` (`--fixed`, 512) with no client-side limit.

It reports the rate the server answered 200 (from its first to its last answer: the
sustained rate the limit allows, plus the bucket's initial burst) against the allowed rate,
the rate over the whole generation phase (actor start-up included), and the share of
requests answered 429.

    python bench/ratelimit.py --rows 20000 --rpm 30000 --latency-ms 50 --modes auto auto-blind fixed
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


def get(url: str) -> dict:
    return json.load(urllib.request.urlopen(url, timeout=10))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=20_000)
    ap.add_argument("--rpm", type=float, default=30_000)
    ap.add_argument("--window-s", type=float, default=1.0, help="server bucket capacity in seconds of refill")
    ap.add_argument("--latency-ms", type=float, default=50.0)
    ap.add_argument("--fixed", type=int, default=512)
    ap.add_argument("--actors", type=int, default=2)
    ap.add_argument("--modes", nargs="+", default=["auto", "auto-blind", "fixed"])
    args = ap.parse_args()

    work = tempfile.mkdtemp(prefix="sft-ray-bench-rl-")
    inp = os.path.join(work, "prompts.jsonl")
    with open(inp, "w") as f:
        for i in range(args.rows):
            f.write(json.dumps({"prompt": f"q {i}", "expected_answer": f"q {i}"}) + "\n")
    allowed = args.rpm / 60
    results = []
    try:
        for mode in args.modes:
            port = free_port()  # a fresh server (a full bucket) per mode
            server = subprocess.Popen([sys.executable, "-m", "sft_ray.cli", "serve-mock", "--port", str(port),
                                       "--latency-ms", str(args.latency_ms), "--requests-per-minute", str(args.rpm),
                                       "--limit-window-s", str(args.window_s)], stdout=subprocess.DEVNULL)
            try:
                for _ in range(150):
                    try:
                        get(f"http://127.0.0.1:{port}/stats")
                        break
                    except OSError:
                        time.sleep(0.2)
                out = os.path.join(work, f"run-{mode}")
                cfg = os.path.join(work, "config.yaml")
                open(cfg, "w").write("{}\n")
                mode_args = {"auto": ["num_samples_in_parallel=auto", f"rate_limit.requests_per_minute={args.rpm}"],
                             "auto-blind": ["num_samples_in_parallel=auto"],
                             "fixed": [f"num_samples_in_parallel={args.fixed}"]}[mode]
                cmd = [sys.executable, "-m", "sft_ray.cli", "run", cfg, f"input={inp}", f"output={out}",
                       "model.name=mock", f"model.base_url=http://127.0.0.1:{port}/v1", "model.max_retries=50",
                       "model.max_retry_wait_s=5", "verifier.type=exact_match", "pricing.input_per_mtok=0.01",
                       f"resources.generate_actors={args.actors}", "rate_limit.max_concurrency=512",
                       # small CPU shares: on a 2-core machine the read tasks need room beside the actors
                       "resources.generate_num_cpus=0.25", "resources.score_num_cpus=0.25", *mode_args]
                t0 = time.time()
                proc = subprocess.run(cmd, capture_output=True, text=True)
                wall = time.time() - t0
                st = get(f"http://127.0.0.1:{port}/stats")
            finally:
                server.terminate()
                server.wait(10)
            if proc.returncode != 0:
                print(proc.stdout[-3000:], proc.stderr[-3000:])
                raise SystemExit(f"{mode}: run failed with exit code {proc.returncode}")
            session = json.load(open(os.path.join(out, "run.json")))["sessions"][-1]
            ok = st["by_status"].get("200", 0)
            refused = st["by_status"].get("429", 0)
            row = {"mode": mode, "rows": args.rows, "allowed_per_s": allowed,
                   "steady_per_s": session.get("steady_samples_per_s"),
                   "generate_per_s": round(ok / session["generate_wall_s"], 1),
                   "server_per_s": round(ok / st["span_s"], 1) if st["span_s"] else None,  # first to last answer
                   "requests": st["requests"], "answered_429": refused,
                   "share_429": round(refused / max(1, st["requests"]), 4), "max_in_flight": st["max_in_flight"],
                   "failed": json.load(open(os.path.join(out, "stats.json")))["failed"], "wall_s": round(wall, 1)}
            row["server_ratio"] = round((row["server_per_s"] or 0) / allowed, 3)
            results.append(row)
            print(json.dumps(row), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print("\n| mode | allowed/s | server 200s/s | ratio | phase/s | requests | 429s | 429 share | max in flight "
          "| failed |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['mode']} | {r['allowed_per_s']:.0f} | {r['server_per_s']} | {r['server_ratio']} | "
              f"{r['generate_per_s']} | {r['requests']} | {r['answered_429']} | {100 * r['share_429']:.2f}% | "
              f"{r['max_in_flight']} | {r['failed']} |")


if __name__ == "__main__":
    main()
