"""Generate stage: a ``map_batches`` actor that turns samples into rollouts.

One backend per actor (an HTTP session or a vLLM engine), built on first use
inside the actor's event loop. ``__call__`` is async: Ray Data runs several
batches per actor at once, and every sample of every batch is its own
``generate()`` call, so a slow request never holds back the others beyond its
own batch. A semaphore caps the requests in flight per actor; the driver sets
the cap so that all actors together never exceed ``num_samples_in_parallel``.

Output columns: ``id``, ``sample_index``, ``rollout`` (the rollout row as JSON
text) and ``failed`` (true when generation failed, so the row goes to
``failed/`` and a resume retries it).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from typing import Any

import orjson

from sft_ray.backends import get_backend
from sft_ray.backends.base import GenerationRequest, GenerationResult, error_result
from sft_ray.errors import BUDGET_EXHAUSTED
from sft_ray.placement import release_own_placement_group
from sft_ray.rows import InputError, prompt_messages, sampling_params

log = logging.getLogger(__name__)


def build_rollout(row: dict[str, Any], rid: str, sample_index: int, prompt: list[dict[str, str]],
                  params: dict[str, Any], model_name: str | None, result: GenerationResult,
                  node_id: str | None = None) -> dict[str, Any]:
    """A rollout row: the input row's fields plus what generation produced."""
    out = dict(row)
    ok = result.error is None
    out.update(
        id=rid,
        sample_index=sample_index,
        messages=prompt + ([{"role": "assistant", "content": result.text or ""}] if ok else []),
        response=result.text if ok else None,
        reward=None,
        finish_reason=result.finish_reason,
        usage=result.usage or {"input_tokens": 0, "output_tokens": 0, "total_tokens": 0},
        model=model_name,
        sampling_params=params,
        attempts=result.attempts,
        error=result.error,
        node_id=node_id,
    )
    return out


def _node_id() -> str | None:
    """The Ray node this actor runs on (asked once per actor): which machine made a rollout."""
    try:
        import ray

        return ray.get_runtime_context().get_node_id() if ray.is_initialized() else None
    except Exception:  # outside Ray (the stage called directly): no node to name
        return None


class GenerateStage:
    """Callable class for ``Dataset.map_batches``: samples in, rollouts out."""

    def __init__(self, model: dict[str, Any], sampling: dict[str, Any], max_in_flight: int) -> None:
        self.model = model
        self.sampling = sampling
        self.max_in_flight = max_in_flight
        self.backend = get_backend(model["backend"])(model, max_in_flight)
        # What rollouts record as `model`: a backend may resolve the configured name.
        self.model_name = getattr(self.backend, "model_name", model.get("name"))
        self._ready: asyncio.Task | None = None
        self._sem: asyncio.Semaphore | None = None
        self._ready_at: float | None = None
        self.node_id = _node_id()

    async def _ensure_started(self) -> None:
        # asyncio objects must be made inside the loop that Ray Data runs us in.
        if self._ready is None:
            self._sem = asyncio.Semaphore(self.max_in_flight)
            self._ready = asyncio.ensure_future(self.backend.start())
        await self._ready
        if self._ready_at is None:
            self._ready_at = time.time()  # when the backend (an engine, for vllm) could serve

    def __del__(self) -> None:
        # Ray Data has no teardown hook for map_batches classes; release sockets here.
        try:
            self.backend.close_now()
        except Exception:
            pass
        release_own_placement_group()  # [config] a tensor-parallel replica's GPUs go with it

    async def _one(self, rid: str, k: int, text: str, source: str, bad: str | None) -> tuple[bytes, bool]:
        row = orjson.loads(text) if bad is None else {"line": text}
        if bad is not None:
            result = error_result("bad_input", bad)
            return orjson.dumps(build_rollout(row, rid, k, [], {}, self.model_name, result, self.node_id)), True
        try:
            prompt = prompt_messages(row, source)
        except InputError as e:  # cannot happen for rows that passed the read stage
            return orjson.dumps(build_rollout(row, rid, k, [], {}, self.model_name,
                                              error_result("bad_input", str(e)), self.node_id)), True
        params = sampling_params(row, self.sampling, rid, k)
        assert self._sem is not None
        async with self._sem:
            t0 = time.perf_counter()
            try:
                result = await self.backend.generate(GenerationRequest(prompt, params, f"{rid}#{k}"))
            except Exception as e:  # a backend bug must not lose the batch: record it on the row
                result = error_result("internal_error", f"{type(e).__name__}: {e}")
            latency = time.perf_counter() - t0
        if result.error is not None and result.error["type"] == BUDGET_EXHAUSTED:
            return None  # [config] never started: not written, so it stays pending for a rerun
        rollout = build_rollout(row, rid, k, prompt, params, self.model_name, result, self.node_id)
        rollout["latency_s"] = round(latency, 4)
        return orjson.dumps(rollout), result.error is not None

    async def __call__(self, batch: dict[str, Any]) -> dict[str, list[Any]]:
        await self._ensure_started()
        ids, idx = list(batch["id"]), [int(i) for i in batch["sample_index"]]
        outs = await asyncio.gather(*(
            self._one(rid, k, text, source, bad)
            for rid, k, text, source, bad in zip(ids, idx, batch["row"], batch["source"], batch["bad"])
        ))
        if any(o is None for o in outs):  # [config] samples the budget refused
            keep = [i for i, o in enumerate(outs) if o is not None]
            ids, idx, outs = [ids[i] for i in keep], [idx[i] for i in keep], [outs[i] for i in keep]
        if getattr(self.backend, "dead", False):
            # The engine died (e.g. a crashed vLLM engine core). Nothing of this batch has
            # been handed back yet, so exiting the process loses no written row: Ray restarts
            # the actor with a fresh engine and retries its batches.
            log.error("generation engine died; restarting this actor so its rows are retried")
            os._exit(1)
        return {
            "id": ids,
            "sample_index": idx,
            "rollout": [o[0].decode() for o in outs],
            "failed": [o[1] for o in outs],
            "ready_at": [self._ready_at] * len(ids),
        }
