"""Regular-expression verifier."""

from __future__ import annotations

import re
from typing import Any

from sft_ray.verifiers import reference
from sft_ray.verifiers.text import normalize


class RegexMatch:
    """``verifier.pattern`` is searched in the response.

    With a capture group and a reference answer on the row, reward 1 when the
    last match's group 1 equals the reference (normalised); otherwise reward 1
    when the pattern matches at all (a format check).
    """

    def __init__(self, cfg: dict[str, Any]) -> None:
        self.cfg = cfg
        flags = re.IGNORECASE if cfg.get("options", {}).get("ignore_case") else 0
        self.pattern = re.compile(cfg["pattern"], flags | re.DOTALL if cfg.get("options", {}).get("dotall") else flags)

    def __call__(self, row: dict[str, Any], response: str) -> dict[str, Any]:
        matches = list(self.pattern.finditer(response))
        ref = reference(row, self.cfg)
        if self.pattern.groups and ref is not None:
            ok = bool(matches) and normalize(matches[-1].group(1) or "") == normalize(str(ref))
            return {"reward": float(ok), "accuracy": float(ok), "format_ok": float(bool(matches))}
        return {"reward": float(bool(matches)), "format_ok": float(bool(matches))}
