"""Normalised exact match between the response's answer and the reference."""

from __future__ import annotations

from typing import Any

from sft_ray.verifiers import reference
from sft_ray.verifiers.text import extract_answer, normalize


class ExactMatch:
    """Reward 1 when the whole response, or its extracted answer, equals the reference
    after normalisation (case, white space, quotes, trailing punctuation).

    ``options.extract: false`` compares the whole response only.
    """

    def __init__(self, cfg: dict[str, Any]) -> None:
        self.cfg = cfg
        self.extract = cfg.get("options", {}).get("extract", True)

    def __call__(self, row: dict[str, Any], response: str) -> dict[str, Any]:
        ref = reference(row, self.cfg)
        if ref is None:
            raise ValueError(f"row has no reference answer in field {self.cfg.get('answer_field')!r}")
        refs = ref if isinstance(ref, list) else [ref]
        gold = {normalize(r) for r in refs}
        candidates = {normalize(response)}
        if self.extract:
            candidates.add(normalize(extract_answer(response)))
        hit = bool(gold & candidates)
        return {"reward": float(hit), "accuracy": float(hit)}


class NoVerifier:
    """No scoring: every successful response gets reward 1 (keep-all pipelines)."""

    def __init__(self, cfg: dict[str, Any]) -> None:
        self.cfg = cfg

    def __call__(self, row: dict[str, Any], response: str) -> dict[str, Any]:
        return {"reward": 1.0}
