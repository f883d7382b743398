"""A bare asyncio + aiohttp client against the same mock: what this machine allows today.

The reference for bench/hosted_throughput.py: N chat requests, C at once, against
`sft-ray serve-mock --latency-ms L` (its own process), no Ray, no pipeline. When the
pipeline's numbers move, run this first: a slower machine moves both.

    python bench/bare_client.py --requests 20000 --latency-ms 50 --concurrency 64 256
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
import time

import aiohttp
from hosted_throughput import free_port, wait_http


async def drive(url: str, n: int, c: int) -> float:
    sem = asyncio.Semaphore(c)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=c)) as session:

        async def one(i: int) -> None:
            async with sem:
                async with session.post(url, json={"model": "mock", "messages": [{"role": "user", "content": str(i)}]}) as r:
                    await r.json()

        t0 = time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(n)))
        return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=20_000)
    ap.add_argument("--latency-ms", type=float, default=50.0)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[64, 256])
    args = ap.parse_args()
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "sft_ray.cli", "serve-mock", "--port", str(port),
                               "--latency-ms", str(args.latency_ms)], stdout=subprocess.DEVNULL)
    try:
        wait_http(f"http://127.0.0.1:{port}/stats")
        for c in args.concurrency:
            cpu0 = time.process_time()
            wall = asyncio.run(drive(f"http://127.0.0.1:{port}/v1/chat/completions", args.requests, c))
            limit = c / (args.latency_ms / 1000)
            print(f"concurrency {c}: {args.requests / wall:.1f} requests/s, ratio {args.requests / wall / limit:.3f}, "
                  f"client CPU {1000 * (time.process_time() - cpu0) / args.requests:.3f} ms/request", flush=True)
    finally:
        server.terminate()
        server.wait()


if __name__ == "__main__":
    main()
