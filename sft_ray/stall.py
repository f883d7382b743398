"""Say what a run is waiting for when it makes no progress.

The driver's :class:`StallWatch` notices that no batch arrived for
``resources.stall_warning_s`` and then says, whatever the cause, what is going on:
what each generation actor has in flight (model calls, tool calls by name, an engine
loading, each with its age, from :mod:`sft_ray.activity`), and, from the autoscaler's
cluster status (the data behind ``ray status``), the resource demands that cannot be placed,
what each node has free, and what to change. A job whose tasks or actors ask for resources
no node has free would otherwise wait forever without a word (Ray Data logs one warning,
easily missed); an engine that loads for minutes, a hung tool or a slow endpoint would too.
"""

from __future__ import annotations

import threading
import time
from typing import Callable


def _fmt(res: dict[str, float]) -> str:
    keys = [k for k in ("CPU", "GPU", "memory") if k in res] + sorted(
        k for k in res if k not in ("CPU", "GPU", "memory", "object_store_memory") and not k.startswith("node:"))
    out = []
    for k in keys:
        v = res[k]
        out.append(f"{k} {v / 2**30:.1f} GiB" if k == "memory" else f"{k} {v:g}")
    return ", ".join(out) or "nothing"


def describe_wait() -> str:
    """Pending resource demands against free resources per node, with a hint; empty when
    nothing waits for resources."""
    import ray

    try:
        from ray.autoscaler.v2.sdk import get_cluster_status

        status = get_cluster_status(ray.get_runtime_context().gcs_address)
    except Exception as e:  # the status API is best effort: say so rather than fail the run
        return f"(could not read the cluster status: {type(e).__name__}: {e})"
    nodes = status.active_nodes + status.idle_nodes
    demands = [b for d in status.resource_demands.ray_task_actor_demand for b in d.bundles_by_count]
    demands += [b for d in status.resource_demands.placement_group_demand for b in d.bundles_by_count]
    if not demands and not (status.pending_nodes or status.pending_launches):
        return ""  # nothing waits on Ray's resources (what is in flight says what the run waits on)
    lines = []
    if demands:
        lines.append("waiting for: " + "; ".join(f"{b.count} x {{{_fmt(b.bundle)}}}" for b in demands))
    for n in nodes:
        lines.append(f"  node {n.ip_address} ({n.ray_node_type_name or n.instance_type_name or 'node'}): "
                     f"free {_fmt(n.available_resources())} of {_fmt(n.total_resources())}")
    if status.pending_nodes or status.pending_launches:
        lines.append(f"  nodes starting: {len(status.pending_nodes) + len(status.pending_launches)}")
    unplaceable = [b for b in demands if not any(
        all(n.available_resources().get(k, 0) >= v for k, v in b.bundle.items()) for n in nodes)]
    if unplaceable:
        lines.append("no node has that free: lower resources.generate_num_cpus / score_num_cpus / generate_num_gpus "
                     "/ score_num_gpus (or the actor counts), or add nodes with those resources")
    return "\n".join(lines)


def describe_stall(board=None) -> str:
    """What is in flight (``board``: the run's :class:`sft_ray.activity.BoardHandle`) and what
    waits for resources (:func:`describe_wait`); never empty."""
    text = "\n".join(part for part in (board.describe() if board is not None else "", describe_wait()) if part)
    return text or "nothing is reported in flight and nothing waits for resources"


class StallWatch:
    """Calls ``say`` with ``describe()`` (:func:`describe_stall`) when :meth:`touch` was not
    called for ``after_s`` seconds (then again every ``after_s`` while it lasts). A thread;
    stop it with :meth:`close`."""

    def __init__(self, after_s: float, say: Callable[[str], None],
                 describe: Callable[[], str] = describe_stall) -> None:
        self.after_s, self.say, self.describe = after_s, say, describe
        self.last = self.progress = time.monotonic()  # last warning or progress; last progress
        self.stop = threading.Event()
        self.thread: threading.Thread | None = None
        if after_s > 0:
            self.thread = threading.Thread(target=self._watch, name="sft-ray-stall-watch", daemon=True)
            self.thread.start()

    def touch(self) -> None:
        self.last = self.progress = time.monotonic()

    def _watch(self) -> None:
        while not self.stop.wait(min(5.0, self.after_s / 4)):
            now = time.monotonic()
            if now - self.last >= self.after_s:
                text = self.describe()
                if text:  # the age of the stall itself, not of the last warning
                    self.say(f"no progress for {time.monotonic() - self.progress:.0f} s. {text}")
                self.last = time.monotonic()  # next look after another after_s

    def close(self) -> None:
        self.stop.set()
        if self.thread is not None:
            self.thread.join()
