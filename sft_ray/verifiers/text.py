"""Answer extraction and normalisation shared by the string-comparing verifiers."""

from __future__ import annotations

import re
import unicodedata

_BOXED = re.compile(r"\\boxed\s*\{")
_ANSWER_IS = re.compile(r"(?:final answer|answer)\s*(?:is)?\s*[:：]\s*(.+)", re.IGNORECASE)


def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}``, braces balanced."""
    starts = [m.end() for m in _BOXED.finditer(text)]
    if not starts:
        return None
    i = starts[-1]
    depth = 1
    j = i
    while j < len(text) and depth:
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        j += 1
    return text[i:j - 1] if depth == 0 else None


def extract_answer(text: str) -> str:
    """The answer part of a response: a \\boxed{} answer, else what follows
    'Answer:', else the last non-empty line."""
    boxed = last_boxed(text)
    if boxed is not None:
        return boxed
    matches = _ANSWER_IS.findall(text)
    if matches:
        return matches[-1]
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1] if lines else ""


def normalize(text: str) -> str:
    """Case-, space-, quote- and trailing-punctuation-insensitive form of an answer."""
    text = unicodedata.normalize("NFKC", str(text)).strip().lower()
    text = re.sub(r"\s+", " ", text)
    text = text.strip("\"'`*")
    text = text.rstrip(".!;, ")
    return text.strip()
