"""Decontamination: finalize with and without it, against a plain-Python reference, and its
recall and false positives on a labelled set.

    python bench/decontaminate.py --rows 1000000 --items 10000 --rounds 2

1. A benchmark of ``--items`` word problems made from templates with many slots (names, objects,
   numbers, places), and a run folder of ``--rows`` rollouts (4 samples per prompt) whose prompts
   come from the same templates with other fills: an instruction, the question, and a reply of
   about 80 words. 0.5% of the prompts are benchmark items, and 0.5% of the replies quote one.
2. `sft-ray filter RUN` in a fresh process, without and with `decontaminate.against=bench.jsonl`,
   alternately (``--rounds`` each): wall time and CPU (the process and its workers). "with" twice:
   as a run's own finalize is (run.json records that the input scan checked the prompts against the
   same index, so finalize checks the replies only), and as a re-cut with a benchmark the run never
   saw (``recut``: prompts and replies checked).
3. The same rows checked in this process, one core: sft-ray's index (parse, prompt and reply
   checked) against a reference written as open-r1's `scripts/decontaminate.py` does it (lower
   case, whitespace collapsed, a Python set of word n-gram strings; ``n`` = 13 for both).
4. A labelled set: benchmark items verbatim, reformatted (case, punctuation, line breaks,
   spacing, Markdown), embedded in longer instructions, and clean prompts from the same
   templates: recall and false positives of both.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time

import orjson

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from sft_ray.decontaminate import RowCheck, build_index, held_back_record, write_index  # noqa: E402

NAMES = [f"{a}{b}" for a in ("Al", "Be", "Ca", "Da", "El", "Fa", "Gi", "Ha", "Io", "Ju", "Ka", "Li", "Mo", "Ni",
                             "Ol", "Pe", "Qu", "Ro", "Sa", "Te") for b in ("na", "ric", "lo", "mira", "tan", "vin",
                                                                            "dra", "son", "lia", "bert")]
THINGS = ["apples", "marbles", "stickers", "pencils", "cookies", "books", "shells", "coins", "cards", "stamps",
          "beads", "toys", "cupcakes", "flowers", "rocks", "candles", "buttons", "ribbons", "kites", "puzzles"] * 2
THINGS = [f"{c} {t}" for c in ("red", "blue", "green", "small", "large", "old", "new", "shiny", "wooden", "paper")
          for t in THINGS[:20]]
PLACES = [f"the {a} {b}" for a in ("north", "south", "east", "west", "old", "new", "big", "little", "main", "upper")
          for b in ("market", "school", "park", "library", "farm", "harbor", "garden", "museum", "station", "mall")]
TEMPLATES = [
    "{n1} bought {a} {t1} at {p1} on Monday and {b} more {t2} at {p2} on Friday. Then {n2} gave {n1} {c} {t1}. "
    "How many {t1} and {t2} does {n1} have now?",
    "At {p1} there are {a} {t1} in each box and {b} boxes. {n1} takes {c} {t1} to {p2} and {n2} brings back "
    "{d} {t2}. How many {t1} are left at {p1}?",
    "{n1} reads {a} pages of {t1} every day at {p1} while {n2} reads {b} pages at {p2}. After {c} days, how many "
    "more pages has {n1} read than {n2}, counting the {d} pages of {t2}?",
    "A train leaves {p1} with {a} passengers carrying {t1}. At {p2}, {b} get off and {c} get on with {t2}. "
    "{n1} counts {d} of them near {p1}, so how many did {n2} miss?",
    "{n1} saves {a} dollars a week for {t1} from {p1}, and {n2} saves {b} dollars a week for {t2} from {p2}. "
    "The {t1} cost {c} dollars and the {t2} cost {d} dollars. Can {n2} buy first, and after how many weeks?",
]
INSTRUCTIONS = ["Solve the problem step by step and put the final answer in \\boxed{{}}.\n\n{q}",
                "{q}\nExplain your reasoning briefly, then give the answer.",
                "You are a careful math tutor. Read the question below and answer it.\n\nQuestion: {q}\nAnswer:",
                "Please help with my homework: {q} Thanks a lot!"]


def question(rng: random.Random) -> str:
    t1, t2 = rng.sample(THINGS, 2)
    p1, p2 = rng.sample(PLACES, 2)
    n1, n2 = rng.sample(NAMES, 2)
    return rng.choice(TEMPLATES).format(n1=n1, n2=n2, t1=t1, t2=t2, p1=p1, p2=p2, a=rng.randint(2, 999),
                                        b=rng.randint(2, 999), c=rng.randint(2, 999), d=rng.randint(2, 999))


def reply(rng: random.Random, q: str) -> str:
    words = q.split()
    steps = [f"Step {i + 1}: we take {rng.choice(words)} and {rng.choice(words)}, which gives {rng.randint(1, 9999)}."
             for i in range(6)]
    return " ".join(steps) + f" So the answer is \\boxed{{{rng.randint(1, 9999)}}}."


def reformat(rng: random.Random, q: str) -> str:
    ops = [lambda s: s.upper(), lambda s: s.replace(". ", ".\n\n"), lambda s: s.replace(" ", "  "),
           lambda s: s.replace(",", " ,").replace("?", " ?"), lambda s: "**" + s.replace(". ", "**. **") + "**",
           lambda s: s.replace(" and ", " and\n")]
    for op in rng.sample(ops, 3):
        q = op(q)
    return q


def embed(rng: random.Random, q: str) -> str:
    return rng.choice(INSTRUCTIONS).format(q=q) + " " + reply(rng, q)[:120]


def write_benchmark(path: str, items: int, rng: random.Random) -> list[str]:
    qs = [question(rng) for _ in range(items)]
    with open(path, "w") as f:
        for q in qs:
            f.write(json.dumps({"question": q, "answer": str(rng.randint(1, 9999))}) + "\n")
    return qs


def write_rollouts(run_dir: str, rows: int, bench: list[str], rng: random.Random, files: int = 8) -> int:
    """``rows`` rollouts, 4 per prompt; returns how many contain benchmark text."""
    os.makedirs(os.path.join(run_dir, "rollouts"))
    outs = [open(os.path.join(run_dir, "rollouts", f"part-000-{k:05d}.jsonl"), "wb") for k in range(files)]
    dirty = 0
    for p in range(rows // 4):
        bad_prompt = rng.random() < 0.005
        q = rng.choice(bench) if bad_prompt else question(rng)
        prompt = rng.choice(INSTRUCTIONS).format(q=q)
        for k in range(4):
            r = reply(rng, q)
            if not bad_prompt and rng.random() < 0.005:
                r = f"This looks like a known problem: {rng.choice(bench)} " + r
                dirty += 1
            dirty += bad_prompt
            row = {"id": f"{p:016x}", "sample_index": k, "expected_answer": "7",
                   "messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": r}],
                   "response": r, "reward": 1.0 if rng.random() < 0.7 else 0.0, "finish_reason": "stop",
                   "usage": {"input_tokens": 60, "output_tokens": 120, "total_tokens": 180}, "model": "mock",
                   "sampling_params": {"temperature": 1.0, "seed": p * 4 + k}, "attempts": 1, "error": None}
            outs[(p * 4 + k) % files].write(orjson.dumps(row) + b"\n")
    for f in outs:
        f.close()
    with open(os.path.join(run_dir, "run.json"), "w") as f:
        json.dump({"config": {"filter": {"min_reward": 0.5}, "train": {"rows_per_shard": 100_000},
                              "shuffle": {"seed": 0}}, "sessions": [{"session": 0}]}, f)
    return dirty


def scanned(run_dir: str, record: dict | None) -> None:
    """run.json's record of what the run's input scan checked (``decontamination``), or none."""
    path = os.path.join(run_dir, "run.json")
    with open(path) as f:
        manifest = json.load(f)
    manifest.pop("decontamination", None)
    if record is not None:
        manifest["decontamination"] = record
    with open(path, "w") as f:
        json.dump(manifest, f)


def children_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def timed_filter(run_dir: str, extra: list[str]) -> dict:
    cmd = [sys.executable, "-m", "sft_ray.cli", "filter", run_dir, *extra]
    t0, c0 = time.time(), children_cpu()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    stats = json.load(open(os.path.join(run_dir, "stats.json")))
    return {"s": round(time.time() - t0, 2), "cpu_s": round(children_cpu() - c0, 2),
            "contaminated": stats["drops_by_reason"].get("contaminated", 0), "train_rows": stats["train_rows"]}


# -- the reference: open-r1's scripts/decontaminate.py, its n-gram set -----------------------


def normalize_string(text: str) -> str:
    """open-r1: lower case, whitespace collapsed."""
    return " ".join(text.lower().strip().split())


def word_ngrams(text: str, n: int) -> list[str]:
    words = text.split()
    return [" ".join(words[i:i + n]) for i in range(len(words) - n + 1)]


class Reference:
    def __init__(self, docs: list[str], n: int) -> None:
        self.n = n
        self.lookup: set[str] = set()
        for d in docs:
            self.lookup.update(word_ngrams(normalize_string(d), n))

    def __call__(self, text: str) -> bool:
        return any(g in self.lookup for g in word_ngrams(normalize_string(text), self.n))


def in_process(run_dir: str, index_path: str, ref: Reference) -> dict:
    """Parse every rollout and check its prompt and reply: sft-ray's RowCheck against the reference,
    one core each, the same rows."""
    files = sorted(os.path.join(run_dir, "rollouts", f) for f in os.listdir(os.path.join(run_dir, "rollouts")))

    def lines():
        for path in files:
            with open(path, "rb") as f:
                yield from f

    t0 = time.process_time()
    check = RowCheck(index_path)
    ours = sum(hit is not None for _, _, hit, _ in check.rows(
        lines(), lambda r: r["messages"][0]["content"], lambda r: r["response"]))
    ours_s = time.process_time() - t0
    t0 = time.process_time()
    theirs = 0
    for line in lines():
        row = orjson.loads(line)
        theirs += ref(row["messages"][0]["content"]) or ref(row["response"])
    ref_s = time.process_time() - t0
    return {"sft_ray_cpu_s": round(ours_s, 2), "reference_cpu_s": round(ref_s, 2), "sft_ray_found": ours,
            "reference_found": theirs, "speedup": round(ref_s / ours_s, 2)}


def labelled(bench: list[str], index_path: str, ref: Reference, rng: random.Random, per_kind: int) -> dict:
    from sft_ray.decontaminate import load_index

    index = load_index(index_path)
    known = set(bench)
    picks = rng.sample(bench, 3 * per_kind)
    sets = {"verbatim": picks[:per_kind],
            "reformatted": [reformat(rng, q) for q in picks[per_kind:2 * per_kind]],
            "embedded": [embed(rng, q) for q in picks[2 * per_kind:]]}
    clean = []
    while len(clean) < 4 * per_kind:
        q = question(rng)
        if q not in known:
            clean.append(rng.choice(INSTRUCTIONS).format(q=q))
    out: dict = {}
    for name, fn in (("sft_ray", lambda ts: [h is not None for h in index.check(ts)]),
                     ("reference", lambda ts: [ref(t) for t in ts])):
        res = {kind: round(sum(fn(ts)) / len(ts), 4) for kind, ts in sets.items()}
        pos = sum(sum(fn(ts)) for ts in sets.values())
        res["recall"] = round(pos / (3 * per_kind), 4)
        res["false_positives"] = round(sum(fn(clean)) / len(clean), 4)
        out[name] = res
    out["sizes"] = {"positives": 3 * per_kind, "clean": len(clean)}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--items", type=int, default=10_000)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--ngram", type=int, default=13)
    ap.add_argument("--labelled", type=int, default=2000, help="labelled items per positive kind (clean: 4x)")
    ap.add_argument("--finalize-only", action="store_true",
                    help="only part 2 (finalize with and without), for a size where parts 3-4 take too long")
    args = ap.parse_args()
    rng = random.Random(0)
    with tempfile.TemporaryDirectory(prefix="bench-decontam-") as work:
        bench_path = os.path.join(work, "bench.jsonl")
        bench = write_benchmark(bench_path, args.items, rng)
        run_dir = os.path.join(work, "run")
        dirty = write_rollouts(run_dir, args.rows, bench, rng)
        mb = sum(os.path.getsize(os.path.join(run_dir, "rollouts", f))
                 for f in os.listdir(os.path.join(run_dir, "rollouts"))) / 1e6
        print(json.dumps({"rows": args.rows, "rollouts_mb": round(mb), "items": args.items,
                          "rows_with_benchmark_text": dirty, "load": os.getloadavg()}), flush=True)
        index = build_index([bench_path], args.ngram)
        res: dict = {"without": [], "with": [], "with_recut": []}
        against = [f"decontaminate.against={bench_path}", f"decontaminate.ngram={args.ngram}"]
        for _ in range(args.rounds):
            # Explicitly none: a re-cut keeps its settings in run.json for the next one.
            res["without"].append(timed_filter(run_dir, ["decontaminate.against=[]"]))
            scanned(run_dir, held_back_record(index, []))  # as the run's scan records it
            res["with"].append(timed_filter(run_dir, against))
            scanned(run_dir, None)  # benchmarks the run's scan never saw
            res["with_recut"].append(timed_filter(run_dir, against))
        for what in ("s", "cpu_s"):
            for kind in ("with", "with_recut"):
                res[f"slowdown_{kind}_{what}_best"] = round(min(r[what] for r in res[kind])
                                                            / min(r[what] for r in res["without"]), 3)
                res[f"slowdown_{kind}_{what}_mean"] = round(sum(r[what] for r in res[kind])
                                                            / sum(r[what] for r in res["without"]), 3)
        print(json.dumps({"finalize": res}), flush=True)
        if args.finalize_only:
            return
        index_path = write_index(index, work)
        t0 = time.process_time()
        ref = Reference(bench, args.ngram)
        print(json.dumps({"index": {"bytes": index.nbytes, "reference_set_entries": len(ref.lookup),
                                    "reference_build_cpu_s": round(time.process_time() - t0, 2)}}), flush=True)
        print(json.dumps({"check_one_core": in_process(run_dir, index_path, ref)}), flush=True)
        print(json.dumps({"labelled": labelled(bench, index_path, ref, rng, args.labelled)}), flush=True)
        print(json.dumps({"load_after": os.getloadavg()}), flush=True)


if __name__ == "__main__":
    main()
