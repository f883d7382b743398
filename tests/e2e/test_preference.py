"""`train.format: preference` end to end: the pairs loaded with `datasets` and prepared by TRL's
DPOTrainer on the embedded model's tokenizer; `sft-ray run` then `filter` writing pairs from a
real run. (The pairs themselves: tests/unit/finalize/test_preference_pairs.py.)"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import make_config, write_jsonl
from handmade import QWEN_TEMPLATE, agent_rollout, read_rows, single_rollout, write_run

from sft_ray.finalize.passes import finalize


@pytest.mark.parametrize("file_format", ["jsonl", "parquet"])
def test_dpo_trainer_prepares_single_turn_and_agent_pairs(tmp_path, file_format):
    """TRL's DPOTrainer on the embedded model takes the folder as `datasets` loads it (tools included)."""
    import datasets
    from transformers import AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    from sft_ray.models import resolve_model

    good = [agent_rollout(i, 0, reward=1.0) for i in range(2)] + [single_rollout(i, 0, 1.0) for i in range(2)]
    bad = [agent_rollout(i, 1, reward=0.0) for i in range(2)] + [single_rollout(i, 1, 0.0, "no idea") for i in range(2)]
    for r in bad[:2]:
        r["messages"][-1] = {"role": "assistant", "content": "I do not know."}
    write_run(tmp_path, good + bad)
    finalize(str(tmp_path), {"min_reward": 1.0}, 0,
             {"format": "preference", "file_format": file_format, "include_fields": ["id"]})
    ds = datasets.load_dataset(str(tmp_path), split="train")
    assert len(ds) == 4
    tok = AutoTokenizer.from_pretrained(resolve_model(None))
    tok.chat_template = QWEN_TEMPLATE  # SmolLM2's own template ignores tools
    trainer = DPOTrainer(model=resolve_model(None), train_dataset=ds, processing_class=tok,
                         args=DPOConfig(output_dir=str(tmp_path / "out"), max_steps=1, report_to=[], use_cpu=True))
    rows = {r["id"]: r for r in trainer.train_dataset}
    assert set(rows) == {"p0", "p1", "s0", "s1"}
    agent = rows["p1"]
    prompt, chosen, rejected = (tok.decode(agent[k]) for k in ("prompt_ids", "chosen_ids", "rejected_ids"))
    assert "Weather in city1" in prompt and "Weather in" not in chosen
    assert '{"name": "get_weather", "arguments": {"city": "city1"}}' in chosen
    assert "<tool_response>\ncold in city1\n</tool_response>" in chosen and "It is cold in city1" in chosen
    assert "I do not know." in rejected and "It is cold" not in rejected
    single = rows["s1"]
    assert "question 1" in tok.decode(single["prompt_ids"]) and "answer 1" in tok.decode(single["chosen_ids"])
    assert "no idea" in tok.decode(single["rejected_ids"])


def test_run_and_filter_write_pairs_from_a_real_run(tmp_path, mock_server, ray_cluster):
    """`sft-ray run` with train.format [messages, preference], then `sft-ray filter RUN --format preference`."""
    from sft_ray.job import run

    rows = [{"id": f"q{i}", "prompt": f"\\boxed{{{i % 3}}}", "expected_answer": "1"} for i in range(12)]
    inp = write_jsonl(tmp_path / "in.jsonl", rows)
    cfg = make_config(tmp_path, mock_server, inp, "num_repeats=2", "verifier.type=math",
                      "responses_create_params.temperature=1.0", "train.format=[messages, preference]",
                      "preference.min_margin=1.0", "filter.min_reward=1.0")
    assert run(cfg, say=lambda s: None) == 0
    stats = json.loads((tmp_path / "run" / "stats.json").read_text())
    # the echo mock answers every sample of a prompt alike: every prompt is all-or-none
    assert stats["preference"]["pairs"] == 0
    assert stats["preference"]["no_pair_by_reason"] == {"one_sample": 0, "none_passed": 8, "all_passed": 4,
                                                        "margin_too_small": 0}
    assert sorted(p.name for p in (tmp_path / "run" / "train").iterdir()) == ["messages", "preference"]
    # give prompt q1 a failing sample by hand, then re-cut with the CLI: one pair
    part = next((tmp_path / "run" / "rollouts").glob("*.jsonl"))
    lines = [json.loads(x) for x in part.read_text().splitlines()]
    for r in lines:
        if r["id"] == "q1" and r["sample_index"] == 1:
            r["reward"] = 0.0
    part.write_text("".join(json.dumps(r) + "\n" for r in lines))
    out = subprocess.run([sys.executable, "-m", "sft_ray.cli", "filter", str(tmp_path / "run"), "--format",
                          "preference"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "preference pairs: 1 from 1 prompts" in out.stdout
    pairs = read_rows(tmp_path / "run" / "train")
    assert len(pairs) == 1 and pairs[0]["prompt"][-1]["content"] == "\\boxed{1}"
    manifest = json.loads((tmp_path / "run" / "run.json").read_text())
    assert manifest["config"]["train"]["format"] == "preference"
