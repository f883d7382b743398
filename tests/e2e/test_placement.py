"""Placement groups made for tensor-parallel replicas are removed with their actors (issue 9,
item 19), and made without Ray Data's deprecated ``ray_remote_args_fn`` (issue 22, item 19).

The groups here have CPU bundles, so they are really placed on the local cluster; the
generation actors make them and really run against the mock server. Ray Data releases an
actor the same way when an elastic pool shrinks and when a dataset ends: it drops the handle.
"""

from __future__ import annotations

import json
import time
import warnings

import pyarrow as pa

from sft_ray.backends.base import Secret
from sft_ray.config import OpenAIModelConfig
from sft_ray.placement import NAME_PREFIX, release_placement_groups


def _ours() -> dict[str, str]:
    from ray.util import placement_group_table

    return {pid: t["state"] for pid, t in placement_group_table().items() if t["name"].startswith(NAME_PREFIX)}


def test_replica_placement_groups_are_made_by_and_removed_with_their_actors(ray_cluster, mock_server):
    import ray
    import ray.data

    from sft_ray.stages.generate import GenerateStage

    before = set(_ours())
    model = OpenAIModelConfig(name="mock", base_url=mock_server.url, timeout_s=5).model_dump()
    model["api_key"] = Secret(None)
    model["replica_bundles"] = [{"CPU": 0.5}] * 2  # what replica_args gives a tp=2 vLLM model, in CPUs
    n = 48
    table = pa.table({"id": [str(i) for i in range(n)], "sample_index": [0] * n,
                      "row": [json.dumps({"prompt": f"p{i}"}) for i in range(n)],
                      "source": [f"in.jsonl:{i + 1}" for i in range(n)], "bad": pa.nulls(n, pa.string())})
    from sft_ray.raynoise import data_context

    data_context()  # as the pipeline makes it (Ray's own flags do not warn)
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)  # Ray's RayDeprecationWarning is one
        ds = ray.data.from_arrow(table).repartition(6)
        ds = ds.map_batches(GenerateStage, fn_constructor_kwargs={"model": model, "sampling": {}, "requests_per_actor": 4},
                            batch_size=8, compute=ray.data.ActorPoolStrategy(min_size=1, max_size=2), num_cpus=0.5)
        rows = ds.take_all()
    assert len(rows) == n and not any(r["failed"] for r in rows)
    made = {pid: s for pid, s in _ours().items() if pid not in before}
    assert made, "no placement group was made for the replicas"
    # Each actor that served removes its own group as Ray Data lets it go (as on a shrink).
    deadline = time.monotonic() + 60
    while "REMOVED" not in made.values() and time.monotonic() < deadline:
        time.sleep(0.5)
        made = {pid: s for pid, s in _ours().items() if pid in made}
    assert "REMOVED" in made.values(), made  # before issue 9's fix: CREATED until the job ended
    # The driver removes what is left at the phase's end.
    release_placement_groups()
    assert set(_ours()[pid] for pid in made) == {"REMOVED"}


def test_generate_wiring_passes_no_deprecated_remote_args():
    from sft_ray.configload import load_config
    from sft_ray.stages.generate import wiring

    cfg = load_config(None, ["input=x", "output=o", "model.backend=vllm",
                             "model.engine_kwargs.tensor_parallel_size=2"])
    args = wiring(cfg, {"per_actor": 4, "batch_size": 8, "min_actors": 1, "max_actors": 1})
    assert "ray_remote_args_fn" not in args and "scheduling_strategy" not in args and args["num_gpus"] is None
    assert args["fn_constructor_kwargs"]["model"]["replica_bundles"] == [{"GPU": 1, "CPU": 1}] * 2


def test_a_run_gives_no_deprecation_warning(ray_cluster, mock_server, tmp_path):
    """Issue 22 item 19: a run warned about `ray_remote_args_fn` (tensor-parallel vLLM) and about
    three deprecated DataContext flags Ray's own constructor sets. The context is made afresh
    here (Ray keeps one per process; another test may have made it already)."""
    import ray.data.context
    from conftest import make_config, write_jsonl

    from sft_ray.job import EXIT_OK, run

    inp = write_jsonl(tmp_path / "in.jsonl", [{"prompt": f"\\boxed{{{i}}}", "expected_answer": str(i)}
                                              for i in range(8)])
    cfg = make_config(tmp_path, mock_server, inp, "verifier.type=math")
    ray.data.context._default_context = None  # private: the only way to make Ray build it again
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        assert run(cfg, say=lambda s: None) == EXIT_OK
    deprecations = [str(w.message) for w in seen if issubclass(w.category, DeprecationWarning)]
    assert not deprecations, deprecations
