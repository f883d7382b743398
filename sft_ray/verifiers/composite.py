"""Several verifiers on one row, combined into one reward (NeMo Gym's ``reward_components``)."""

from __future__ import annotations

import asyncio
import math
from typing import Any

from sft_ray.verifiers import build_verifier, call_verifier


def _reward(result: Any, name: str) -> tuple[float, dict[str, Any]]:
    if isinstance(result, (bool, int, float)) or type(result).__module__ == "numpy":
        result = {"reward": result}
    if not isinstance(result, dict) or "reward" not in result:
        raise TypeError(f"component {name} returned {result!r:.100}, not a reward")
    reward = float(result["reward"])
    if not math.isfinite(reward):
        raise ValueError(f"component {name} returned reward {reward}")
    return reward, {k: v for k, v in result.items() if k != "reward"}


class Composite:
    """Each component scores the row (at once, when they are async); the reward is their
    weighted ``mean``, their ``min``, or ``all`` (1 when every component gives 1).

    Metrics: ``<name>.reward`` and ``<name>.<metric>`` per component (numeric ones are averaged
    in stats.json) and ``reward_components`` (name -> reward). A component that fails fails the
    row: a partial reward would be a wrong one.
    """

    wants_rollout = True

    def __init__(self, cfg: dict[str, Any]) -> None:
        self.combine = cfg.get("combine", "mean")
        self.parts: list[tuple[str, float, Any]] = []
        seen: dict[str, int] = {}
        for comp in cfg["components"]:
            base = comp.get("name") or comp["type"]
            seen[base] = seen.get(base, 0) + 1
            name = base if seen[base] == 1 else f"{base}_{seen[base]}"
            self.parts.append((name, float(comp.get("weight", 1.0)), build_verifier(comp)))
        self.subverifiers = [v for _, _, v in self.parts]  # closed with this one (a judge's engine)

    async def __call__(self, row: dict[str, Any], response: str, rollout: dict[str, Any] | None = None) -> dict:
        results = await asyncio.gather(*(call_verifier(v, row, response, rollout) for _, _, v in self.parts))
        rewards: dict[str, float] = {}
        out: dict[str, Any] = {}
        for (name, _, _), result in zip(self.parts, results):
            rewards[name], metrics = _reward(result, name)
            out[f"{name}.reward"] = rewards[name]
            out.update({f"{name}.{k}": v for k, v in metrics.items()})
        if self.combine == "min":
            reward = min(rewards.values())
        elif self.combine == "all":
            reward = float(all(r >= 1.0 for r in rewards.values()))
        else:
            total = sum(w for _, w, _ in self.parts)
            reward = sum(w * rewards[name] for name, w, _ in self.parts) / total
        return {"reward": reward, "reward_components": rewards, **out}
