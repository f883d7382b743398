"""Scale: N rows through the whole pipeline against the local mock server (no latency),
peak memory of the whole job, and the finalize phase against `jq | shuf`.

    python bench/scale.py --rows 1000000
    python bench/scale.py --rows 100000 --rows 1000000     # peak memory at two sizes

For each size: rows/s of the generate phase (read, generate, score, write), of the
finalize phase (filter, global shuffle, sharded write, stats) and in total; the peak
memory of the job's whole process tree (driver and every Ray process), summed as PSS so
that the shared object store is counted once. Then, on the last size's rollouts, the
hand-written recipe `jq -c 'select(.reward >= 0.8)' rollouts/*.jsonl | shuf > train.jsonl`
against `sft-ray filter RUN --min-reward 0.8`, timed alternately, with a check that both
produce the same multiset of rows.

    python bench/scale.py --finalize-only --rows 100000 --rows 1000000

Finalize alone, on run folders of synthetic rollouts written directly (4 samples per prompt,
no generation): `sft-ray filter` as above, then with the curation of issue 11
(`--dedup exact --max-per-prompt 2 --validation-fraction 0.05`), each with the peak memory of
its process, against `jq | shuf`.
"""

from __future__ import annotations

import argparse
import collections
import glob
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time

import psutil

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from hosted_throughput import free_port, wait_http  # noqa: E402


class PeakMemory:
    """Samples the PSS of a process and all its descendants."""

    def __init__(self, pid: int, every_s: float = 1.0) -> None:
        self.pid, self.every_s, self.peak, self.peak_procs = pid, every_s, 0, 0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                root = psutil.Process(self.pid)
                procs = [root] + root.children(recursive=True)
            except psutil.Error:
                break
            total = 0
            for p in procs:
                try:
                    total += p.memory_full_info().pss
                except psutil.Error:
                    pass
            if total > self.peak:
                self.peak, self.peak_procs = total, len(procs)
            self._stop.wait(self.every_s)

    def __enter__(self):
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()


def write_input(path: str, n: int) -> None:
    with open(path, "w") as f:
        for i in range(n):
            answer = f"a{i}" if i % 10 < 7 else "other"  # the echo matches 70% of the time
            f.write(json.dumps({"responses_create_params": {"input": [
                {"role": "system", "content": "Answer with the token only."},
                {"role": "user", "content": f"a{i}"}]}, "expected_answer": answer,
                "meta": {"source": "bench", "n": i}}) + "\n")


