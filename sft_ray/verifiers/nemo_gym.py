"""``verifier.type: nemo_gym``: the reward a NeMo Gym resources server's ``/verify`` gave.

The generation actor asks ``/verify`` at the end of each episode, inside the episode's
session (a stateful server verifies from the state that session built), and keeps the
answer on the rollout as ``verify_result``. This verifier turns it into the reward and
metrics: ``reward`` plus every numeric field of the answer (``reward_components`` as
``reward_components.<name>``). ``mask_sample: true`` means the server could not judge
the sample (its own infrastructure failure): that is an error, never a reward of 0.
"""

from __future__ import annotations

import math
from typing import Any


class NemoGymVerify:
    wants_rollout = True  # reads the rollout's verify_result, beside the input row

    def __init__(self, cfg: dict[str, Any]) -> None:
        self.cfg = cfg

    def __call__(self, row: dict[str, Any], response: str, rollout: dict[str, Any] | None = None) -> dict[str, Any]:
        answer = (rollout or {}).get("verify_result")
        if not isinstance(answer, dict):
            raise ValueError("no verify_result on the rollout (the episode was not verified by its environment)")
        if answer.get("mask_sample"):
            reason = answer.get("failure_reason") or answer.get("failure_kind") or "no reason given"
            raise ValueError(f"the resources server masked this sample: {reason}")
        reward = answer.get("reward")
        # The server's JSON is checked, not coerced: "1" or true is a broken server, not a reward of 1
        # (finiteness and verifier.reward_range are checked by the scoring stage, for every verifier).
        if isinstance(reward, bool) or not isinstance(reward, (int, float)):
            raise ValueError(f"/verify answered a reward that is not a number: {reward!r:.100}")
        out: dict[str, Any] = {"reward": float(reward)}
        for key, value in answer.items():
            if key == "reward" or isinstance(value, bool):
                continue
            if isinstance(value, (int, float)) and math.isfinite(value):
                out[key] = float(value)
        for name, value in (answer.get("reward_components") or {}).items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                out[f"reward_components.{name}"] = float(value)
        return out
