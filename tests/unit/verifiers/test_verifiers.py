"""Every verifier on real cases (math-verify runs for real)."""

from __future__ import annotations

import pytest
from conftest import score_one

from sft_ray.stages.score import ScoreStage
from sft_ray.verifiers import build_verifier
from sft_ray.verifiers.mcq import extract_letter


def v(type_, **kw):
    return build_verifier({"type": type_, "answer_field": "expected_answer", "options": {}, **kw})


@pytest.mark.parametrize("response, expected, reward", [
    ("The answer is \\boxed{5}.", "5", 1.0),
    ("So $x = \\frac{1}{2}$, i.e. \\boxed{\\frac{1}{2}}", "0.5", 1.0),
    ("\\boxed{\\frac{3}{4}}", "3/4", 1.0),
    ("We get \\boxed{2\\sqrt{2}}", "\\sqrt{8}", 1.0),
    ("Thus the result is \\boxed{322372}", "322372", 1.0),
    ("\\boxed{7}", "5", 0.0),
    ("I do not know.", "5", 0.0),
])
def test_math(response, expected, reward):
    out = v("math")({"expected_answer": expected}, response)
    assert out["reward"] == reward
    assert out["accuracy"] == reward


@pytest.mark.parametrize("response, expected, reward", [
    ("Paris", "paris", 1.0),
    ("  Paris. ", "Paris", 1.0),
    ("Let me think.\nAnswer: New   York", "new york", 1.0),
    ("\\boxed{42}", "42", 1.0),
    ("London", "Paris", 0.0),
    ("The capital is Paris", "Paris", 0.0),  # not an exact match of the answer
])
def test_exact_match(response, expected, reward):
    assert v("exact_match")({"expected_answer": expected}, response)["reward"] == reward


def test_exact_match_accepts_a_list_of_references():
    assert v("exact_match")({"expected_answer": ["NYC", "New York"]}, "new york")["reward"] == 1.0


# Real-world phrasings of a multiple-choice answer (issue 9.10: "C. I'm confident." read as choice I).
MCQ_PHRASINGS = [
    ("Answer: B", "B"), ("The answer is (B)", "B"), ("**B**", "B"), ("Answer: B) Paris", "B"),
    ("I think it's C", "C"), ("C. I'm confident.", "C"), ("B and not A", "B"), ("the answer is b", "B"),
    ("answer: (d)", "D"), ("I'd go with D.", "D"), ("Option C is correct.", "C"), ("The correct option is (C).", "C"),
    ("I think a good choice is B", "B"), ("\\boxed{D}", "D"), ("The answer is \\boxed{\\text{B}}", "B"),
    ("Final answer: **A**", "A"), ("**Answer:** C", "C"), ("(A) 42", "A"), ("b) Paris", "B"), ("It is B.", "B"),
    ("I am not sure, but I would pick E", "E"), ("Between A and C, C is correct.", "C"),
    ("After eliminating A and D, I choose B.", "B"), ("I'm fairly sure the answer is A.", "A"),
    ("Let me think.\nB\n", "B"), ("A good guess would be C", "C"), ("A", "A"), ("a", "A"),
    ("Answer: I", "I"), ("My pick: (I)", "I"),
    ("none of these", None), ("I don't know.", None), ("The answer is a bit unclear", None),
]


@pytest.mark.parametrize("response, letter", MCQ_PHRASINGS)
def test_mcq_phrasings(response, letter):
    assert extract_letter(response) == letter
    mcq = v("mcq")
    assert mcq({"expected_answer": letter or "B"}, response)["reward"] == float(letter is not None)
    assert mcq({"expected_answer": "J"}, response)["reward"] == 0.0


def test_mcq_letters_limited_to_the_rows_options():
    row = {"expected_answer": "B", "options": ["x", "y", "z"]}
    assert extract_letter("Answer: E", "ABC") is None
    assert v("mcq")(row, "Option E, I mean B")["reward"] == 1.0


def test_mcq_reference_given_as_option_text():
    row = {"expected_answer": "Mars", "options": ["Venus", "Mars", "Earth"]}
    assert v("mcq")(row, "Answer: B")["reward"] == 1.0
    row = {"expected_answer": "Mars", "options": {"A": "Mars", "B": "Venus"}}
    assert v("mcq")(row, "Answer: A")["reward"] == 1.0


def test_regex_capture_against_reference_and_format_check():
    cap = v("regex", pattern=r"ANSWER:\s*(\w+)")
    assert cap({"expected_answer": "cat"}, "ANSWER: Cat")["reward"] == 1.0
    assert cap({"expected_answer": "dog"}, "ANSWER: cat")["reward"] == 0.0
    fmt = v("regex", pattern=r"^<think>.*</think>", options={"dotall": True})
    assert fmt({}, "<think>a\nb</think> yes")["reward"] == 1.0
    assert fmt({}, "no tags")["reward"] == 0.0


def test_python_function_from_file(tmp_path):
    f = tmp_path / "myverifier.py"
    f.write_text("def score(row, response, bonus=0.0):\n"
                 "    ok = response.strip() == row['target']\n"
                 "    return {'reward': float(ok) + bonus, 'length': len(response)}\n"
                 "def half(row, response):\n    return 0.5\n")
    fn = v("python", function=f"{f}:score")
    assert fn({"target": "x"}, "x") == {"reward": 1.0, "length": 1}
    assert v("python", function=f"{f}:half")({}, "y") == {"reward": 0.5}
    big = build_verifier({"type": "python", "function": f"{f}:score", "options": {"bonus": 5}})
    assert big({"target": "x"}, "x")["reward"] == 6.0  # not clipped: the scoring stage refuses it (reward_range)


def test_python_function_from_module():
    fn = v("python", function="sft_ray.verifiers.text:normalize")  # returns a str: not a reward
    with pytest.raises(TypeError):
        fn({}, "x")
    with pytest.raises(ValueError, match="cannot import"):
        v("python", function="no_such_module_xyz:f")


def test_verifier_errors_become_row_errors_not_crashes():
    row = score_one(v("math"), {"response": "\\boxed{1}"})  # no expected_answer
    assert row["reward"] is None and row["error"]["type"] == "verifier_error"  # no verdict: never a reward of 0
    assert "expected_answer" in row["error"]["message"]


def test_score_stage_callable_without_ray():
    import asyncio

    import orjson

    stage = ScoreStage({"type": "exact_match", "answer_field": "expected_answer", "options": {}})
    batch = {"id": ["a", "b"], "sample_index": [0, 0], "failed": [False, True], "ready_at": [1.0, 1.0],
             "rollout": [orjson.dumps({"response": "yes", "expected_answer": "Yes", "usage": {"output_tokens": 3}}).decode(),
                         orjson.dumps({"response": None, "error": {"type": "timeout"}}).decode()]}
    out = asyncio.run(stage(batch))
    assert out["reward"] == [1.0, None]
    assert out["output_tokens"] == [3, 0]
    assert orjson.loads(out["rollout"][0])["accuracy"] == 1.0
