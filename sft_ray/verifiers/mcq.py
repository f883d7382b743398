"""Multiple-choice: the letter the response picks, against the reference letter."""

from __future__ import annotations

import re
from typing import Any

from sft_ray.verifiers import reference
from sft_ray.verifiers.text import last_boxed

_PATTERNS = [
    re.compile(r"(?i:answer|choice|option)\s*(?i:is)?\s*[:：]?\s*\(?\**([A-J])\b\)?"),
    re.compile(r"^\s*\(?([A-J])[\).:]?\s*$", re.MULTILINE),
    re.compile(r"\(([A-J])\)"),
    re.compile(r"\b([A-J])\b"),
]


def extract_letter(text: str, letters: str = "ABCDEFGHIJ") -> str | None:
    """The chosen letter: a boxed letter, 'Answer: X', a lone letter line, '(X)', else the last
    standalone capital letter."""
    boxed = last_boxed(text)
    if boxed and boxed.strip().strip("()").upper()[:1] in letters and len(boxed.strip().strip("()")) == 1:
        return boxed.strip().strip("()").upper()
    for pat in _PATTERNS:
        # letters are matched case-sensitively: "a" is a word, "A" a choice
        found = [m for m in pat.findall(text) if m in letters]
        if found:
            return found[-1]
    return None


class MultipleChoice:
    """Reward 1 when the extracted letter equals the reference letter.

    The reference is a letter (``"B"``), or an option text when the row has an
    ``options`` list/dict to look it up in.
    """

    def __init__(self, cfg: dict[str, Any]) -> None:
        self.cfg = cfg

    def _gold(self, row: dict[str, Any]) -> str:
        ref = reference(row, self.cfg)
        if ref is None:
            raise ValueError(f"row has no reference answer in field {self.cfg.get('answer_field')!r}")
        ref = str(ref).strip()
        if len(ref.strip("()")) == 1:
            return ref.strip("()").upper()
        options = row.get("options")
        if isinstance(options, dict):
            for letter, text in options.items():
                if str(text).strip() == ref:
                    return str(letter).upper()
        if isinstance(options, list) and ref in [str(o).strip() for o in options]:
            return "ABCDEFGHIJ"[[str(o).strip() for o in options].index(ref)]
        raise ValueError(f"reference answer {ref!r} is not a choice letter")

    def __call__(self, row: dict[str, Any], response: str) -> dict[str, Any]:
        gold = self._gold(row)
        picked = extract_letter(response)
        ok = picked == gold
        return {"reward": float(ok), "accuracy": float(ok), "answer_found": float(picked is not None)}
