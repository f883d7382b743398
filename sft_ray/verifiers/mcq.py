"""Multiple-choice: the letter the response picks, against the reference letter."""

from __future__ import annotations

import re
from typing import Any

from sft_ray.verifiers import reference
from sft_ray.verifiers.text import last_boxed

# Where a reply names its choice, strongest signal first; each pattern's last acceptable match wins.
_L = r"([A-Ja-j])"
_EXPLICIT = re.compile(  # "Answer: B", "the answer is (b)", "Option C", "I'd go with D", "it's C"
    r"(?i:\b(?:final\s+)?answer|\bchoice|\boption|\bgo\s+with|\bpick|\bchoose|\bselect|\bit'?s|\bit\s+is|\b(?:would|should|must)\s+be)"
    r"(?:\s+(?i:is|would\s+be|should\s+be|must\s+be|=))?\s*[:：]?\s*(?:\*\*|\*|\(|\[)*\s*" + _L + r"(?!\w)")
_IS_CORRECT = re.compile(r"(?<!\w)([A-J])(?:\)|\*\*)?\s+(?i:is\s+(?:the\s+)?(?:correct|right|best|answer))")
_LEADING = re.compile(r"\A[\s*\(\[]*" + _L + r"(?=[\)\].:*,]|\s|\Z)")
_LONE_LINE = re.compile(r"^[\s*]*\(?" + _L + r"[\).:]?[\s*]*$", re.MULTILINE)
_PAREN = re.compile(r"\(([A-J])\)")
_ANY = re.compile(r"(?<![\w'])([A-J])(?![\w'])")
_DELIMS = (")", "]", ":", "*", ",")


def _acceptable(text: str, m: re.Match, letters: str, fallback: bool = False) -> bool:
    letter, rest = m.group(1), text[m.end(1):]
    if letter.upper() not in letters:
        return False
    if letter.islower():  # "a" is a word; a lowercase choice needs a delimiter: "b)", "(b)", "b." at the end
        return (rest[:1] in _DELIMS or rest.strip() in ("", ".") or rest.startswith(". ") or rest.startswith(".\n")
                or m.group(0).startswith("("))
    if letter == "I" and ((rest[:1] and rest[:1] in "'’") or re.match(r"\s+[a-z]", rest)):
        return False  # the pronoun: "I'm confident", "I think"
    if fallback and letter == "A" and re.match(r"\s+[a-z]", rest):
        return False  # the article: "A good guess"
    return True


def extract_letter(text: str, letters: str = "ABCDEFGHIJ") -> str | None:
    """The chosen letter: a boxed letter; 'Answer: X' and similar; 'X is correct'; a letter
    opening the reply ('C. I'm confident.'); a lone letter line; '(X)'; else the last standalone
    capital letter that is not the pronoun I or the article A."""
    boxed = last_boxed(text)
    if boxed is not None:
        inner = boxed.strip().strip("()").replace("\\text{", "").strip("{} ")
        if len(inner) == 1 and inner.upper() in letters:
            return inner.upper()
    for pat in (_EXPLICIT, _IS_CORRECT, _LEADING, _LONE_LINE, _PAREN):
        found = [m.group(1) for m in pat.finditer(text) if _acceptable(text, m, letters)]
        if found:
            return found[-1].upper()
    found = [m.group(1) for m in _ANY.finditer(text) if _acceptable(text, m, letters, fallback=True)]
    return found[-1] if found else None


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
        options = row.get("options")
        letters = "ABCDEFGHIJ"[:len(options)] if isinstance(options, (list, dict)) and 0 < len(options) <= 10 else None
        picked = extract_letter(response, letters or "ABCDEFGHIJ")
        ok = picked == gold
        return {"reward": float(ok), "accuracy": float(ok), "answer_found": float(picked is not None)}
