"""Claude natively (backend anthropic) against `sft-ray serve-mock` (its own process), four measurements:

- client: client CPU per request of sft-ray's Messages client (aiohttp, sft_ray/backends/anthropic.py) against
  the official SDK's AsyncAnthropic and a bare aiohttp loop, same requests, same mock (no latency);
- throughput: steady rows/s of `sft-ray run` with `model.backend: anthropic` at C concurrent requests and
  L ms latency, as a share of a bare aiohttp client on the same /v1/messages;
- caching: agent episodes of 3 tool turns, with and without `model.prompt_caching`, on the same rows:
  input tokens billed (cache writes at 1.25x, reads at 0.1x) and their cost;
- batch: client CPU per row of the Message Batches path (request lines, create, poll, results, parsing)
  against the online path (one request per row) on the same rows.

    python bench/claude_native.py --rows 4000 --latency-ms 50 --concurrency 64
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import aiohttp
from hosted_throughput import free_port, wait_http

from sft_ray.backends.anthropic import AnthropicBackend
from sft_ray.backends.anthropic_batch import AnthropicBatchProvider
from sft_ray.backends.base import GenerationRequest, Secret
from sft_ray.backends.batchapi import BatchLimits
from sft_ray.cost import cost_usd

KEY = "sk-ant-bench"


def model(base: str, **kw) -> dict:
    m = {"backend": "anthropic", "name": "claude-sonnet-4-5", "base_url": base, "anthropic_version": "2023-06-01",
         "timeout_s": 60.0, "connect_timeout_s": 10.0, "timeout_per_1k_output_tokens_s": 0.0, "max_retries": 2,
         "base_retry_wait_s": 0.05, "max_retry_wait_s": 1.0, "prompt_caching": True, "thinking": None,
         "api_key": Secret(KEY)}
    m.update(kw)
    return m


def request(i: int) -> GenerationRequest:
    return GenerationRequest([{"role": "system", "content": "Answer with the number."},
                              {"role": "user", "content": f"{i}"}], {"max_output_tokens": 64, "temperature": 1.0})


async def gather_limited(n: int, c: int, fn) -> None:
    sem = asyncio.Semaphore(c)

    async def one(i: int) -> None:
        async with sem:
            await fn(i)

    await asyncio.gather(*(one(i) for i in range(n)))


def cpu_wall(coro_factory) -> tuple[float, float]:
    c0, t0 = time.process_time(), time.perf_counter()
    asyncio.run(coro_factory())
    return time.process_time() - c0, time.perf_counter() - t0


def bench_client(base: str, n: int, c: int) -> dict:
    body = {"model": "claude-sonnet-4-5", "max_tokens": 64, "system": "Answer with the number."}

    async def ours() -> None:
        b = AnthropicBackend(model(base), c)
        await b.start()
        try:
            async def call(i: int) -> None:
                r = await b.generate(request(i))
                assert r.error is None, r.error
            await gather_limited(n, c, call)
        finally:
            await b.close()

    async def sdk() -> None:
        import anthropic

        client = anthropic.AsyncAnthropic(api_key=KEY, base_url=base, max_retries=2,
                                          default_headers={"anthropic-version": "2023-06-01", "x-api-key": KEY})
        try:
            async def call(i: int) -> None:
                await client.messages.create(**body, messages=[{"role": "user", "content": f"{i}"}])
            await gather_limited(n, c, call)
        finally:
            await client.close()

    async def bare() -> None:
        headers = {"x-api-key": KEY, "anthropic-version": "2023-06-01"}
        async with aiohttp.ClientSession(headers=headers, connector=aiohttp.TCPConnector(limit=c)) as s:
            async def call(i: int) -> None:
                async with s.post(base + "/v1/messages",
                                  json={**body, "messages": [{"role": "user", "content": f"{i}"}]}) as r:
                    await r.json()
            await gather_limited(n, c, call)

    out = {}
    for name, fn in (("bare aiohttp", bare), ("sft-ray (aiohttp)", ours), ("anthropic SDK", sdk)):
        cpu, wall = cpu_wall(fn)
        out[name] = {"cpu_ms_per_request": round(1000 * cpu / n, 3), "requests_per_s": round(n / wall, 1)}
    return out


def bench_throughput(port: int, work: str, rows: int, c: int, latency_ms: float) -> dict:
    inp = os.path.join(work, "prompts.jsonl")
    with open(inp, "w") as f:
        for i in range(rows):
            f.write(json.dumps({"prompt": f"{i}", "expected_answer": str(i)}) + "\n")
    base = f"http://127.0.0.1:{port}"

    async def bare() -> None:
        headers = {"x-api-key": KEY, "anthropic-version": "2023-06-01"}
        async with aiohttp.ClientSession(headers=headers, connector=aiohttp.TCPConnector(limit=c)) as s:
            async def call(i: int) -> None:
                async with s.post(base + "/v1/messages", json={"model": "m", "max_tokens": 1024, "messages": [
                        {"role": "user", "content": f"{i}"}]}) as r:
                    await r.json()
            await gather_limited(rows, c, call)

    _, wall = cpu_wall(bare)
    bare_before = rows / wall
    out = os.path.join(work, f"run-c{c}")
    cfg = os.path.join(work, "config.yaml")
    open(cfg, "w").write("{}\n")
    cmd = [sys.executable, "-m", "sft_ray.cli", "run", cfg, f"input={inp}", f"output={out}", "model.backend=anthropic",
           "model.name=claude-sonnet-4-5", f"model.base_url={base}", "model.api_key_env=SFT_RAY_BENCH_KEY",
           f"num_samples_in_parallel={c}", "verifier.type=exact_match"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "SFT_RAY_BENCH_KEY": KEY})
    if proc.returncode != 0:
        print(proc.stdout[-3000:], proc.stderr[-3000:])
        raise SystemExit(f"run failed with exit code {proc.returncode}")
    _, wall = cpu_wall(bare)  # again after: on a loaded machine the reference is the better of the two
    bare_rate = max(bare_before, rows / wall)
    session = json.load(open(os.path.join(out, "run.json")))["sessions"][-1]
    done = session["written"] + session["failed"]
    steady = session.get("steady_samples_per_s", done / session["generate_wall_s"])
    return {"concurrency": c, "latency_ms": latency_ms, "rows": rows, "limit_rows_per_s": c / (latency_ms / 1000),
            "bare_aiohttp_rows_per_s": round(bare_rate, 1), "bare_before_after": [round(bare_before, 1),
                                                                                   round(rows / wall, 1)], "sft_ray_steady_rows_per_s": round(steady, 1),
            "share_of_bare": round(steady / bare_rate, 3)}


def bench_caching(base: str, episodes: int) -> dict:
    from sft_ray.agent import EpisodeState, run_episode
    from sft_ray.environments.base import Episode, ToolOutput

    tools = [{"type": "function", "function": {"name": "get_weather", "description": "Current weather of a city.",
                                               "parameters": {"type": "object", "properties": {"city": {
                                                   "type": "string", "description": "The city."}},
                                                   "required": ["city"]}}}]
    system = "You are a helpful assistant that checks the weather before answering. " * 20

    class Weather(Episode):
        async def call(self, name, arguments):
            return ToolOutput(text=f"The weather in {arguments.get('city')} is cold, 3 degrees, light wind. " * 5)

    async def go(caching: bool) -> dict:
        b = AnthropicBackend(model(base, prompt_caching=caching), 16)
        await b.start()
        total: dict = {}
        try:
            async def one(i: int) -> None:
                state = EpisodeState(messages=[{"role": "system", "content": system},
                                               {"role": "user", "content": f"[[steps:3]] Weather in city {i}?"}])
                await run_episode(b.generate, Weather(), state, {"max_output_tokens": 256}, {"tools": tools}, 8,
                                  f"e{i}")
                assert state.error is None and state.num_tool_calls == 3, state.error
                for k, v in state.usage.items():
                    total[k] = total.get(k, 0) + v
            await gather_limited(episodes, 16, one)
        finally:
            await b.close()
        return total

    pricing = {"input_per_mtok": 3.0, "output_per_mtok": 15.0}
    out = {}
    for caching in (False, True):
        u = asyncio.run(go(caching))
        w, r = u.get("cache_creation_input_tokens", 0), u.get("cache_read_input_tokens", 0)
        out["with caching" if caching else "without caching"] = {
            "prompt_tokens": u["input_tokens"] + w + r, "input_tokens": u["input_tokens"], "cache_write_tokens": w,
            "cache_read_tokens": r, "billed_input_token_equivalents": round(u["input_tokens"] + 1.25 * w + 0.1 * r),
            "input_cost_usd": round(cost_usd(u["input_tokens"], 0, pricing, w, r), 6)}
    out["billed_share_with_caching"] = round(out["with caching"]["billed_input_token_equivalents"]
                                             / out["without caching"]["billed_input_token_equivalents"], 3)
    return out


def bench_batch(base: str, n: int) -> dict:
    async def online() -> None:
        b = AnthropicBackend(model(base), 64)
        await b.start()
        try:
            async def call(i: int) -> None:
                assert (await b.generate(request(i))).error is None
            await gather_limited(n, 64, call)
        finally:
            await b.close()

    async def batch() -> None:
        async with AnthropicBatchProvider(model(base), BatchLimits(100_000, 256_000_000)) as p:
            keys = [(f"row-{i}", 0) for i in range(n)]
            data = b"".join(p.request_line(k, request(i)) + b"\n" for i, k in enumerate(keys))
            ref = await p.upload(data, "bench.jsonl")
            status = await p.create(ref, data, 1)
            while not status.ended:
                await asyncio.sleep(0.05)
                status = await p.status(status.id)
            p.expect(keys)
            parsed = [p.parse_result(line) for line in await p.result_lines(status)]
            assert len(parsed) == n and all(x is not None and x[1].error is None for x in parsed)

    out = {}
    for name, fn in (("online", online), ("message batches", batch)):
        cpu, wall = cpu_wall(fn)
        out[name] = {"client_cpu_ms_per_row": round(1000 * cpu / n, 3), "wall_s": round(wall, 2)}
    out["batch_cpu_share_of_online"] = round(out["message batches"]["client_cpu_ms_per_row"]
                                             / out["online"]["client_cpu_ms_per_row"], 3)
    return out


def serve(port: int, latency_ms: float) -> subprocess.Popen:
    server = subprocess.Popen([sys.executable, "-m", "sft_ray.cli", "serve-mock", "--port", str(port),
                               "--latency-ms", str(latency_ms)], stdout=subprocess.DEVNULL)
    wait_http(f"http://127.0.0.1:{port}/stats")
    return server


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=4000)
    ap.add_argument("--client-requests", type=int, default=2000)
    ap.add_argument("--episodes", type=int, default=50)
    ap.add_argument("--latency-ms", type=float, default=50.0)
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--only", nargs="*", default=["client", "throughput", "caching", "batch"])
    args = ap.parse_args()
    work = tempfile.mkdtemp(prefix="sft-ray-bench-anthropic-")
    fast_port, slow_port = free_port(), free_port()
    fast, slow = serve(fast_port, 0.0), serve(slow_port, args.latency_ms)
    fast_base = f"http://127.0.0.1:{fast_port}"
    results = {"load": open("/proc/loadavg").read().split()[:3]}
    try:
        if "client" in args.only:
            results["client"] = bench_client(fast_base, args.client_requests, 32)
            print(json.dumps({"client": results["client"]}), flush=True)
        if "throughput" in args.only:
            results["throughput"] = bench_throughput(slow_port, work, args.rows, args.concurrency, args.latency_ms)
            print(json.dumps({"throughput": results["throughput"]}), flush=True)
        if "caching" in args.only:
            results["caching"] = bench_caching(fast_base, args.episodes)
            print(json.dumps({"caching": results["caching"]}), flush=True)
        if "batch" in args.only:
            results["batch"] = bench_batch(fast_base, args.client_requests)
            print(json.dumps({"batch": results["batch"]}), flush=True)
    finally:
        for server in (fast, slow):
            server.terminate()
            server.wait()
        shutil.rmtree(work, ignore_errors=True)
    results["load_after"] = open("/proc/loadavg").read().split()[:3]
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
