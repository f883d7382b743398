"""Reading prompts from Parquet: sft-ray's reader against Ray Data's own ``read_parquet``, one file.

    python bench/parquet_read.py --rows 1000000

Writes one Parquet file of N chat rows (``id``, ``messages``: a system and a user turn as a list of
structs, ``expected_answer``; row groups of 64k rows), then times, side by side in one process:

- ``tabular.iter_rows``: the file's rows as JSON text (what every other step starts from);
- ``scan_input``: the driver's scan (digest, row checks, ids) over the file;
- ``read_samples``: one read task's work (row checks, ids, the sample columns);
- ``make_dataset`` through Ray Data: the read stage as a run uses it (the datasource and the streaming
  repartition into 1024-row blocks), every block consumed on the driver;
- ``ray.data.read_parquet`` consumed as Arrow batches (no Python values: the lower bound on reading);
- ``ray.data.read_parquet`` consumed as Python rows (``iter_rows``: values a verifier or prompt
  builder could use, the comparable work, though with ``None`` for every absent struct key).

Wall seconds for each, and the driver process's CPU seconds for the in-process ones (Ray's read
tasks run in worker processes, so only wall time is comparable for the Ray rows). ``--rounds``
repeats the whole set, alternating, so that a load spike does not fall on one reader only.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402


def write_file(path: str, rows: int) -> None:
    schema = pa.schema([("id", pa.string()),
                        ("messages", pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))),
                        ("expected_answer", pa.string())])
    with pq.ParquetWriter(path, schema) as w:
        for start in range(0, rows, 65536):
            n = min(65536, rows - start)
            ids = [f"row-{i}" for i in range(start, start + n)]
            msgs = [[{"role": "system", "content": "Answer with a number in \\boxed{}."},
                     {"role": "user", "content": f"What is {i} + {i % 97}? Think it through step by step."}]
                    for i in range(start, start + n)]
            answers = [str(i + i % 97) for i in range(start, start + n)]
            w.write_table(pa.table({"id": ids, "messages": msgs, "expected_answer": answers}, schema=schema))


def timed(label: str, fn, rows: int, results: dict) -> None:
    t0, c0 = time.perf_counter(), time.process_time()
    got = fn()
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    assert got == rows, (label, got, rows)
    results.setdefault(label, []).append((wall, cpu))
    print(f"  {label:<44} {wall:7.2f} s wall {cpu:7.2f} s CPU  {rows / wall:>10,.0f} rows/s", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()

    import ray

    from sft_ray import tabular
    from sft_ray.stages.read import make_dataset, read_samples, scan_input

    tmp = tempfile.mkdtemp(prefix="bench-parquet-")
    path = os.path.join(tmp, "prompts.parquet")
    write_file(path, args.rows)
    print(f"{args.rows:,} rows, {os.path.getsize(path) / 1e6:.1f} MB, "
          f"{pq.ParquetFile(path).num_row_groups} row groups; load {os.getloadavg()[0]:.1f}", flush=True)
    for attempt in range(5):  # on a loaded machine the raylet may miss Ray's fixed 30 s start-up wait
        try:
            ray.init(num_cpus=4, include_dashboard=False, configure_logging=False, log_to_driver=False)
            break
        except Exception as e:
            if attempt == 4 or "timed out during startup" not in str(e):
                raise
            print(f"ray.init: {e}; again", flush=True)
            ray.shutdown()
    ray.data.DataContext.get_current().enable_progress_bars = False
    plan = scan_input([path], None, False)

    def ours_rows():
        return sum(1 for _ in tabular.iter_rows(path))

    def ours_scan():
        return scan_input([path], None, False).rows

    def ours_task():
        f = plan.files[0]
        return sum(len(c["id"]) for c in read_samples(path, 1, limit=f.rows, renamed=f.renamed))

    def ours_ray():
        ds = make_dataset(plan.used(), 1, False)
        return sum(b.num_rows for b in ds.iter_batches(batch_format="pyarrow", batch_size=None))

    def ray_arrow():
        ds = ray.data.read_parquet(path)
        return sum(b.num_rows for b in ds.iter_batches(batch_format="pyarrow", batch_size=None))

    def ray_rows():
        return sum(1 for _ in ray.data.read_parquet(path).iter_rows())

    results: dict = {}
    cases = [("sft-ray tabular.iter_rows (JSON text)", ours_rows), ("sft-ray scan_input (driver scan)", ours_scan),
             ("sft-ray read_samples (one read task)", ours_task), ("sft-ray read stage through Ray Data", ours_ray),
             ("ray.data.read_parquet, Arrow batches", ray_arrow), ("ray.data.read_parquet, iter_rows", ray_rows)]
    for r in range(args.rounds):
        print(f"round {r + 1} (load {os.getloadavg()[0]:.1f})", flush=True)
        for label, fn in (cases if r % 2 == 0 else cases[::-1]):
            timed(label, fn, args.rows, results)
    print("\nbest of rounds (wall), and against ray.data.read_parquet + iter_rows:")
    base = min(w for w, _ in results["ray.data.read_parquet, iter_rows"])
    for label, _ in cases:
        wall = min(w for w, _ in results[label])
        print(f"  {label:<44} {wall:7.2f} s  {args.rows / wall:>10,.0f} rows/s  {wall / base:5.2f}x")
    ray.shutdown()


if __name__ == "__main__":
    main()
