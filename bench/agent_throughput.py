"""Agent-rollout throughput against the local mock server with fixed latency.

Each episode is two model calls and one tool call: the mock (`sft-ray serve-mock
--latency-ms L`, its own process) calls `get_weather`, the python environment
(examples/tools_weather.py) answers, the mock answers with the tool's output. For each
concurrency C, runs the real `sft-ray run` CLI on N NeMo Gym-form rows and reports
episodes/s and the ratio to the limit C / (2 x L): no client can beat C model calls
per L seconds, and an episode needs two.

It also counts the CPU time the run's whole process tree (driver, Ray, actors) and the
mock server spent per episode, which stays meaningful on a machine shared with other
work, where rates do not. `--baseline` first runs the single-turn path on the same
number of model calls (rows without tools, 2N of them) under the same conditions.
`--environments python mcp` runs the same episodes with the tool behind the python environment
and behind an MCP server (examples/mcp_weather_server.py over stdio, one per actor), side by side:
the difference is the MCP overhead per call (the server is a child of the actor, so its CPU time is
in the client's).

    python bench/agent_throughput.py --episodes 20000 --latency-ms 50 --concurrency 64 256 --baseline
    python bench/agent_throughput.py --episodes 5000 --latency-ms 50 --concurrency 64 --environments python mcp
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

import psutil

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from hosted_throughput import free_port, wait_http  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOL = {"type": "function", "name": "get_weather", "description": "Get the current weather in a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"],
                       "additionalProperties": False}, "strict": True}
CALLS_PER_EPISODE = 2


def write_inputs(path: str, n: int, tools: bool = True) -> None:
    with open(path, "w") as f:
        for i in range(n):
            rcp = {"input": [{"role": "user", "content": f"city{i}"}]}
            if tools:
                rcp["tools"] = [TOOL]
            f.write(json.dumps({"responses_create_params": rcp, "id": i}) + "\n")


class TreeCPU:
    """CPU seconds (user + system) of a process and all its descendants, sampled while it runs:
    Ray's workers are the driver's descendants (raylet's children) and exit before it does."""

    def __init__(self, pid: int) -> None:
        self.root = psutil.Process(pid)
        self.seen: dict[tuple[int, float], float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        try:
            procs = [self.root] + self.root.children(recursive=True)
        except psutil.Error:
            return
        for p in procs:
            try:
                t = p.cpu_times()
                self.seen[(p.pid, p.create_time())] = t.user + t.system
            except psutil.Error:
                pass

    def _loop(self) -> None:
        while not self._stop.wait(0.25):
            self._sample()

    def stop(self) -> float:
        self._sample()
        self._stop.set()
        self._thread.join()
        return sum(self.seen.values())


def process_cpu(pid: int) -> float:
    t = psutil.Process(pid).cpu_times()
    return t.user + t.system


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--episodes", type=int, default=20_000)
    ap.add_argument("--latency-ms", type=float, default=50.0)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[64, 256])
    ap.add_argument("--api", default="chat", choices=["chat", "responses"])
    ap.add_argument("--baseline", action="store_true",
                    help="also run the single-turn path on the same number of model calls, first")
    ap.add_argument("--environments", nargs="+", default=["python"], choices=["python", "mcp"],
                    help="where the tool runs: the python environment, an MCP server, or both in turn")
    ap.add_argument("--keep", action="store_true", help="keep the temporary folder")
    args = ap.parse_args()

    work = tempfile.mkdtemp(prefix="sft-ray-agent-bench-")
    inp = os.path.join(work, "episodes.jsonl")
    write_inputs(inp, args.episodes)
    single = os.path.join(work, "single-turn.jsonl")
    if args.baseline:
        write_inputs(single, CALLS_PER_EPISODE * args.episodes, tools=False)
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "sft_ray.cli", "serve-mock", "--port", str(port),
                               "--latency-ms", str(args.latency_ms)], stdout=subprocess.DEVNULL)
    results = []
    try:
        wait_http(f"http://127.0.0.1:{port}/stats")
        plan = [("single-turn", c) for c in args.concurrency] if args.baseline else []
        plan += [(f"agent-{env}" if len(args.environments) > 1 else "agent", c)
                 for env in args.environments for c in args.concurrency]
        for kind, c in plan:
            out = os.path.join(work, f"run-{kind}-c{c}")
            cfg = os.path.join(work, "config.yaml")
            agent = kind.startswith("agent")
            conf = {"input": inp if agent else single, "output": out,
                    "model": {"name": "mock", "base_url": f"http://127.0.0.1:{port}/v1", "api": args.api},
                    "num_samples_in_parallel": c}
            if agent:
                environment = {"type": "python", "module": os.path.join(ROOT, "examples/tools_weather.py")}
                if kind == "agent-mcp" or (kind == "agent" and args.environments == ["mcp"]):
                    environment = {"type": "mcp", "command": sys.executable,
                                   "args": [os.path.join(ROOT, "examples/mcp_weather_server.py")],
                                   "max_concurrent_calls": c}
                conf.update(environment=environment, agent={"max_steps": 4},
                            verifier={"type": "regex", "pattern": "The weather in city[0-9]+ is cold"})
            else:
                conf.update(verifier={"type": "none"})  # the rows carry no reference answer
            with open(cfg, "w") as f:
                json.dump(conf, f)
            before = json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/stats"))
            server_cpu0 = process_cpu(server.pid)
            load0 = os.getloadavg()[0]
            t0 = time.time()
            proc = subprocess.Popen([sys.executable, "-m", "sft_ray.cli", "run", cfg], stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True)
            tree = TreeCPU(proc.pid)
            stdout, stderr = proc.communicate()
            client_cpu = tree.stop()
            wall = time.time() - t0
            if proc.returncode != 0:
                print(stdout[-3000:], stderr[-3000:])
                raise SystemExit(f"run failed with exit code {proc.returncode}")
            after = json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/stats"))
            server_cpu = process_cpu(server.pid) - server_cpu0
            session = json.load(open(os.path.join(out, "run.json")))["sessions"][-1]
            stats = json.load(open(os.path.join(out, "stats.json")))
            calls = CALLS_PER_EPISODE if agent else 1
            limit = c / (calls * args.latency_ms / 1000)
            done = session["written"] + session["failed"]
            rate = done / session["generate_wall_s"]
            steady = session.get("steady_samples_per_s", rate)
            model_calls = after["requests"] - before["requests"]
            tool_turns = after["tool_call_turns"] - before["tool_call_turns"]
            if model_calls != calls * done or tool_turns != (done if agent else 0):
                raise SystemExit(f"expected {calls} model calls and {int(agent)} tool call per sample: "
                                 f"{model_calls} model calls, {tool_turns} tool-call turns for {done} samples")
            results.append({"kind": kind, "concurrency": c, "samples": done, "model_calls": model_calls,
                            "limit_per_s": limit, "generate_per_s": round(rate, 1), "ratio": round(rate / limit, 3),
                            "steady_per_s": steady, "steady_ratio": round(steady / limit, 3),
                            "command_wall_s": round(wall, 1), "first_rows_after_s": session.get("first_rows_after_s"),
                            "client_cpu_ms_per_model_call": round(1000 * client_cpu / model_calls, 2),
                            "server_cpu_ms_per_model_call": round(1000 * server_cpu / model_calls, 2),
                            "load_avg_1m_before": round(load0, 1), "load_avg_1m_after": round(os.getloadavg()[0], 1),
                            "failed": stats["failed"], "mean_reward": (stats.get("reward") or {}).get("mean"),
                            "server_max_in_flight": after["max_in_flight"]})
            print(json.dumps(results[-1]), flush=True)
    finally:
        server.terminate()
        server.wait()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print("\n| path | concurrency | samples | limit/s | generate/s | ratio | steady/s | steady ratio | whole command s "
          "| client CPU ms / model call | mock CPU ms / model call | load avg |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['kind']} | {r['concurrency']} | {r['samples']} | {r['limit_per_s']:.0f} | {r['generate_per_s']} | "
              f"{r['ratio']} | {r['steady_per_s']} | {r['steady_ratio']} | {r['command_wall_s']} | "
              f"{r['client_cpu_ms_per_model_call']} | {r['server_cpu_ms_per_model_call']} | "
              f"{r['load_avg_1m_before']}-{r['load_avg_1m_after']} |")

if __name__ == "__main__":
    main()
