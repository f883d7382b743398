"""Placement groups made for tensor-parallel replicas are removed with their actor (issue 9, item 19).

The groups here have CPU bundles, so they are really placed on the local cluster; the
generation actors really run in them against the mock server. Ray Data releases an actor
the same way when an elastic pool shrinks and when a dataset ends: it drops the handle.
"""

from __future__ import annotations

import json
import time

import pyarrow as pa

from sft_ray.backends.base import Secret
from sft_ray.config import ModelConfig
from sft_ray.placement import NAME_PREFIX, placement_group_fn, release_placement_groups


def _ours() -> dict[str, str]:
    from ray.util import placement_group_table

    return {pid: t["state"] for pid, t in placement_group_table().items() if t["name"].startswith(NAME_PREFIX)}


def test_replica_placement_groups_are_removed_with_their_actors(ray_cluster, mock_server):
    import ray
    import ray.data

    from sft_ray.stages.generate import GenerateStage

    before = set(_ours())
    model = ModelConfig(name="mock", base_url=mock_server.url, timeout_s=5).model_dump()
    model["api_key"] = Secret(None)
    n = 48
    table = pa.table({"id": [str(i) for i in range(n)], "sample_index": [0] * n,
                      "row": [json.dumps({"prompt": f"p{i}"}) for i in range(n)],
                      "source": [f"in.jsonl:{i + 1}" for i in range(n)], "bad": pa.nulls(n, pa.string())})
    ds = ray.data.from_arrow(table).repartition(6)
    ds = ds.map_batches(GenerateStage, fn_constructor_kwargs={"model": model, "sampling": {}, "max_in_flight": 4},
                        batch_size=8, compute=ray.data.ActorPoolStrategy(min_size=1, max_size=2),
                        num_cpus=0.5, ray_remote_args_fn=placement_group_fn(2, {"CPU": 0.5}))
    rows = ds.take_all()
    assert len(rows) == n and not any(r["failed"] for r in rows)
    made = {pid: s for pid, s in _ours().items() if pid not in before}
    assert made, "no placement group was made for the replicas"
    # Each actor that served removes its own group as Ray Data lets it go (as on a shrink).
    deadline = time.monotonic() + 60
    while "REMOVED" not in made.values() and time.monotonic() < deadline:
        time.sleep(0.5)
        made = {pid: s for pid, s in _ours().items() if pid in made}
    assert "REMOVED" in made.values(), made  # before the fix: CREATED until the job ended
    # The driver removes what is left (actors that never started run no code) at the phase's end.
    release_placement_groups()
    assert set(_ours()[pid] for pid in made) == {"REMOVED"}
