"""The training formats as their consumers take them: finalize writes rows from hand-made run
folders (agent episodes with tool calls, tool results, parallel calls, input history; single-turn
rows), then `datasets` loads the folder, TRL's data utilities and SFTTrainer prepare it on the
embedded model's tokenizer, and a real tool-capable chat template renders it. (The rows themselves,
without the libraries: tests/unit/finalize/test_formats.py.)"""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest
from handmade import QWEN_TEMPLATE, TOOLS, agent_rollout, read_rows, single_rollout, write_run

from sft_ray.finalize.passes import finalize


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from sft_ray.models import resolve_model

    return AutoTokenizer.from_pretrained(resolve_model(None))


def mixed_rows(n=12):
    return [agent_rollout(i, history=(i % 3 == 0)) if i % 2 else single_rollout(i) for i in range(n)]



@pytest.mark.parametrize("fmt", ["messages", "prompt_completion", "openai"])
@pytest.mark.parametrize("file_format", ["jsonl", "parquet"])
def test_every_format_loads_with_datasets(tmp_path, fmt, file_format):
    import datasets

    write_run(tmp_path, mixed_rows())
    finalize(str(tmp_path), {"min_reward": 0.0}, 0,
             {"rows_per_shard": 5, "format": fmt, "file_format": file_format, "include_fields": ["id"]})
    # the run folder's dataset card declares the splits and one schema for every shard
    ds = datasets.load_dataset(str(tmp_path), split="train")
    assert len(ds) == 12
    by_id = {r["id"]: r for r in ds}
    conv = by_id["p5"]["messages"] if fmt != "prompt_completion" else by_id["p5"]["completion"]
    call = next(m for m in conv if m.get("tool_calls"))["tool_calls"][0]["function"]
    if fmt == "openai":
        assert json.loads(call["arguments"]) == {"city": "city5"}
    else:
        assert call["arguments"] == {"city": "city5"}  # an object again after the round trip
    tools = by_id["p5"]["tools"]
    assert (json.loads(tools) if isinstance(tools, str) else tools) == TOOLS
    assert not by_id["s4"].get("tools")  # a row without tools has none (null in the shared schema)


def test_parquet_shards_share_one_schema_with_null_and_mixed_fields(tmp_path):
    import datasets

    rows = []
    for i in range(20):
        # `extra` is all-null in the first shard's rows and changes type later; `flag` is bool or absent
        extra = None if i < 10 else (i if i % 2 else f"text{i}")
        rows.append(single_rollout(i, reward=1.0, extra=extra, flag=True if i == 15 else None))
    write_run(tmp_path, rows, files=1)
    stats = finalize(str(tmp_path), {"min_reward": 0.0}, 0,
                     {"rows_per_shard": 4, "file_format": "parquet", "include_fields": ["id", "reward", "extra", "flag"]})
    files = sorted((tmp_path / "train").glob("*.parquet"))
    assert len(files) == len(stats["shards"]) == 5
    schemas = {pq.read_schema(f) for f in files}
    assert len(schemas) == 1
    ds = datasets.load_dataset("parquet", data_dir=str(tmp_path / "train"), split="train")  # no card needed
    got = {r["id"]: r["extra"] for r in ds}
    assert got["s3"] is None and got["s11"] == 11 and got["s12"] == "text12"
    assert {r["id"] for r in ds if r["flag"]} == {"s15"}


def test_trl_renders_messages_and_prompt_completion_on_the_embedded_tokenizer(tmp_path, tokenizer):
    from trl import apply_chat_template, is_conversational

    # single-turn rows through the embedded model's own template
    for fmt in ("messages", "prompt_completion"):
        out = tmp_path / fmt
        write_run(out, [single_rollout(i) for i in range(4)])
        finalize(str(out), {"min_reward": 0.0}, 0, {"rows_per_shard": 10, "format": fmt})
        for row in read_rows(out / "train"):
            assert is_conversational(row)
            text = apply_chat_template(row, tokenizer)
            i = int(row[next(iter(row))][0]["content"].split()[-1])
            if fmt == "messages":
                assert f"question {i}" in text["text"] and f"answer {i}" in text["text"]
            else:
                assert f"question {i}" in text["prompt"] and text["completion"].startswith(f"answer {i}")
    # agent rows through a tool-capable template, with the tools passed as TRL passes them
    for fmt in ("messages", "prompt_completion"):
        out = tmp_path / f"agent-{fmt}"
        write_run(out, [agent_rollout(i) for i in range(3)])
        finalize(str(out), {"min_reward": 0.0}, 0, {"rows_per_shard": 10, "format": fmt})
        for row in read_rows(out / "train"):
            tools = row.pop("tools")
            text = apply_chat_template(row, tokenizer, tools=tools, chat_template=QWEN_TEMPLATE)
            rendered = text["text"] if fmt == "messages" else text["completion"]
            i = int(json.dumps(row).split("city")[1][0])
            assert f'{{"name": "get_weather", "arguments": {{"city": "city{i}"}}}}' in rendered
            assert f"<tool_response>\ncold in city{i}\n</tool_response>" in rendered
            if fmt == "prompt_completion":  # the completion is exactly the generated part
                assert "Weather in" not in rendered and "Weather in" in text["prompt"]


