"""Placement groups for tensor-parallel replicas, made by their actor and removed with it.

A vLLM replica with ``tensor_parallel_size > 1`` spans several GPUs. The actor that hosts
the replica (a generation actor, or a scoring actor with a vLLM judge) takes no GPU itself:
:func:`replica_args` marks its model section with the bundles one replica needs, and the
actor makes its own placement group of those bundles when it is constructed
(:func:`acquire_replica_group`); vLLM's Ray executor places the engine's tp workers in it
(``parallel_config.placement_group``, see :mod:`sft_ray.backends.vllm`).

Why the actor and not Ray Data: giving each actor of a pool its own group through
``map_batches(ray_remote_args_fn=...)`` is deprecated in Ray 2.60 (removed in a later
release), and ``map_batches`` has no other per-actor scheduling argument. A group made by an
actor is also fate-shared with it: Ray removes a non-detached group when the actor that made
it dies, crash included. Ray Data releases an actor by dropping its handle; Ray then shuts it
down gracefully and the stage's ``__del__`` removes the group at once
(:func:`release_own_placement_group`). The driver also removes any group of this job left
when a phase ends (:func:`release_placement_groups`).
"""

from __future__ import annotations

import logging
import uuid
from typing import Any

log = logging.getLogger(__name__)

NAME_PREFIX = "sft-ray-replica-"
GPU_BUNDLE = {"GPU": 1, "CPU": 1}
_own: list[Any] = []  # the group this (actor) process made for its replica


def _job_prefix() -> str:
    import ray

    return f"{NAME_PREFIX}{ray.get_runtime_context().get_job_id()}-"


def acquire_replica_group(model: dict[str, Any]) -> Any:
    """In the actor: the placement group for this actor's replica (made now, ready later:
    ``await group.ready()``), or None when ``model`` needs none. Made once per process."""
    bundles = model.get("replica_bundles")
    if not bundles:
        return None
    if _own:
        return _own[0]
    import ray

    pg = ray.util.placement_group([dict(b) for b in bundles], strategy="STRICT_PACK",
                                  name=_job_prefix() + uuid.uuid4().hex[:12])
    _own.append(pg)
    return pg


def replica_args(model: dict[str, Any], num_gpus: float | None) -> tuple[dict[str, Any], float | None]:
    """A vLLM engine's actor resources: (model section for the actor, ``num_gpus`` of the actor).
    With ``tensor_parallel_size`` 1 the actor takes ``num_gpus``; above, one replica spans tp GPUs: the actor itself takes none, and its model section names
    the ``replica_bundles`` (one GPU and one CPU each) of the placement group the actor makes."""
    tp = int((model.get("engine_kwargs") or {}).get("tensor_parallel_size") or 1)
    if tp <= 1:
        return model, num_gpus or None
    model = {**model, "engine_kwargs": {**model["engine_kwargs"], "distributed_executor_backend": "ray"},
             "replica_bundles": [dict(GPU_BUNDLE) for _ in range(tp)]}
    return model, None


def release_own_placement_group() -> bool:
    """Remove the placement group this actor made for its replica, if any. Returns whether one
    was removed. Never raises: it runs while the actor is being torn down."""
    try:
        import ray
        from ray.util import remove_placement_group

        if not _own or not ray.is_initialized():
            return False
        remove_placement_group(_own.pop())
        return True
    except Exception as e:  # teardown: nothing to raise to
        log.debug("could not remove this replica's placement group: %s", e)
        return False


def release_placement_groups() -> int:
    """Remove every replica group of this job that is still there (in the driver, when a
    phase ends: an actor's own removal may not have run); returns how many."""
    try:
        import ray
        from ray.util import placement_group_table, remove_placement_group
        from ray.util.placement_group import PlacementGroup

        if not ray.is_initialized():
            return 0
        prefix = _job_prefix()
        table = placement_group_table()
    except Exception as e:  # Ray already shut down: nothing left to remove
        log.debug("could not list placement groups: %s", e)
        return 0
    removed = 0
    for pg_id, info in table.items():
        if str(info.get("name", "")).startswith(prefix) and info.get("state") not in ("REMOVED",):
            try:
                remove_placement_group(PlacementGroup(ray.PlacementGroupID(bytes.fromhex(pg_id))))
                removed += 1
            except Exception as e:
                log.debug("could not remove placement group %s: %s", pg_id, e)
    return removed
