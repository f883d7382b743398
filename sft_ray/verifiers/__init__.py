"""Verifier registry: each verifier scores one episode against its input row.

A verifier is a class built once per scoring actor from the ``verifier`` config
(a plain dict) and called as ``verifier(row, response) -> {"reward": float, ...metrics}``:
``row`` is the *input* row (:func:`sft_ray.rows.input_row`, so an input field that a
rollout field shadows, such as a reference ``response``, is what the verifier sees) and
``response`` the final assistant message. Rewards lie in [0, 1]; other keys are named
metrics (e.g. ``accuracy``) that travel on the rollout row and are averaged in the report.

The interface, beyond that plain call:

- ``__call__`` may be ``async`` (a judge, code execution): the scoring stage runs many
  rows at once, up to ``verifier.concurrency`` per actor;
- a verifier with ``wants_rollout = True`` is also passed ``rollout=`` (the whole
  episode: ``messages`` with tool calls, ``termination``, ...);
- a verifier may define ``score_batch(items)`` (items: ``(row, response, rollout)``
  tuples; returns one result dict, or an exception, per item, or an awaitable of that
  list) to score a whole batch at once;
- a verifier that cannot give a verdict raises: :class:`VerifierFailure` (or any
  exception) makes the row a failed sample (``verifier_error``, or the failure's
  ``error_type``), never a reward of 0;
- a verifier that holds resources (a judge's connections or engine) may define
  ``close()`` (async, in the loop it ran in), ``close_now()`` (synchronous, at actor
  teardown) and ``dead`` (true once it can never give a verdict again: the scoring actor
  is then restarted); one that holds other verifiers lists them in ``subverifiers``.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable

from sft_ray.errors import VERIFIER_ERROR
from sft_ray.plugins import registered

Verifier = Callable[..., Any]

VERIFIERS: dict[str, str] = {
    "exact_match": "sft_ray.verifiers.exact_match:ExactMatch",
    "math": "sft_ray.verifiers.math:MathVerify",
    "mcq": "sft_ray.verifiers.mcq:MultipleChoice",
    "regex": "sft_ray.verifiers.regex:RegexMatch",
    "python": "sft_ray.verifiers.python:PythonFunction",
    "nemo_gym": "sft_ray.verifiers.nemo_gym:NemoGymVerify",
    "code": "sft_ray.verifiers.code:CodeExecution",
    "json_schema": "sft_ray.verifiers.json_schema:JsonSchema",
    "composite": "sft_ray.verifiers.composite:Composite",
    "judge": "sft_ray.verifiers.judge:Judge",
    "none": "sft_ray.verifiers.exact_match:NoVerifier",
}


class VerifierFailure(Exception):
    """No verdict could be reached (infrastructure, not the sample's fault): the row fails
    with ``error.type`` = ``error_type`` and is retried by a rerun."""

    error_type = VERIFIER_ERROR

    def __init__(self, message: str, error_type: str | None = None) -> None:
        super().__init__(message)
        if error_type:
            self.error_type = error_type


def build_verifier(cfg: dict[str, Any]) -> Verifier:
    """Instantiate the verifier that ``cfg["type"]`` names."""
    kind = cfg["type"]
    if kind == "math" and cfg.get("judge"):
        kind = "math_with_judge"
    return registered({**VERIFIERS, "math_with_judge": "sft_ray.verifiers.judge:MathWithJudge"}, kind,
                      "verifier")(cfg)


async def call_verifier(verifier: Verifier, row: dict[str, Any], response: str,
                        rollout: dict[str, Any] | None) -> Any:
    """One verifier call, sync or async, with the rollout when the verifier wants it."""
    kwargs = {"rollout": rollout} if getattr(verifier, "wants_rollout", False) else {}
    out = verifier(row, response, **kwargs)
    if inspect.isawaitable(out):
        out = await out
    return out


def reference(row: dict[str, Any], cfg: dict[str, Any]) -> Any:
    """The row's reference answer (``verifier.answer_field``), or None."""
    return row.get(cfg.get("answer_field", "expected_answer"))


def require_reference(row: dict[str, Any], cfg: dict[str, Any]) -> Any:
    """The reference answer, or a ValueError naming the field."""
    ref = reference(row, cfg)
    if ref is None:
        raise ValueError(f"row has no reference answer in field {cfg.get('answer_field', 'expected_answer')!r}")
    return ref


def _tree(verifier: Verifier):
    yield verifier
    for sub in getattr(verifier, "subverifiers", ()):
        yield from _tree(sub)


async def close_verifier(verifier: Verifier) -> None:
    """Await every ``close()`` of the verifier and the verifiers it holds."""
    for v in _tree(verifier):
        close = getattr(v, "close", None)
        if callable(close):
            out = close()
            if inspect.isawaitable(out):
                await out


def close_verifier_now(verifier: Verifier) -> None:
    """Call every ``close_now()`` of the verifier and the verifiers it holds (never raises)."""
    for v in _tree(verifier):
        try:
            close_now = getattr(v, "close_now", None)
            if callable(close_now):
                close_now()
        except Exception:  # teardown: nothing to raise to
            pass


def local_engines(verifier: Verifier) -> list[Any]:
    """The verifiers, this one or those it holds, that run a model engine in this process (a vLLM
    judge: ``local_engine``); each has ``start()`` and ``model`` (its model section)."""
    return [v for v in _tree(verifier) if getattr(v, "local_engine", False) is True]


def verifier_dead(verifier: Verifier) -> bool:
    """Whether the verifier, or one it holds, can never give a verdict again (a dead engine)."""
    return any(getattr(v, "dead", False) is True for v in _tree(verifier))
