"""The mock LLM judge (requests for model ``mock-judge``)."""

from __future__ import annotations

import re


def _tag(text: str, name: str) -> str | None:
    """The text of the first ``<name>`` block; with sft-ray's built-in judge templates, whose tags
    carry a per-call nonce (announced before any untrusted text), only ``<name-nonce>`` counts."""
    nonce = re.search(r"names end in -([0-9a-f]+)", text)
    if nonce:
        name = f"{name}-{nonce.group(1)}"
    m = re.search(rf"<{name}>\n?(.*?)\n?</{name}>", text, re.DOTALL)
    return m.group(1) if m else None


def judge_reply(text: str) -> str:
    """The mock judge: ``[[A=B]]`` when <reference> and <candidate> match (case and spaces aside),
    else ``[[A!=B]]``; with a <rubric>, ``Rating: [[N]]`` where the <response> says ``rate=N`` (else 10).
    ``[[judge:garbage]]`` in the answer gets a reply without a verdict."""
    answer = _tag(text, "candidate") or _tag(text, "response") or ""
    if "[[judge:garbage]]" in answer + (_tag(text, "reference") or ""):
        return "I cannot decide."
    if _tag(text, "rubric") is not None:
        m = re.search(r"rate=(\d+)", answer)
        return f"The response meets the rubric.\nRating: [[{m.group(1) if m else 10}]]"
    same = " ".join((_tag(text, "reference") or "").lower().split()) == " ".join(answer.lower().split())
    return "Checked both answers.\n" + ("[[A=B]]" if same else "[[A!=B]]")
