"""Score stage: a CPU ``map_batches`` actor that adds ``reward`` and metrics to rollouts.

Kept apart from generation so it scales on its own (verifiers such as
math-verify are CPU-bound; generation actors mostly wait on the network or
sit on a GPU). A verifier that raises gives the row reward 0 and an
``error`` of type ``verifier_error``; the run goes on.
"""

from __future__ import annotations

from typing import Any

import orjson

from sft_ray.stages import Stage
from sft_ray.verifiers import build_verifier


def score_rollout(verifier, rollout: dict[str, Any]) -> dict[str, Any]:
    """Score one successful rollout in place and return it."""
    try:
        result = verifier(rollout, rollout.get("response") or "")
        reward = float(result["reward"])
        metrics = {k: v for k, v in result.items() if k != "reward"}
        rollout.update(metrics)  # top level, as NeMo Gym rollouts carry them (`jq .accuracy`)
        rollout["reward"] = reward
        rollout["metrics"] = metrics
    except Exception as e:  # a verifier bug or a row it cannot score is data, not a crash
        rollout["reward"] = 0.0
        rollout["error"] = {"type": "verifier_error", "message": f"{type(e).__name__}: {e}"[:500]}
    return rollout


class ScoreStage:
    """Callable class for ``Dataset.map_batches``: rollouts in, scored rollouts out."""

    def __init__(self, verifier: dict[str, Any]) -> None:
        self.verifier = build_verifier(verifier)

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        rollouts, rewards, tokens = [], [], []
        for text, failed in zip(batch["rollout"], batch["failed"]):
            row = orjson.loads(text)
            tokens.append(int((row.get("usage") or {}).get("output_tokens") or 0))
            if failed:
                rollouts.append(text)
                rewards.append(None)
                continue
            score_rollout(self.verifier, row)
            rollouts.append(orjson.dumps(row).decode())
            rewards.append(row["reward"])
        return {"id": list(batch["id"]), "sample_index": list(batch["sample_index"]), "rollout": rollouts,
                "failed": list(batch["failed"]), "reward": rewards, "output_tokens": tokens,
                "ready_at": list(batch["ready_at"])}


def wiring(cfg: Any, plan: dict[str, Any]) -> dict[str, Any]:
    """A CPU actor pool of its own size, whole blocks per call."""
    import ray.data

    from sft_ray.pipeline import actor_range

    lo, hi = actor_range(cfg.resources.score_actors)
    return dict(fn_constructor_kwargs={"verifier": cfg.verifier.model_dump()}, batch_size=None,
                compute=ray.data.ActorPoolStrategy(min_size=lo, max_size=hi), num_cpus=cfg.resources.score_num_cpus)


STAGE = Stage("score", ScoreStage, reads=("id", "sample_index", "rollout", "failed", "ready_at"),
              writes=("id", "sample_index", "rollout", "failed", "reward", "output_tokens", "ready_at"), wiring=wiring)
