"""The score stage's Ray wiring for a vLLM judge: its GPUs, or its placement group's bundles."""

from __future__ import annotations

from sft_ray.configload import load_config


def test_score_wiring_gives_a_vllm_judge_its_gpus():
    from sft_ray.stages.score import wiring

    base = ["input=x", "output=o", "model.name=m", "verifier.type=judge", "verifier.judge.model.backend=vllm",
            "resources.score_num_gpus=1"]
    one = wiring(load_config(None, base), {})
    assert one["num_gpus"] == 1 and "ray_remote_args_fn" not in one
    assert one["fn_constructor_kwargs"]["verifier"]["judge"]["model"]["backend"] == "vllm"
    tp = wiring(load_config(None, base + ["verifier.judge.model.engine_kwargs.tensor_parallel_size=2"]), {})
    # The actor takes no GPU and makes a placement group of tp GPU bundles itself (no ray_remote_args_fn).
    assert tp["num_gpus"] is None and "ray_remote_args_fn" not in tp
    assert tp["fn_constructor_kwargs"]["verifier"]["judge"]["model"]["replica_bundles"] == [{"GPU": 1, "CPU": 1}] * 2
    assert tp["fn_constructor_kwargs"]["verifier"]["judge"]["model"]["engine_kwargs"] == {
        "tensor_parallel_size": 2, "distributed_executor_backend": "ray"}
    hosted = wiring(load_config(None, ["input=x", "output=o", "model.name=m", "verifier.type=judge",
                                       "verifier.judge.model.name=j"]), {})
    assert hosted["num_gpus"] is None
