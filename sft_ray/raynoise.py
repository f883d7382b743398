"""Ray's noise on every run, silenced at its source.

:func:`quiet_ray` runs once in the driver after ``ray.init``. It does two things.
Ray Data logs "Dataset ... execution finished in N seconds" at INFO on the console
after every run; our own progress line and report already say that, so its logger
is set to WARNING. And Ray's one false alarm is absorbed:

Every Ray Data actor pool passes its ``DataContext`` and map function to each actor
as ``ObjectRef`` constructor arguments (``ray.put`` in Ray Data's ``MapOperator``)
and creates the actors with ``max_restarts=-1``. Ray's core worker then logs, once
per process, at ERROR level::

    core_worker.cc:...: Actor with class name: 'MapWorker(MapBatches(GenerateStage))' ... has
    constructor arguments in the object store and max_restarts > 0. If the arguments in the
    object store go out of scope or are lost, the actor restart will fail. (ray-project/ray#53727)

For Ray Data it is a false alarm: the operator holds both references for as long as
its pool lives, so a restarted actor finds its arguments. Nothing in sft-ray's own
arguments causes it (a pool whose constructor takes no arguments logs it too), so it
cannot be fixed on our side, and the log level of Ray's C++ core is process-wide
(lowering it would hide real errors). Since the line is logged once per process, the
driver spends that "once" on a throwaway actor while fd 2 is captured, and passes
every other line captured meanwhile back to stderr. The throwaway actor is pinned to a
node that does not exist, so it is never placed: killing an actor while the GCS is leasing
it a worker made the GCS print "Failed to kill actor NIL_ID ... Socket closed" on the
console in about one run in two (`ray.init` then `quiet_ray()`, 4 of 8 runs; pinned: 0 of 8).
"""

from __future__ import annotations

import os
import re
import sys
import tempfile

NOTICE = b"has constructor arguments in the object store"
# Ray 2.60's DataContext() assigns every field through its own __setattr__, which warns about
# the deprecated ones (use_push_based_shuffle, use_polars, use_arrow_tensor_v2) though nobody
# set them: three DeprecationWarnings per process that names no setting of ours.
_CONTEXT_FLAGS = re.compile(r"`(use_push_based_shuffle|use_polars|use_arrow_tensor_v2)` is deprecated")
_done = False


def quiet_ray() -> None:
    """Call after ``ray.init``; later calls do nothing."""
    global _done
    if _done:
        return
    _done = True
    import logging

    logging.getLogger("ray.data._internal.execution.streaming_executor").setLevel(logging.WARNING)
    _absorb_actor_restart_notice()


def _absorb_actor_restart_notice() -> None:
    """Trigger Ray's once-per-process constructor-arguments notice where nobody sees it."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    # Pinned to a node that does not exist: the actor is never placed, so no worker is leased
    # for it (killing an actor while the GCS leases it a worker makes the GCS log "Failed to
    # kill actor NIL_ID ... Socket closed" on the console).
    nowhere = NodeAffinitySchedulingStrategy(node_id="de" * 28, soft=False)  # no such node (all ff is nil)

    @ray.remote(num_cpus=0, max_restarts=1, scheduling_strategy=nowhere)
    class _NoticeProbe:
        def __init__(self, arg) -> None:
            pass

    ref = ray.put(0)  # an argument in the object store: the notice's condition
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            actor = _NoticeProbe.remote(ref)  # the core worker logs the notice synchronously, here
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
        ray.kill(actor)
        captured.seek(0)
        others = [line for line in captured.read().splitlines(keepends=True) if NOTICE not in line]
    if others:
        os.write(2, b"".join(others))


def data_context():
    """Ray Data's ``DataContext`` of this process, made (on first use) without the deprecation
    warnings Ray 2.60 gives for flags its own constructor sets (see ``_CONTEXT_FLAGS``). A
    flag that someone does set later still warns."""
    import warnings

    from ray.data import DataContext

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_CONTEXT_FLAGS.pattern, category=DeprecationWarning)
        return DataContext.get_current()