def run_job(work: str, inp: str, port: int, n: int, concurrency: int) -> dict:
    out = os.path.join(work, f"run-{n}")
    cfg = os.path.join(work, "c.yaml")
    with open(cfg, "w") as f:
        json.dump({"input": inp, "output": out, "model": {"name": "mock", "base_url": f"http://127.0.0.1:{port}/v1"},
                   "num_samples_in_parallel": concurrency, "verifier": {"type": "exact_match"},
                   "filter": {"min_reward": 0.8}, "train": {"rows_per_shard": 100_000},
                   "resources": {"ray_address": "local"}}, f)
    t0 = time.time()
    proc = subprocess.Popen([sys.executable, "-m", "sft_ray.cli", "run", cfg],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    with PeakMemory(proc.pid) as mem:
        output = proc.communicate()[0]
    wall = time.time() - t0
    if proc.returncode != 0:
        raise SystemExit(f"run failed ({proc.returncode}):\n{output[-3000:]}")
    session = json.load(open(os.path.join(out, "run.json")))["sessions"][-1]
    stats = json.load(open(os.path.join(out, "stats.json")))
    gen, fin = session["generate_wall_s"], stats["finalize_wall_s"]
    return {"rows": n, "generate_rows_per_s": round(n / gen, 1), "generate_s": round(gen, 1),
            "steady_generate_rows_per_s": session.get("steady_samples_per_s"),
            "finalize_rows_per_s": round(n / fin, 1), "finalize_s": round(fin, 1),
            "total_rows_per_s": round(n / wall, 1), "command_wall_s": round(wall, 1),
            "peak_pss_mb": round(mem.peak / 2**20), "processes_at_peak": mem.peak_procs,
            "kept": stats["kept"], "failed": stats["failed"], "run_dir": out}


def canon(line: bytes) -> bytes:
    return json.dumps(json.loads(line)["messages"], sort_keys=True).encode()


def compare_with_jq(run_dir: str, work: str, rounds: int) -> dict:
    rollouts = sorted(glob.glob(os.path.join(run_dir, "rollouts", "*.jsonl")))
    jq_out = os.path.join(work, "train-jq.jsonl")
    jq_cmd = f"jq -c 'select(.reward >= 0.8)' {' '.join(rollouts)} | shuf > {jq_out}"
    sft_cmd = [sys.executable, "-m", "sft_ray.cli", "filter", run_dir, "--min-reward", "0.8"]
    jq_times, sft_times = [], []
    for _ in range(rounds):  # alternate, so that machine noise hits both alike
        t0 = time.time()
        subprocess.run(jq_cmd, shell=True, check=True)
        jq_times.append(time.time() - t0)
        t0 = time.time()
        subprocess.run(sft_cmd, check=True, stdout=subprocess.DEVNULL)
        sft_times.append(time.time() - t0)
    with open(jq_out, "rb") as f:
        jq_rows = collections.Counter(canon(line) for line in f)
    sft_rows = collections.Counter()
    for shard in sorted(glob.glob(os.path.join(run_dir, "train", "*.jsonl"))):
        with open(shard, "rb") as f:
            sft_rows.update(canon(line) for line in f)
    return {"jq_shuf_s": [round(t, 2) for t in jq_times], "sft_ray_filter_s": [round(t, 2) for t in sft_times],
            "speedup_best": round(min(jq_times) / min(sft_times), 2),
            "same_multiset": jq_rows == sft_rows, "rows": sum(sft_rows.values())}


def write_rollouts(run_dir: str, n: int, repeats: int = 4, files: int = 8) -> None:
    """n rollouts shaped like the mock's (echo replies), `repeats` samples per prompt, 70% with reward 1."""
    os.makedirs(os.path.join(run_dir, "rollouts"))
    outs = [open(os.path.join(run_dir, "rollouts", f"part-000-{k:05d}.jsonl"), "w") for k in range(files)]
    for i in range(n):
        p, k = divmod(i, repeats)
        reply = f"a{p}" if k % 2 else f"a{p} (sample {k})"
        row = {"expected_answer": f"a{p}", "meta": {"source": "bench", "n": p}, "id": f"{p:016x}",
               "sample_index": k, "messages": [{"role": "system", "content": "Answer with the token only."},
                                               {"role": "user", "content": f"a{p}"},
                                               {"role": "assistant", "content": reply}],
               "response": reply, "reward": 1.0 if i % 10 < 7 else 0.0, "finish_reason": "stop",
               "usage": {"input_tokens": 12, "output_tokens": 3, "total_tokens": 15}, "model": "mock",
               "sampling_params": {"temperature": 1.0, "top_p": 1.0, "max_output_tokens": 1024, "seed": i},
               "attempts": 1, "error": None, "node_id": "0" * 56, "latency_s": 0.01, "accuracy": 1.0}
        outs[i % files].write(json.dumps(row) + "\n")
    for f in outs:
        f.close()
    with open(os.path.join(run_dir, "run.json"), "w") as f:
        # Session 0 recorded, as a run records it: finalize checks each part file's session against it.
        json.dump({"config": {"filter": {"min_reward": 0.8}, "train": {"rows_per_shard": 100_000},
                              "shuffle": {"seed": 0}}, "sessions": [{"session": 0}]}, f)


def children_cpu() -> float:
    """CPU seconds (user + system) of every child process waited for so far: on a shared, loaded
    machine a steadier measure than wall time."""
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def finalize_cmd(run_dir: str, bucket_mb: float, curated: bool) -> list[str]:
    """Finalize alone in a fresh process, with smaller buckets: what a run 1024 / bucket_mb times
    larger does with the default ones (256 MB shuffle, 64 MB prompt buckets)."""
    flt = {"min_reward": 0.8, **({"dedup": "exact"} if curated else {})}
    train = {"rows_per_shard": 100_000, **({"max_per_prompt": 2, "validation_fraction": 0.05} if curated else {})}
    code = (f"from sft_ray.finalize import passes as f; f.BUCKET_BYTES = int({bucket_mb} * 2**20); "
            f"f.GROUP_BUCKET_BYTES = int({bucket_mb} * 2**18); f.finalize({run_dir!r}, {flt!r}, 0, {train!r})")
    return [sys.executable, "-c", code]


def timed_filter(run_dir: str, extra: list[str], bucket_mb: float | None = None) -> dict:
    cmd = [sys.executable, "-m", "sft_ray.cli", "filter", run_dir, "--min-reward", "0.8", *extra]
    if bucket_mb:
        cmd = finalize_cmd(run_dir, bucket_mb, curated="--dedup" in extra and "exact" in extra)
    t0, c0 = time.time(), children_cpu()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL)
    with PeakMemory(proc.pid, every_s=0.2) as mem:
        proc.wait()
    if proc.returncode != 0:
        raise SystemExit(f"{cmd} failed ({proc.returncode})")
    out = {"s": round(time.time() - t0, 2), "cpu_s": round(children_cpu() - c0, 2),
           "peak_pss_mb": round(mem.peak / 2**20)}
    if bucket_mb:
        return out
    stats = json.load(open(os.path.join(run_dir, "stats.json")))
    return {**out, "train_rows": stats["train_rows"], "validation": stats["validation"],
            "drops": stats["drops_by_reason"]}


