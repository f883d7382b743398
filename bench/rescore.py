"""`sft-ray rescore` with a cheap verifier against the hand-written recipe over the same rollouts.

    python bench/rescore.py --rows 1000000

Writes N synthetic rollouts (bench/scale.py's: 4 samples per prompt, mock-shaped rows) in a
run folder scored with `verifier.type: none`, then, alternating for ``--rounds`` rounds:

- ``sft-ray rescore RUN verifier.type=exact_match`` in a fresh process (lock, durable
  rescore journal, swap, then finalize: train/, stats.json), on a fresh copy of the folder;
- the recipe: ``jq -c '.previous = {reward, metrics}' rollouts/*.jsonl | python scorer >
  rescored.jsonl``, where the scorer applies the same ExactMatch verifier class per line
  (no durability, no train/ or stats).

Prints wall and CPU seconds of each, the rows/s of rescore's scoring phase (from run.json's
``rescores`` record) and of the whole command, and checks that both give the same rewards.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from scale import write_rollouts  # noqa: E402

SCORER = r"""
import sys, orjson
from sft_ray.verifiers.exact_match import ExactMatch
v = ExactMatch({"answer_field": "expected_answer"})
out = sys.stdout.buffer
for line in sys.stdin.buffer:
    r = orjson.loads(line)
    res = v(r, r.get("response") or "")
    r["reward"] = res["reward"]
    r["metrics"] = {"accuracy": res["accuracy"]}
    out.write(orjson.dumps(r) + b"\n")
"""


def children_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def make_run(run_dir: str, n: int) -> None:
    write_rollouts(run_dir, n)
    cfg = {"input": os.path.join(run_dir, "in.jsonl"), "output": run_dir, "model": {"name": "mock"},
           "verifier": {"type": "none"}, "filter": {"min_reward": 0.8}, "train": {"rows_per_shard": 100_000},
           "shuffle": {"seed": 0}}
    with open(os.path.join(run_dir, "run.json"), "w") as f:
        json.dump({"fingerprint": {"verifier": {"type": "none"}}, "config": cfg, "sessions": []}, f)


def timed(cmd: list[str] | str, shell: bool = False) -> dict:
    t0, c0 = time.time(), children_cpu()
    subprocess.run(cmd, shell=shell, check=True, stdout=subprocess.DEVNULL)
    return {"s": round(time.time() - t0, 2), "cpu_s": round(children_cpu() - c0, 2)}


def rewards(files: list[str]) -> dict:
    out = {}
    for path in files:
        with open(path, "rb") as f:
            for line in f:
                r = json.loads(line)
                out[r["id"], r["sample_index"]] = r["reward"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--work", default=None)
    args = ap.parse_args()
    work = args.work or tempfile.mkdtemp(prefix="sft-ray-bench-rescore-")
    base = os.path.join(work, "base")
    shutil.rmtree(base, ignore_errors=True)
    make_run(base, args.rows)
    for rnd in range(args.rounds):
        run = os.path.join(work, "run")
        shutil.rmtree(run, ignore_errors=True)
        shutil.copytree(base, run)
        ours = timed([sys.executable, "-m", "sft_ray.cli", "rescore", run, "verifier.type=exact_match"])
        record = json.load(open(os.path.join(run, "run.json")))["rescores"][-1]
        out = os.path.join(work, "recipe.jsonl")
        recipe = timed(f"jq -c '.previous = {{reward: .reward, metrics: .metrics}}' {base}/rollouts/*.jsonl "
                       f"| {sys.executable} -c '{SCORER}' > {out}", shell=True)
        if rnd == 0:
            got = rewards([os.path.join(run, "rollouts", f) for f in os.listdir(os.path.join(run, "rollouts"))])
            assert got == rewards([out]) and len(got) == args.rows, "the two disagree"
        print(json.dumps({"rows": args.rows, "round": rnd,
                          "rescore": {**ours, "rows_per_s": round(args.rows / ours["s"]),
                                      "scoring_s": record["wall_s"], "scoring_cpu_s": record["cpu_s"],
                                      "scoring_rows_per_s": record["rows_per_s"]},
                          "jq_python": {**recipe, "rows_per_s": round(args.rows / recipe["s"])}}), flush=True)
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
