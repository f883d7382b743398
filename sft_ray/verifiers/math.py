"""Math answers checked with Hugging Face ``math-verify`` (LaTeX, boxed, fractions, sets...)."""

from __future__ import annotations

import threading
from typing import Any

from sft_ray.verifiers import reference


class MathVerify:
    """Reward 1 when math-verify finds the response's answer equal to the reference."""

    def __init__(self, cfg: dict[str, Any]) -> None:
        import logging

        import math_verify  # imported here: it pulls in sympy, which is slow to import

        # Off the main thread math-verify cannot time out (SIGALRM) and warns on every call.
        logging.getLogger("math_verify").setLevel(logging.ERROR)

        self.cfg = cfg
        self.mv = math_verify
        self.timeout_s = int(cfg.get("options", {}).get("timeout_s", 5))

    def _timeout(self) -> int | None:
        # math-verify times out with SIGALRM, which works only on the main thread.
        return self.timeout_s if threading.current_thread() is threading.main_thread() else None

    def __call__(self, row: dict[str, Any], response: str) -> dict[str, Any]:
        ref = reference(row, self.cfg)
        if ref is None:
            raise ValueError(f"row has no reference answer in field {self.cfg.get('answer_field')!r}")
        ref = str(ref)
        timeout = self._timeout()
        # A bare reference like "3/4" or "322372" parses better wrapped as a boxed answer.
        gold = self.mv.parse(ref if "\\boxed" in ref or "$" in ref else f"\\boxed{{{ref}}}",
                             parsing_timeout=timeout)
        pred = self.mv.parse(response, parsing_timeout=timeout)
        ok = bool(gold) and bool(pred) and bool(self.mv.verify(gold, pred, timeout_seconds=timeout))
        return {"reward": float(ok), "accuracy": float(ok), "answer_found": float(bool(pred))}
