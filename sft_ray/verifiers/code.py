"""Code execution: the program in the reply, run against the row's tests in a sandbox.

Two test forms, as the common data sets have them:

- HumanEval / MBPP style: ``test`` and ``entry_point`` (the function's name). The program runs in
  one sandboxed interpreter, the test in another, which calls the entry point across a pipe with
  plain data only (:func:`sft_ray.verifiers.sandbox.run_checked`): HumanEval's ``check(candidate)``
  when the test defines it, else the test's module-level asserts (MBPP's ``test_list`` joined).
  The row's prompt (``code.prepend_field``, else ``prompt``), when it is Python, runs in the
  checker first: the helpers a test calls (HumanEval/32's ``poly``) are the data set's, never the
  program's. A program that ends before the checks are done fails and is counted in
  ``exited_before_checks`` (one test per row);
- stdin/stdout pairs: ``inputs`` and ``outputs`` (lists of strings); each input is one run,
  passed when the output equals the expected one (trailing white space ignored per line).

Reward: the share of tests passed (``verifier.code.mode: share``) or 1 only when all pass
(``all``). A program that fails, loops, forks, eats memory or floods its output fails its
tests; only a sandbox that cannot run at all is a ``verifier_error``.

Programs run in the bubblewrap sandbox (``verifier.sandbox: bwrap``, the default): building the
verifier on a node without a working ``bwrap`` raises :class:`SandboxUnavailable` with what to
install. ``verifier.sandbox: none`` runs them without operating-system isolation (trusted code only).
"""

from __future__ import annotations

import asyncio
import re
from typing import Any

from sft_ray.verifiers import VerifierFailure
from sft_ray.verifiers.sandbox import Limits, SandboxFailure, SandboxUnavailable, require, run_checked, run_python

__all__ = ["CodeExecution", "SandboxUnavailable", "extract_program"]

_FENCE = re.compile(r"```[ \t]*([\w+#.-]*)[^\n]*\n(.*?)```", re.DOTALL)
_OPEN_FENCE = re.compile(r"```[ \t]*[\w+#.-]*[^\n]*\n")
_PYTHON_TAGS = {"", "python", "py", "python3"}


def extract_program(text: str) -> str:
    """The last fenced code block (a Python-tagged or untagged one first), the code after an
    unclosed fence (a reply cut by the token limit), else the whole reply."""
    blocks = _FENCE.findall(text)
    if blocks:
        python = [code for lang, code in blocks if lang.lower() in _PYTHON_TAGS]
        return (python or [code for _, code in blocks])[-1]
    opened = list(_OPEN_FENCE.finditer(text))
    if opened:
        return text[opened[-1].end():]
    return text


def _same_output(got: bytes, want: str) -> bool:
    def norm(s: str) -> list[str]:
        return [ln.rstrip() for ln in s.rstrip().splitlines()]

    return norm(got.decode("utf-8", "replace")) == norm(want)


class CodeExecution:
    """Reward from running the reply's program against the row's tests (see the module doc)."""

    def __init__(self, cfg: dict[str, Any]) -> None:
        code = cfg.get("code") or {}
        self.sandbox = cfg.get("sandbox") or "bwrap"
        require(self.sandbox)  # no isolation, no run: refused here, on the driver, before any actor
        self.mode = code.get("mode", "share")
        self.prepend_field = code.get("prepend_field")
        if code.get("plain_returns", True) is not True:
            raise ValueError("verifier.code.plain_returns: only `true`: the checks run in an interpreter of their own "
                             "and only plain data crosses to them (docs/sandbox.md)")
        self.workers = code.get("workers")
        self.limits = Limits(cpu_s=float(code.get("timeout_s", 10)), memory_mb=int(code.get("memory_mb", 1024)),
                             file_mb=int(code.get("file_mb", 16)),
                             max_output_bytes=int(code.get("max_output_bytes", 1 << 20)))

    def program(self, row: dict[str, Any], response: str) -> str:
        program = extract_program(response)
        prefix = row.get(self.prepend_field) if self.prepend_field else None
        entry = row.get("entry_point")
        # A completion that only continues the prompt (HumanEval's canonical form) needs the prompt first.
        if isinstance(prefix, str) and not (entry and re.search(rf"^\s*def\s+{re.escape(entry)}\s*\(", program, re.M)):
            program = prefix + program
        return program

    async def __call__(self, row: dict[str, Any], response: str) -> dict[str, Any]:
        try:
            return await self._score(row, response)
        except SandboxFailure as e:
            raise VerifierFailure(str(e)) from None

    async def _score(self, row: dict[str, Any], response: str) -> dict[str, Any]:
        program = self.program(row, response)
        if isinstance(row.get("test"), str) and isinstance(row.get("entry_point"), str):
            context = row.get(self.prepend_field or "prompt")
            results = [await run_checked(program, row["test"], row["entry_point"],
                                         context if isinstance(context, str) else None, self.limits, self.workers,
                                         sandbox=self.sandbox)]
            passed = [r.ok and r.proof for r in results]
            early = sum(r.exited_before_checks for r in results)
        elif isinstance(row.get("inputs"), list) and isinstance(row.get("outputs"), list):
            ins, outs = row["inputs"], row["outputs"]
            if len(ins) != len(outs) or not ins:
                raise ValueError(f"row has {len(ins)} inputs and {len(outs)} outputs; expected equal, non-zero counts")
            # Every run to its end, then the first failure: cancelling a run while asyncio is still starting its
            # subprocess can hang the event loop's shutdown (CPython 3.11).
            results = await asyncio.gather(*(run_python(program, str(i).encode(), self.limits, self.workers,
                                                        sandbox=self.sandbox) for i in ins), return_exceptions=True)
            for r in results:
                if isinstance(r, BaseException):
                    raise r
            passed = [r.ok and _same_output(r.stdout, str(o)) for r, o in zip(results, outs)]
            early = 0  # exiting early is just a wrong (or right) output here
        else:
            raise ValueError("row has no tests: expected `test` and `entry_point` (HumanEval style) "
                             "or `inputs` and `outputs` lists")
        share = sum(passed) / len(passed)
        return {"reward": share if self.mode == "share" else float(all(passed)),
                "tests_passed": float(sum(passed)), "tests_total": float(len(passed)), "pass_rate": share,
                "timeouts": float(sum(r.timed_out for r in results)), "exited_before_checks": float(early),
                "exec_s": round(max(r.wall_s for r in results), 4)}
