"""A local vLLM engine on a CPU: the model inside the engine core (``uni``) against vLLM's default.

    python bench/vllm_start.py --rounds 2 --requests 64 --tokens 128

With ``model.engine_kwargs.distributed_executor_backend: uni`` on a CPU, sft-ray runs the model
inside vLLM's engine core process (setting ``VLLM_ENABLE_V1_MULTIPROCESSING=0``, without which
vLLM's CPU platform turns ``uni`` back into ``mp``); by default vLLM starts one more process, a CPU
worker, for it. Each round starts the embedded model's engine in a fresh Python process both ways,
alternately, through sft-ray's own ``VLLMBackend`` as a generation actor does (``max_num_seqs``
64), and reports:

- ``ready_s``: from the process's start (imports included) to the engine answering;
- ``processes``: the engine's child processes;
- ``tokens_per_s``: ``--requests`` requests of ``--tokens`` tokens at temperature 0 sent at once,
  after the start.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def one(requests: int, tokens: int, executor: str | None) -> None:
    """In a fresh process: start the engine, generate, print one JSON line."""
    t0 = time.time()
    sys.path.insert(0, ROOT)
    import psutil

    from sft_ray.backends.base import GenerationRequest
    from sft_ray.backends.vllm import VLLMBackend

    loop = asyncio.new_event_loop()
    kwargs = {"max_model_len": 1024, "max_num_seqs": 64}
    if executor:
        kwargs["distributed_executor_backend"] = executor
    backend = VLLMBackend({"backend": "vllm", "name": None, "engine_kwargs": kwargs}, requests_per_actor=requests)
    loop.run_until_complete(backend.start())
    ready = time.time() - t0
    children = [p.name() for p in psutil.Process().children(recursive=True)]

    async def generate() -> list:
        return await asyncio.gather(*(backend.generate(GenerationRequest(
            messages=[{"role": "user", "content": f"Write a story about the number {i}."}],
            params={"max_output_tokens": tokens, "temperature": 0.0, "seed": i})) for i in range(requests)))

    t1 = time.time()
    outs = loop.run_until_complete(generate())
    took = time.time() - t1
    errors = [o.error for o in outs if o.error]
    out_tokens = sum(o.usage.get("output_tokens", 0) for o in outs)
    loop.run_until_complete(backend.close())
    print(json.dumps({"ready_s": round(ready, 1), "processes": children, "errors": len(errors),
                      "tokens": out_tokens, "tokens_per_s": round(out_tokens / took, 1)}), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        one(args.requests, args.tokens, None if args.one == "default" else args.one)
        return
    kinds = ("default", "uni")
    results: dict[str, list[dict]] = {k: [] for k in kinds}
    for _ in range(args.rounds):
        for kind in kinds:
            env = {k: v for k, v in os.environ.items() if k != "VLLM_ENABLE_V1_MULTIPROCESSING"}
            out = subprocess.run([sys.executable, __file__, "--one", kind, "--requests", str(args.requests),
                                  "--tokens", str(args.tokens)], env=env, capture_output=True, text=True, check=True)
            row = json.loads(out.stdout.strip().splitlines()[-1])
            results[kind].append(row)
            print(kind, json.dumps(row), flush=True)
    summary = {}
    for key in ("ready_s", "tokens_per_s"):
        a = [r[key] for r in results["uni"]]
        b = [r[key] for r in results["default"]]
        summary[f"{key}_uni_over_default_mean"] = round(sum(a) / sum(b), 3)
        summary[f"{key}_uni_over_default_best"] = round((min(a) / min(b)) if key == "ready_s" else (max(a) / max(b)), 3)
    print(json.dumps({"load": os.getloadavg(), **results, **summary}))


if __name__ == "__main__":
    main()
