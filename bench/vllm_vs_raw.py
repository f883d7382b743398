"""sft-ray's vLLM generation phase against raw ``vllm.LLM.chat``, same prompts, model and sampling.

Both run here, one after the other, each in its own process (one engine at a time
fits the machine): first raw ``LLM.chat`` on all prompts at once, then the real
`sft-ray run` CLI with the vllm backend. Reported: generated tokens per second
while the engine serves (engine start excluded on both sides), and the same
including engine start. Temperature 0, so both produce the same tokens.

    python bench/vllm_vs_raw.py --prompts 256 --max-tokens 64            # embedded model, CPU
    python bench/vllm_vs_raw.py --model /path/to/hf-folder --dtype auto   # e.g. on a GPU
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

RAW = r"""
import json, os, sys, time
t0 = time.time()
from vllm import LLM, SamplingParams
cfg = json.loads(sys.argv[1])
llm = LLM(model=cfg["model"], **cfg["engine"])
t1 = time.time()
sp = SamplingParams(temperature=0.0, top_p=1.0, max_tokens=cfg["max_tokens"])
outs = llm.chat(cfg["messages"], sp, use_tqdm=False)
t2 = time.time()
tokens = sum(len(o.outputs[0].token_ids) for o in outs)
print("RESULT " + json.dumps({"tokens": tokens, "engine_start_s": t1 - t0, "generate_s": t2 - t1}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=256)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--model", default=None, help="HF folder or id (default: the embedded model)")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--max-num-seqs", type=int, default=64)
    args = ap.parse_args()

    from sft_ray.models import resolve_model

    model = resolve_model(args.model)
    engine = {"dtype": args.dtype, "max_model_len": 2048, "max_num_seqs": args.max_num_seqs}
    cpu = args.dtype == "float32"
    if cpu:  # the same CPU settings the vllm backend applies
        engine.update(enforce_eager=True, enable_chunked_prefill=False)
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
        os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    questions = [f"What is {i} + {i * 7 % 13}? Explain briefly." for i in range(args.prompts)]
    messages = [[{"role": "user", "content": q}] for q in questions]

    raw_cfg = {"model": model, "engine": engine, "max_tokens": args.max_tokens, "messages": messages}
    proc = subprocess.run([sys.executable, "-c", RAW, json.dumps(raw_cfg)], capture_output=True, text=True)
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
    if line is None:
        raise SystemExit(f"raw vLLM failed:\n{proc.stderr[-3000:]}")
    raw = json.loads(line[7:])

    with tempfile.TemporaryDirectory(prefix="sft-ray-bench-") as work:
        inp = os.path.join(work, "prompts.jsonl")
        with open(inp, "w") as f:
            for m in messages:
                f.write(json.dumps({"messages": m}) + "\n")
        cfgf = os.path.join(work, "c.yaml")
        open(cfgf, "w").write(json.dumps({
            "input": inp, "output": os.path.join(work, "run"),
            "model": {"backend": "vllm", "name": args.model, "engine_kwargs": engine},
            "responses_create_params": {"temperature": 0.0, "top_p": 1.0, "max_output_tokens": args.max_tokens},
            "num_samples_in_parallel": 4 * args.max_num_seqs, "verifier": {"type": "none"}}))
        t0 = time.time()
        run = subprocess.run([sys.executable, "-m", "sft_ray.cli", "run", cfgf], capture_output=True, text=True)
        wall = time.time() - t0
        if run.returncode != 0:
            raise SystemExit(f"sft-ray run failed:\n{run.stdout[-2000:]}\n{run.stderr[-3000:]}")
        session = json.load(open(os.path.join(work, "run", "run.json")))["sessions"][-1]

    raw_tps = raw["tokens"] / raw["generate_s"]
    sft_tps = session["output_tokens"] / session["generate_after_ready_s"]
    raw_all = raw["tokens"] / (raw["generate_s"] + raw["engine_start_s"])
    sft_all = session["output_tokens"] / session["generate_wall_s"]
    result = {"prompts": args.prompts, "max_tokens": args.max_tokens, "model": model,
              "raw_tokens": raw["tokens"], "sft_ray_tokens": session["output_tokens"],
              "raw_tokens_per_s": round(raw_tps, 1), "sft_ray_tokens_per_s": round(sft_tps, 1),
              "ratio": round(sft_tps / raw_tps, 3),
              "raw_engine_start_s": round(raw["engine_start_s"], 1),
              "raw_tokens_per_s_with_start": round(raw_all, 1),
              "sft_ray_tokens_per_s_with_start": round(sft_all, 1),
              "ratio_with_start": round(sft_all / raw_all, 3), "sft_ray_command_wall_s": round(wall, 1)}
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
