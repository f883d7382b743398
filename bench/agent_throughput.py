"""Agent-rollout throughput against the local mock server with fixed latency.

Each episode is two model calls and one tool call: the mock (`sft-ray serve-mock
--latency-ms L`, its own process) calls `get_weather`, the python environment
(examples/tools_weather.py) answers, the mock answers with the tool's output. For each
concurrency C, runs the real `sft-ray run` CLI on N NeMo Gym-form rows and reports
episodes/s and the ratio to the limit C / (2 x L): no client can beat C model calls
per L seconds, and an episode needs two.

    python bench/agent_throughput.py --episodes 20000 --latency-ms 50 --concurrency 64 256
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
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from hosted_throughput import free_port, wait_http  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOL = {"type": "function", "name": "get_weather", "description": "Get the current weather in a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"],
                       "additionalProperties": False}, "strict": True}
CALLS_PER_EPISODE = 2


def write_inputs(path: str, n: int) -> None:
    with open(path, "w") as f:
        for i in range(n):
            f.write(json.dumps({"responses_create_params": {"input": [{"role": "user", "content": f"city{i}"}],
                                                            "tools": [TOOL]}, "id": i}) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--episodes", type=int, default=20_000)
    ap.add_argument("--latency-ms", type=float, default=50.0)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[64, 256])
    ap.add_argument("--api", default="chat", choices=["chat", "responses"])
    ap.add_argument("--keep", action="store_true", help="keep the temporary folder")
    args = ap.parse_args()

    work = tempfile.mkdtemp(prefix="sft-ray-agent-bench-")
    inp = os.path.join(work, "episodes.jsonl")
    write_inputs(inp, args.episodes)
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "sft_ray.cli", "serve-mock", "--port", str(port),
                               "--latency-ms", str(args.latency_ms)], stdout=subprocess.DEVNULL)
    results = []
    try:
        wait_http(f"http://127.0.0.1:{port}/stats")
        for c in args.concurrency:
            out = os.path.join(work, f"run-c{c}")
            cfg = os.path.join(work, "config.yaml")
            with open(cfg, "w") as f:
                json.dump({"input": inp, "output": out,
                           "model": {"name": "mock", "base_url": f"http://127.0.0.1:{port}/v1", "api": args.api},
                           "environment": {"type": "python", "module": os.path.join(ROOT, "examples/tools_weather.py")},
                           "agent": {"max_steps": 4},
                           "num_samples_in_parallel": c,
                           "verifier": {"type": "regex", "pattern": "The weather in city[0-9]+ is cold"}}, f)
            before = json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/stats"))
            t0 = time.time()
            proc = subprocess.run([sys.executable, "-m", "sft_ray.cli", "run", cfg], capture_output=True, text=True)
            wall = time.time() - t0
            if proc.returncode != 0:
                print(proc.stdout[-3000:], proc.stderr[-3000:])
                raise SystemExit(f"run failed with exit code {proc.returncode}")
            after = json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/stats"))
            session = json.load(open(os.path.join(out, "run.json")))["sessions"][-1]
            stats = json.load(open(os.path.join(out, "stats.json")))
            limit = c / (CALLS_PER_EPISODE * args.latency_ms / 1000)
            done = session["written"] + session["failed"]
            rate = done / session["generate_wall_s"]
            steady = session.get("steady_samples_per_s", rate)
            model_calls = after["requests"] - before["requests"]
            tool_turns = after["tool_call_turns"] - before["tool_call_turns"]
            if model_calls != CALLS_PER_EPISODE * done or tool_turns != done:
                raise SystemExit(f"expected {CALLS_PER_EPISODE} model calls and 1 tool call per episode: "
                                 f"{model_calls} model calls, {tool_turns} tool-call turns for {done} episodes")
            results.append({"concurrency": c, "episodes": done, "limit_episodes_per_s": limit,
                            "generate_episodes_per_s": round(rate, 1), "ratio": round(rate / limit, 3),
                            "steady_episodes_per_s": steady, "steady_ratio": round(steady / limit, 3),
                            "command_wall_s": round(wall, 1), "first_rows_after_s": session.get("first_rows_after_s"),
                            "failed": stats["failed"], "mean_reward": (stats.get("reward") or {}).get("mean"),
                            "model_calls": model_calls, "server_max_in_flight": after["max_in_flight"]})
            print(json.dumps(results[-1]), flush=True)
    finally:
        server.terminate()
        server.wait()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print("\n| concurrency | limit episodes/s | generate episodes/s | ratio | steady episodes/s | steady ratio "
          "| whole command s |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['concurrency']} | {r['limit_episodes_per_s']:.0f} | {r['generate_episodes_per_s']} | "
              f"{r['ratio']} | {r['steady_episodes_per_s']} | {r['steady_ratio']} | {r['command_wall_s']} |")


if __name__ == "__main__":
    main()
