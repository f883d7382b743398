"""Placement groups for tensor-parallel replicas, made with their actor and removed with it.

A vLLM replica with ``tensor_parallel_size > 1`` spans several GPUs: Ray Data calls
:func:`placement_group_fn`'s function once per actor it creates (generation actors, and
scoring actors of a vLLM judge; :func:`replica_args` gives both stages their wiring), and
the actor (and vLLM's workers, through ``placement_group_capture_child_tasks``) run in
that group. Ray removes a job's placement groups only when the job ends, so when an
elastic pool shrinks, the group of a released actor would keep its GPUs reserved (and
the autoscaler would keep their node) for the rest of the run. Ray Data releases an
actor by dropping its handle; Ray then shuts the actor down gracefully and the
generate stage's ``__del__`` calls :func:`release_own_placement_group`. An actor that
never started (a pending one the pool gave up) runs no code, so the driver also removes
every group it made when the generation phase ends (:func:`release_placement_groups`).
"""

from __future__ import annotations

import logging
import uuid
from typing import Any, Callable

log = logging.getLogger(__name__)

NAME_PREFIX = "sft-ray-replica-"
GPU_BUNDLE = {"GPU": 1, "CPU": 1}
_made: list[Any] = []  # groups this (driver) process made


def placement_group_fn(tp: int, bundle: dict[str, float] | None = None) -> Callable[[], dict[str, Any]]:
    """Remote args giving each generation actor its own placement group of ``tp`` bundles
    (one GPU and one CPU each unless ``bundle`` says otherwise)."""
    spec = dict(bundle or GPU_BUNDLE)

    def fn() -> dict[str, Any]:
        import ray
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        pg = ray.util.placement_group([dict(spec) for _ in range(tp)], strategy="STRICT_PACK",
                                      name=NAME_PREFIX + uuid.uuid4().hex[:12])
        _made.append(pg)
        return {"scheduling_strategy": PlacementGroupSchedulingStrategy(
            pg, placement_group_capture_child_tasks=True)}

    return fn


def replica_args(model: dict[str, Any], num_gpus: float | None) -> tuple[dict[str, Any], float | None, dict[str, Any]]:
    """A vLLM engine's actor resources: (model section for the actor, ``num_gpus`` of the actor,
    extra ``map_batches`` arguments). With ``tensor_parallel_size`` 1 the actor takes ``num_gpus``;
    above, one replica spans tp GPUs: the actor itself takes none, and vLLM's Ray executor places
    its tp workers in a placement group made for this actor (as ray.data.llm does)."""
    tp = int((model.get("engine_kwargs") or {}).get("tensor_parallel_size") or 1)
    if tp <= 1:
        return model, num_gpus or None, {}
    model = {**model, "engine_kwargs": {**model["engine_kwargs"], "distributed_executor_backend": "ray"}}
    return model, None, {"ray_remote_args_fn": placement_group_fn(tp)}


def release_own_placement_group() -> bool:
    """Remove the placement group this actor runs in, if sft-ray made it for this actor
    (a group of the user's, around the whole job, is left alone). Returns whether one was
    removed. Never raises: it runs while the actor is being torn down."""
    try:
        import ray
        from ray.util import get_current_placement_group, placement_group_table, remove_placement_group

        if not ray.is_initialized():
            return False
        pg = get_current_placement_group()
        if pg is None or not str(placement_group_table(pg).get("name", "")).startswith(NAME_PREFIX):
            return False
        remove_placement_group(pg)  # ends this actor too: it is on its way out
        return True
    except Exception as e:  # teardown: nothing to raise to
        log.debug("could not remove this replica's placement group: %s", e)
        return False


def release_placement_groups() -> int:
    """Remove every group this process made that is still there; returns how many."""
    if not _made:
        return 0
    from ray.util import placement_group_table, remove_placement_group

    removed = 0
    while _made:
        pg = _made.pop()
        try:
            if placement_group_table(pg).get("state") != "REMOVED":
                remove_placement_group(pg)
                removed += 1
        except Exception as e:  # Ray already shut down: nothing left to remove
            log.debug("could not remove placement group %s: %s", pg.id, e)
    return removed
