"""Does an LLM judge slow a run down? Generation-only against generation + judge.

Runs the real `sft-ray run` CLI twice on the same N rows against one
`sft-ray serve-mock --latency-ms L` (its own process, answering both the generator and,
for the model name `mock-judge`, the judge, each call after L ms): once with
`verifier.type=none`, once with `verifier.type=judge`. The judge runs in the scoring
actors while generation goes on, so the two wall times should be close.

    python bench/score_judge.py --rows 3000 --latency-ms 50 --concurrency 64
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

sys.path.insert(0, os.path.dirname(__file__))
from hosted_throughput import free_port, wait_http  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=3000)
    ap.add_argument("--latency-ms", type=float, default=50.0)
    ap.add_argument("--concurrency", type=int, default=64)
    args = ap.parse_args()

    work = tempfile.mkdtemp(prefix="sft-ray-bench-")
    inp = os.path.join(work, "prompts.jsonl")
    with open(inp, "w") as f:
        for i in range(args.rows):
            f.write(json.dumps({"prompt": f"{i}", "expected_answer": str(i)}) + "\n")
    cfg = os.path.join(work, "config.yaml")
    with open(cfg, "w") as f:
        f.write("{}\n")
    port = free_port()
    url = f"http://127.0.0.1:{port}/v1"
    server = subprocess.Popen([sys.executable, "-m", "sft_ray.cli", "serve-mock", "--port", str(port),
                               "--latency-ms", str(args.latency_ms)], stdout=subprocess.DEVNULL)
    results = {}
    try:
        wait_http(f"http://127.0.0.1:{port}/stats")
        judge = ["verifier.type=judge", "verifier.judge.model.name=mock-judge", f"verifier.judge.model.base_url={url}",
                 "verifier.judge.model.api_key_env=null", "verifier.concurrency=64"]
        for name, verifier in (("generation only", ["verifier.type=none"]), ("with judge", judge)):
            out = os.path.join(work, name.replace(" ", "-"))
            cmd = [sys.executable, "-m", "sft_ray.cli", "run", cfg, f"input={inp}", f"output={out}",
                   "model.name=mock", f"model.base_url={url}", f"num_samples_in_parallel={args.concurrency}",
                   *verifier]
            t0 = time.time()
            proc = subprocess.run(cmd, capture_output=True, text=True)
            wall = time.time() - t0
            if proc.returncode != 0:
                print(proc.stdout[-3000:], proc.stderr[-3000:])
                raise SystemExit(f"run failed with exit code {proc.returncode}")
            session = json.load(open(os.path.join(out, "run.json")))["sessions"][-1]
            stats = json.load(open(os.path.join(out, "stats.json")))
            results[name] = {"rows": session["written"] + session["failed"], "generate_wall_s": session["generate_wall_s"],
                             "command_wall_s": round(wall, 1), "reward_mean": stats["reward"].get("mean"),
                             "judge_calls_mean": stats["metrics"].get("judge_calls"),
                             "load_avg_1m": round(os.getloadavg()[0], 1)}
            print(name, json.dumps(results[name]), flush=True)
    finally:
        server.terminate()
        server.wait()
        shutil.rmtree(work, ignore_errors=True)
    base, judged = results["generation only"], results["with judge"]
    print(json.dumps({"slowdown": round(judged["generate_wall_s"] / base["generate_wall_s"] - 1, 3)}))


if __name__ == "__main__":
    main()
