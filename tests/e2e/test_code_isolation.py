"""`type: code`, issue 28: the checks run in an interpreter of their own, which the program cannot reach.

Every hostile program here is a WRONG solution that tries to score anyway; on the one-interpreter
harness (123b945) the frame, traceback, caller's-code, module-patching, import-system and look-alike
programs scored 1. The pipe's own failure modes (exit or hang between calls, answers out of turn, a
flood) are tried too. Real sandboxed processes throughout (bubblewrap)."""

from __future__ import annotations

import asyncio
import math

import pytest

from sft_ray.scoring import score_rollouts
from sft_ray.verifiers import build_verifier

SQUARE = {"test": "def check(candidate):\n    assert candidate(3) == 9\n    assert candidate(-2) == 4\n",
          "entry_point": "square", "prompt": "def square(x):\n"}
ROOT = {"test": "import math\n\ndef check(candidate):\n    assert math.isclose(candidate(2.0), 1.41421356, rel_tol=1e-6)\n",
        "entry_point": "root"}
MEAN = {"test": "import statistics\n\ndef check(candidate):\n    assert candidate([1, 2, 6]) == statistics.mean([1, 2, 6])\n",
        "entry_point": "mean"}


def code_verifier(**code):
    return build_verifier({"type": "code", "code": {"timeout_s": 2, **code}})


def score_all(verifier, rows):
    asyncio.run(score_rollouts(verifier, rows, asyncio.Semaphore(100)))
    return {r["name"]: r for r in rows}


# Each one a wrong answer that tries to pass anyway.
CHEATS = {
    # the harness's own data through a frame: rewrite the test before it runs
    "frame": (SQUARE, "import sys\nf = sys._getframe(1)\nwhile f is not None:\n"
                      "    p = f.f_locals.get('payload')\n    if isinstance(p, dict) and 'test' in p:\n"
                      "        p['test'] = 'def check(candidate):\\n    pass\\n'\n    f = f.f_back\n"
                      "def square(x):\n    return 0\n"),
    # the same through a traceback's frames
    "traceback": (SQUARE, "try:\n    raise ValueError\nexcept ValueError as e:\n    f = e.__traceback__.tb_frame\n"
                          "while f is not None:\n    p = f.f_locals.get('payload')\n"
                          "    if isinstance(p, dict) and 'test' in p:\n"
                          "        p['test'] = 'def check(candidate):\\n    pass\\n'\n    f = f.f_back\n"
                          "def square(x):\n    return 0\n"),
    # the expected value, read from the calling test's own code (the constant after the call)
    "callers_code": (SQUARE, "import dis, sys\ndef square(x):\n    f = sys._getframe(1)\n"
                             "    while f.f_code.co_name != 'check':\n        f = f.f_back\n"
                             "    ins = list(dis.get_instructions(f.f_code))\n"
                             "    i = next(k for k, j in enumerate(ins) if j.offset > f.f_lasti)\n"
                             "    while ins[i].opname != 'LOAD_CONST':\n        i += 1\n    return ins[i].argval\n"),
    # a module the test imports, patched before it imports it
    "patch_math": (ROOT, "import math\nmath.isclose = lambda *a, **k: True\ndef root(x):\n    return 0.0\n"),
    "patch_sys_modules": (ROOT, "import sys, types\nfake = types.ModuleType('math')\n"
                                "fake.isclose = lambda *a, **k: True\nsys.modules['math'] = fake\n"
                                "def root(x):\n    return 0.0\n"),
    # the import system: a finder that serves the test a module of the program's
    "patch_import_system": (MEAN, "import sys, types\nclass Finder:\n    def find_spec(self, name, path, target=None):\n"
                                  "        if name != 'statistics':\n            return None\n"
                                  "        import importlib.util\n        return importlib.util.spec_from_loader(name, self)\n"
                                  "    def create_module(self, spec):\n        return None\n"
                                  "    def exec_module(self, module):\n        module.mean = lambda xs: 0\n"
                                  "sys.meta_path.insert(0, Finder())\nsys.modules.pop('statistics', None)\n"
                                  "def mean(xs):\n    return 0\n"),
    # a look-alike of plain data: a class registered as numpy's, equal to anything
    "look_alike": (SQUARE, "import sys, types\nclass Same:\n    def __eq__(self, other):\n        return True\n"
                           "fake = types.ModuleType('numpy')\nfake.sctypeDict = {'same': Same}\nfake.ndarray = Same\n"
                           "sys.modules['numpy'] = fake\ndef square(x):\n    return Same()\n"),
    "equals_anything": (SQUARE, "class Any:\n    def __eq__(self, other):\n        return True\n"
                                "def square(x):\n    return Any()\n"),
    "int_subclass": (SQUARE, "class I(int):\n    def __eq__(self, other):\n        return True\n"
                             "def square(x):\n    return I(0)\n"),
}


