"""Verifier registry: each verifier scores one response against its row.

A verifier is a class built once per scoring actor from the ``verifier`` config
(a plain dict) and called as ``verifier(row, response) -> {"reward": float, ...metrics}``.
Rewards lie in [0, 1]; other keys are named metrics (e.g. ``accuracy``) that
travel on the rollout row and are averaged in the report.
"""

from __future__ import annotations

import importlib
from typing import Any, Callable

Verifier = Callable[[dict[str, Any], str], dict[str, Any]]

VERIFIERS: dict[str, str] = {
    "exact_match": "sft_ray.verifiers.exact_match:ExactMatch",
    "math": "sft_ray.verifiers.math:MathVerify",
    "mcq": "sft_ray.verifiers.mcq:MultipleChoice",
    "regex": "sft_ray.verifiers.regex:RegexMatch",
    "python": "sft_ray.verifiers.python:PythonFunction",
    "nemo_gym": "sft_ray.verifiers.nemo_gym:NemoGymVerify",
    "none": "sft_ray.verifiers.exact_match:NoVerifier",
}


def build_verifier(cfg: dict[str, Any]) -> Verifier:
    """Instantiate the verifier that ``cfg["type"]`` names."""
    try:
        target = VERIFIERS[cfg["type"]]
    except KeyError:
        raise ValueError(f"unknown verifier {cfg['type']!r}; known: {', '.join(sorted(VERIFIERS))}") from None
    module, _, attr = target.partition(":")
    return getattr(importlib.import_module(module), attr)(cfg)


def reference(row: dict[str, Any], cfg: dict[str, Any]) -> Any:
    """The row's reference answer (``verifier.answer_field``), or None."""
    return row.get(cfg.get("answer_field", "expected_answer"))