def finalize_only(sizes: list[int], rounds: int, work: str, bucket_mb: float | None) -> None:
    plain = ["--dedup", "none", "--validation-fraction", "0", "train.max_per_prompt=null"]  # filter saves its cut
    curated = ["--dedup", "exact", "--max-per-prompt", "2", "--validation-fraction", "0.05"]
    for n in sizes:
        run_dir = os.path.join(work, f"fin-{n}")
        write_rollouts(run_dir, n)
        rollouts = sorted(glob.glob(os.path.join(run_dir, "rollouts", "*.jsonl")))
        jq_cmd = f"jq -c 'select(.reward >= 0.8)' {' '.join(rollouts)} | shuf > {os.path.join(work, 'jq.jsonl')}"
        res: dict = {"rows": n, "jq_shuf": [], "filter": [], "curated": []}
        for _ in range(rounds):  # alternate, so that machine noise hits all three alike
            t0, c0 = time.time(), children_cpu()
            subprocess.run(jq_cmd, shell=True, check=True)
            res["jq_shuf"].append({"s": round(time.time() - t0, 2), "cpu_s": round(children_cpu() - c0, 2)})
            res["filter"].append(timed_filter(run_dir, plain, bucket_mb))
            res["curated"].append(timed_filter(run_dir, curated, bucket_mb))
        for what in ("s", "cpu_s"):
            best = min(r[what] for r in res["jq_shuf"])
            res[f"speedup_filter_{what}"] = round(best / min(r[what] for r in res["filter"]), 2)
            res[f"speedup_curated_{what}"] = round(best / min(r[what] for r in res["curated"]), 2)
        print(json.dumps(res), flush=True)
        shutil.rmtree(run_dir, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, action="append", help="input sizes (repeatable); default 1000000")
    ap.add_argument("--concurrency", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=2, help="alternating rounds of jq vs sft-ray filter")
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--finalize-only", action="store_true", help="finalize alone, on synthetic rollouts")
    ap.add_argument("--bucket-mb", type=float, help="--finalize-only: shuffle buckets of this size (prompt buckets "
                    "a quarter of it), finalize called directly, to see memory stay flat on a small machine")
    args = ap.parse_args()
    sizes = args.rows or [1_000_000]
    work = tempfile.mkdtemp(prefix="sft-ray-scale-")
    if args.finalize_only:
        try:
            finalize_only(sizes, args.rounds, work, args.bucket_mb)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        return
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "sft_ray.cli", "serve-mock", "--port", str(port)],
                              stdout=subprocess.DEVNULL)
    try:
        wait_http(f"http://127.0.0.1:{port}/stats")
        results = []
        for n in sizes:
            inp = os.path.join(work, f"in-{n}.jsonl")
            write_input(inp, n)
            results.append(run_job(work, inp, port, n, args.concurrency))
            print(json.dumps(results[-1]), flush=True)
        server.terminate()
        cmp = compare_with_jq(results[-1]["run_dir"], work, args.rounds)
        print(json.dumps({"finalize_vs_jq_shuf": cmp}), flush=True)
    finally:
        server.terminate()
        server.wait()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