def test_programs_cannot_reach_the_checks():
    rows = [dict(row, name=name, response=f"```python\n{src}```") for name, (row, src) in CHEATS.items()]
    got = score_all(code_verifier(), rows)
    assert {n: r["reward"] for n, r in got.items()} == dict.fromkeys(CHEATS, 0.0), {
        n: (r["reward"], r.get("error")) for n, r in got.items()}
    # and the honest answers to the same rows pass
    honest = {"square": (SQUARE, "def square(x):\n    return x * x\n"),
              "root": (ROOT, "import math\ndef root(x):\n    return math.sqrt(x)\n"),
              "mean": (MEAN, "def mean(xs):\n    return sum(xs) / len(xs)\n")}
    rows = [dict(row, name=name, response=src) for name, (row, src) in honest.items()]
    assert {n: r["reward"] for n, r in score_all(code_verifier(), rows).items()} == dict.fromkeys(honest, 1.0)


# The pipe between the program and the checks: each a program that answers the first call right.
FIRST_RIGHT = "def square(x):\n    if x == 3:\n        return 9\n"
PIPE_ABUSE = {
    "exit_between_calls": FIRST_RIGHT + "    import os\n    os._exit(0)\n",
    "sys_exit_in_a_call": FIRST_RIGHT + "    raise SystemExit(0)\n",
    "hang_between_calls": FIRST_RIGHT + "    import time\n    time.sleep(600)\n",
    "sleeps_while_loading": "import time\ntime.sleep(600)\ndef square(x):\n    return x * x\n",
    "spin_between_calls": FIRST_RIGHT + "    while True:\n        pass\n",
    # forged answers written to every descriptor before any call: ids it cannot know, and out of turn
    "answers_out_of_turn": "import json, os, struct\nfor fd in map(int, os.listdir('/proc/self/fd')):\n    for v in (9, 4):\n"
                           "        for body in (json.dumps(['ret', '0', v]).encode(), json.dumps(['ready']).encode()):\n"
                           "            try:\n                os.write(fd, struct.pack('>I', len(body)) + body)\n"
                           "            except OSError:\n                pass\n"
                           "def square(x):\n    return 0\n",
    # the pipe flooded with a frame past any size limit, and with garbage
    "floods_the_pipe": "import os\nfor fd in map(int, os.listdir('/proc/self/fd')):\n    try:\n        os.set_blocking(fd, False)\n"
                       "        os.write(fd, b'\\xff' * (1 << 16))\n    except OSError:\n        pass\n"
                       "def square(x):\n    return x * x\n",
    "garbage_frames": "import os, struct\nfor fd in map(int, os.listdir('/proc/self/fd')):\n    try:\n        os.set_blocking(fd, False)\n"
                      "        os.write(fd, struct.pack('>I', 5) + b'[[[[[')\n    except OSError:\n        pass\n"
                      "def square(x):\n    return x * x\n",
    # not plain data, however it is wrapped
    "returns_a_generator": "def square(x):\n    yield x * x\n",
    "returns_a_function": "def square(x):\n    return lambda: x * x\n",
}


