"""Steady rows/s with metrics on against off, side by side on the same rows.

Runs the real `sft-ray run` CLI on N rows against `sft-ray serve-mock --latency-ms L` (its own
process), alternating `metrics.enabled=true` and `false` (on, off, on, off, ...: load drifts on a
shared machine hit both alike), each into a fresh run folder, and reports each run's steady
rows/s (run.json's steady_samples_per_s, between 10% and 90% done) and the ratio of the means.

    python bench/metrics_overhead.py --rows 4000 --latency-ms 20 --concurrency 64 --pairs 2
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from statistics import mean

from hosted_throughput import prompts_and_mock, wait_http


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=4000)
    ap.add_argument("--latency-ms", type=float, default=20.0)
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--pairs", type=int, default=2)
    args = ap.parse_args()

    work, inp, port, server = prompts_and_mock("sft-ray-bench-metrics-", args.rows, args.latency_ms)
    rates: dict[str, list[float]] = {"on": [], "off": []}
    try:
        wait_http(f"http://127.0.0.1:{port}/stats")
        cfg = os.path.join(work, "config.yaml")
        open(cfg, "w").write("{}\n")
        for i in range(args.pairs):
            for mode in ("on", "off"):
                out = os.path.join(work, f"run-{mode}-{i}")
                cmd = [sys.executable, "-m", "sft_ray.cli", "run", cfg, f"input={inp}", f"output={out}",
                       "model.name=mock", f"model.base_url=http://127.0.0.1:{port}/v1",
                       f"num_samples_in_parallel={args.concurrency}", "verifier.type=exact_match",
                       f"metrics.enabled={'true' if mode == 'on' else 'false'}"]
                proc = subprocess.run(cmd, capture_output=True, text=True)
                if proc.returncode != 0:
                    print(proc.stdout[-3000:], proc.stderr[-3000:])
                    raise SystemExit(f"run failed with exit code {proc.returncode}")
                session = json.load(open(os.path.join(out, "run.json")))["sessions"][-1]
                rate = session.get("steady_samples_per_s") or (session["written"] / session["generate_wall_s"])
                rates[mode].append(rate)
                print(json.dumps({"metrics": mode, "pair": i, "steady_rows_per_s": rate}), flush=True)
    finally:
        server.terminate()
        server.wait()
        shutil.rmtree(work, ignore_errors=True)
    on, off = mean(rates["on"]), mean(rates["off"])
    print("\n| metrics | steady rows/s (each run) | mean |")
    print("|---|---|---|")
    for mode in ("on", "off"):
        print(f"| {mode} | {', '.join(f'{r:.1f}' for r in rates[mode])} | {mean(rates[mode]):.1f} |")
    print(f"\non / off: {on / off:.3f}")


if __name__ == "__main__":
    main()