def test_tool_calls_and_results_render_through_a_qwen2_5_template(tmp_path, tokenizer):
    write_run(tmp_path, [agent_rollout(i, history=(i == 0)) for i in range(4)])
    finalize(str(tmp_path), {"min_reward": 0.0}, 0, {"rows_per_shard": 10, "file_format": "jsonl"})
    rows = read_rows(tmp_path / "train")
    assert len(rows) == 4
    for row in rows:
        text = tokenizer.apply_chat_template(row["messages"], tools=row["tools"], chat_template=QWEN_TEMPLATE,
                                             tokenize=False)
        for tool in row["tools"]:
            assert json.dumps(tool) in text  # the tool schemas, once
        for m in row["messages"]:
            for c in m.get("tool_calls") or []:
                f = c["function"]
                # arguments rendered as a JSON object, never a double-encoded string
                assert f'{{"name": "{f["name"]}", "arguments": {json.dumps(f["arguments"])}}}' in text
            if m["role"] == "tool":
                assert f"<tool_response>\n{m['content']}\n</tool_response>" in text
        assert '"arguments": "{' not in text
        assert text.count('<tool_call>\n{"name": "') == sum(len(m.get("tool_calls") or []) for m in row["messages"])


@pytest.mark.parametrize("fmt, file_format", [("prompt_completion", "parquet"), ("messages", "jsonl")])
def test_sft_trainer_prepares_the_rows_unchanged(tmp_path, tokenizer, fmt, file_format):
    """TRL's SFTTrainer on the embedded model takes the folder as `datasets` loads it, tools included;
    with prompt/completion rows its loss covers exactly the generated turns."""
    import datasets
    from trl import SFTConfig, SFTTrainer

    from sft_ray.models import resolve_model

    write_run(tmp_path, [agent_rollout(i) for i in range(3)] + [single_rollout(i) for i in range(3)])
    finalize(str(tmp_path), {}, 0, {"rows_per_shard": 4, "format": fmt, "file_format": file_format,
                                    "include_fields": ["id"]})
    ds = datasets.load_dataset(str(tmp_path), split="train")
    tok = tokenizer.__class__.from_pretrained(resolve_model(None))
    tok.chat_template = QWEN_TEMPLATE  # SmolLM2's own template ignores tools
    trainer = SFTTrainer(model=resolve_model(None), train_dataset=ds, processing_class=tok,
                         args=SFTConfig(output_dir=str(tmp_path / "out"), max_steps=1, report_to=[], use_cpu=True))
    rows = {r["id"]: r for r in trainer.train_dataset}
    assert set(rows) == {"p0", "p1", "p2", "s0", "s1", "s2"}
    ex = rows["p1"]
    text = tok.decode(ex["input_ids"])
    assert '{"name": "get_weather", "arguments": {"city": "city1"}}' in text
    assert "<tool_response>\ncold in city1\n</tool_response>" in text and "It is cold in city1" in text
    if fmt == "prompt_completion":
        trained = tok.decode([t for t, lab in zip(ex["input_ids"], ex["labels"]) if lab != -100])
        assert trained.startswith("<tool_call>\n") and "Weather in city1" not in trained
        assert "<tool_response>\ncold in city1\n</tool_response>" in trained
        assert trained.rstrip().endswith("It is cold in city1; 1 + 1 = 2.<|im_end|>")


@pytest.mark.parametrize("fraction", [0.05, 0.5])
@pytest.mark.parametrize("file_format", ["jsonl", "parquet"])
def test_dataset_card_declares_only_splits_with_rows(tmp_path, fraction, file_format):
    """32 prompts at validation_fraction 0.05 can send none to validation: the card must not declare an
    empty split (`datasets.load_dataset` on the folder then fails), and the report says what happened."""
    import datasets

    from sft_ray.finalize.stats import format_report

    write_run(tmp_path, [single_rollout(i) for i in range(32)])
    # shuffle seed 6: none of the 32 prompts falls in a 5% validation split (about one seed in five does)
    stats = finalize(str(tmp_path), {"min_reward": 0.0}, 6,
                     {"validation_fraction": fraction, "file_format": file_format})
    loaded = datasets.load_dataset(str(tmp_path))
    assert sum(len(split) for split in loaded.values()) == 32
    assert len(loaded["train"]) == stats["train_rows"]
    if fraction == 0.05:
        assert stats["validation"] == 0 and set(loaded) == {"train"}
        assert "validation: 0 samples" in format_report(stats)
    else:
        assert 0 < stats["validation"] < 32 and len(loaded["validation"]) == stats["validation"]
    report = format_report(stats)
    assert f"validation: {stats['validation']} samples" in report