def test_the_pipe_holds_against_the_program():
    rows = [dict(SQUARE, name=name, response=src) for name, src in PIPE_ABUSE.items()]
    rows.append(dict(SQUARE, name="good", response="def square(x):\n    return x * x\n"))
    # says it is ready itself, then never reads: a call bigger than the pipe cannot hold the checker past its deadline
    rows.append({"test": "def check(candidate):\n    assert candidate('x' * 2_000_000) == 2_000_000\n",
                 "entry_point": "size", "name": "stops_reading",
                 "response": "import os, struct, time\nfor fd in map(int, os.listdir('/proc/self/fd')):\n    try:\n"
                             "        os.write(fd, struct.pack('>I', 9) + b'[\"ready\"]')\n    except OSError:\n"
                             "        pass\ntime.sleep(600)\ndef size(s):\n    return len(s)\n"})
    got = score_all(code_verifier(timeout_s=2), rows)
    assert {n: r["reward"] for n, r in got.items()} == {**dict.fromkeys(PIPE_ABUSE, 0.0), "good": 1.0,
                                                        "stops_reading": 0.0}, {
        n: (r["reward"], r.get("error")) for n, r in got.items()}
    assert all("error" not in r for r in got.values())  # the program's failures, not the verifier's
    m = {n: r["metrics"] for n, r in got.items()}
    assert m["exit_between_calls"]["exited_before_checks"] == 1.0
    assert m["sys_exit_in_a_call"]["exited_before_checks"] == 1.0
    assert m["hang_between_calls"]["timeouts"] == 1.0 and m["spin_between_calls"]["timeouts"] == 1.0
    assert m["sleeps_while_loading"]["timeouts"] == 1.0  # the program's failure, not the sandbox's (no error)
    assert m["stops_reading"]["timeouts"] == 1.0 and m["stops_reading"]["exec_s"] < 9  # the call's deadline, not the run's
    assert m["good"]["exited_before_checks"] == 0.0 and m["good"]["timeouts"] == 0.0


MBPP = [  # module-level asserts, as MBPP's test_list has them
    {"test": "assert add(1, 2) == 3\nassert add(-1, 1) == 0\n", "entry_point": "add",
     "right": "def add(a, b):\n    return a + b\n", "wrong": "def add(a, b):\n    return a - b\n"},
    {"test": "assert pairs([1, 2, 3]) == [(1, 2), (2, 3)]\nassert pairs([]) == []\n", "entry_point": "pairs",
     "right": "def pairs(xs):\n    return list(zip(xs, xs[1:]))\n",
     "wrong": "def pairs(xs):\n    return [[a, b] for a, b in zip(xs, xs[1:])]\n"},  # lists, not tuples
    {"test": "assert set(uniq('abca')) == {'a', 'b', 'c'}\nassert uniq('') == set()\n", "entry_point": "uniq",
     "right": "def uniq(s):\n    return set(s)\n", "wrong": "def uniq(s):\n    return s\n"},
    {"test": "assert math.isclose(area(1.0), math.pi)\n", "entry_point": "area", "setup": "import math\n",
     "right": "import math\ndef area(r):\n    return math.pi * r * r\n", "wrong": "def area(r):\n    return 3.0\n"},
    # a package of site-packages, imported on both sides (the two interpreters start without `site`)
    {"test": "import packaging.version\nassert newer('1.10', '1.9') == (packaging.version.Version('1.10') > "
             "packaging.version.Version('1.9'))\n", "entry_point": "newer",
     "right": "from packaging.version import Version\ndef newer(a, b):\n    return Version(a) > Version(b)\n",
     "wrong": "def newer(a, b):\n    return a > b\n"},
    # the program's builtin exceptions reach the test as themselves
    {"test": "try:\n    inv(0)\nexcept ZeroDivisionError:\n    ok = True\nelse:\n    ok = False\nassert ok and inv(2) == 0.5\n",
     "entry_point": "inv", "right": "def inv(x):\n    return 1 / x\n",
     "wrong": "def inv(x):\n    if not x:\n        raise ExceptionGroup('no', [ValueError()])\n    return 1 / x\n"},
    {"test": "assert count_words({'a': 1}) == {'a': 1, 'b': 0}\n", "entry_point": "count_words",
     "right": "def count_words(d):\n    return {**d, 'b': 0}\n", "wrong": "def count_words(d):\n    return d\n"},
]


