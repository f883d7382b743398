"""Math answers checked with Hugging Face ``math-verify`` (LaTeX, boxed, fractions, sets...).

math-verify can spin for minutes on some inputs (``9^{9^{9^{9}}}``), and its own
timeouts use SIGALRM, which works only on a process's main thread (a Ray actor
scores elsewhere) and turns a timeout into a silent ``False``. So each check runs
in a small worker process (one per scoring actor, started on first use) under a
deadline: past ``options.timeout_s`` the worker is killed and restarted, and the
row gets a ``verifier_error`` (no verdict), never a reward of 0.
"""

from __future__ import annotations

import os
import select
import subprocess
import sys
import threading
import time
from typing import Any

import orjson

from sft_ray.verifiers import VerifierFailure, require_reference

START_TIMEOUT_S = 120.0  # importing sympy on a busy machine


def check(gold_text: str, response: str) -> dict[str, bool]:
    """math-verify's verdict on one response (runs inside the worker process)."""
    import math_verify as mv

    # A bare reference like "3/4" or "322372" parses better wrapped as a boxed answer.
    gold = mv.parse(gold_text if "\\boxed" in gold_text or "$" in gold_text else f"\\boxed{{{gold_text}}}",
                    parsing_timeout=None)
    pred = mv.parse(response, parsing_timeout=None)
    ok = bool(gold) and bool(pred) and bool(mv.verify(gold, pred, timeout_seconds=None))
    return {"ok": ok, "found": bool(pred)}


class _Worker:
    """One child process answering check() requests, one JSON line each way."""

    def __init__(self) -> None:
        self.proc: subprocess.Popen | None = None
        self.lock = threading.Lock()

    def _start(self) -> None:
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
        self.proc = subprocess.Popen([sys.executable, "-m", "sft_ray.verifiers.math"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, env=env)
        if self._read(START_TIMEOUT_S) != {"ready": True}:
            self.kill()
            raise VerifierFailure("math-verify worker did not start")

    def _read(self, timeout_s: float) -> Any:
        assert self.proc is not None and self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout_s)
        if not ready:
            return None
        line = self.proc.stdout.readline()
        return orjson.loads(line) if line else None

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None

    def check(self, gold: str, response: str, timeout_s: float) -> dict[str, bool]:
        with self.lock:
            if self.proc is None or self.proc.poll() is not None:
                self._start()
            assert self.proc is not None and self.proc.stdin is not None
            t0 = time.monotonic()
            try:
                self.proc.stdin.write(orjson.dumps({"gold": gold, "pred": response}) + b"\n")
                self.proc.stdin.flush()
            except BrokenPipeError:
                self.kill()
                raise VerifierFailure("math-verify worker died") from None
            out = self._read(timeout_s)
            if out is None:
                alive = self.proc.poll() is None
                self.kill()
                if alive:
                    raise VerifierFailure(f"math-verify gave no verdict within {timeout_s:g} s "
                                          f"(options.timeout_s); took {time.monotonic() - t0:.1f} s")
                raise VerifierFailure("math-verify worker died")
            if "error" in out:
                raise VerifierFailure(f"math-verify failed: {out['error']}")
            return out

    def __del__(self) -> None:
        try:
            self.kill()
        except Exception:
            pass


_WORKER = _Worker()  # one per process: every MathVerify of an actor (a composite's too) shares it


class MathVerify:
    """Reward 1 when math-verify finds the response's answer equal to the reference."""

    def __init__(self, cfg: dict[str, Any]) -> None:
        self.cfg = cfg
        self.timeout_s = float(cfg.get("options", {}).get("timeout_s", 10))
        self.worker = _WORKER

    def __call__(self, row: dict[str, Any], response: str) -> dict[str, Any]:
        ref = str(require_reference(row, self.cfg))
        out = self.worker.check(ref, response, self.timeout_s)
        return {"reward": float(out["ok"]), "accuracy": float(out["ok"]), "answer_found": float(out["found"])}


def _serve() -> None:
    import logging

    import math_verify  # noqa: F401  (imported before "ready": it pulls in sympy, which is slow)

    # Timeouts are the parent's job; math-verify warns once about that, and about every parse failure.
    logging.getLogger("math_verify").setLevel(logging.CRITICAL)
    out = sys.stdout.buffer
    out.write(b'{"ready": true}\n')
    out.flush()
    for line in sys.stdin.buffer:
        req = orjson.loads(line)
        try:
            res: dict[str, Any] = check(req["gold"], req["pred"])
        except Exception as e:  # math-verify's own bug on an odd input: reported, not fatal
            res = {"error": f"{type(e).__name__}: {e}"[:300]}
        out.write(orjson.dumps(res) + b"\n")
        out.flush()


if __name__ == "__main__":
    _serve()