def test_mbpp_style_module_level_asserts():
    rows = []
    for i, task in enumerate(MBPP):
        test = task.get("setup", "") + task["test"]
        for kind in ("right", "wrong"):
            rows.append({"test": test, "entry_point": task["entry_point"], "name": f"{i}-{kind}",
                         "response": f"```python\n{task[kind]}```"})
    got = score_all(code_verifier(), rows)
    assert {n: r["reward"] for n, r in got.items()} == {
        f"{i}-{kind}": float(kind == "right") for i in range(len(MBPP)) for kind in ("right", "wrong")}, {
        n: (r["reward"], r.get("error")) for n, r in got.items()}


def test_a_stateful_entry_point_keeps_its_state_and_values_keep_their_types():
    counter = {"test": "def check(candidate):\n    assert candidate() == 1\n    assert candidate() == 2\n"
                       "    assert candidate(step=10) == 12\n", "entry_point": "tick"}
    program = "n = 0\ndef tick(step=1):\n    global n\n    n += step\n    return n\n"
    # every plain type crosses as itself: tuples stay tuples, sets sets, bytes bytes, floats exact
    kinds = {"test": "def check(candidate):\n    v = candidate()\n"
                     "    assert type(v) is tuple and type(v[0]) is list and type(v[1]) is dict and type(v[2]) is set\n"
                     "    assert v == ([1, (2, 3)], {(1, 'a'): b'x', 2: bytearray(b'y')}, {frozenset({1})}, 0.1, -0.0,"
                     " float('inf'), 1 + 2j, None, True, range(3), ..., 2 ** 100, '\\udcff')\n"
                     "    assert math.copysign(1, v[4]) == -1 and math.isnan(candidate(float('nan')))\n",
             "entry_point": "kinds", "prompt": "import math\n\n\ndef kinds(x=None):\n    \"\"\"Plain values.\"\"\"\n"}
    kinds_program = ("def kinds(x=None):\n    if x is not None:\n        return x\n"
                     "    return ([1, (2, 3)], {(1, 'a'): b'x', 2: bytearray(b'y')}, {frozenset({1})}, 0.1, -0.0,"
                     " float('inf'), 1 + 2j, None, True, range(3), ..., 2 ** 100, '\\udcff')\n")
    rows = [dict(counter, name="counter", response=program), dict(kinds, name="kinds", response=kinds_program)]
    got = score_all(code_verifier(), rows)
    assert {n: r["reward"] for n, r in got.items()} == {"counter": 1.0, "kinds": 1.0}, got


def test_the_codec_refuses_what_is_not_plain_data():
    from sft_ray.verifiers import harness

    value = ([1, (2, 3)], {(1, "a"): b"x"}, {frozenset({1})}, 0.5, range(1, 9, 2), slice(1, None), ..., 1j)
    assert harness.decode(harness.encode(value)) == value
    for bad in (object(), [lambda: 1], {1: iter([])}, type("I", (int,), {})(3)):
        with pytest.raises(harness.NotPlain):
            harness.encode(bad)
    deep: list = []
    for _ in range(harness.MAX_DEPTH + 5):
        deep = [deep]
    with pytest.raises(harness.NotPlain):
        harness.encode(deep)
    for wire in (["x"], ["s", ["l"]], ["b", "zz"], {"a": 1}, ["c", "1", 2], ["r", 1.5, 2, 1], ["l", []], ["d", 1], ["r", 1, 2, 0]):
        with pytest.raises(harness.NotPlain):
            harness.decode(wire)
    assert math.isnan(harness.decode(harness.encode(float("nan"))))

