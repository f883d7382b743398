"""Training-row formats, row by row: what TRL, Hugging Face chat templates and OpenAI fine-tuning
take, built from agent episodes (tool calls, tool results, parallel calls, input history) and
single-turn rows. (The libraries loading finalize's output: tests/e2e/test_formats_load.py.)"""

from __future__ import annotations

import json

import pytest
from handmade import TOOLS, agent_rollout, single_rollout

from sft_ray.finalize.formats import generated_start, train_row


def test_messages_format_has_object_arguments_and_nested_tools():
    row = train_row(agent_rollout(4), "messages")
    assert set(row) == {"messages", "tools"}
    assert row["tools"] == TOOLS
    calls = row["messages"][2]["tool_calls"]
    assert [c["function"]["arguments"] for c in calls] == [{"city": "city4"}, {"a": 4, "b": 1}]
    assert [m["role"] for m in row["messages"]] == ["system", "user", "assistant", "tool", "tool", "assistant"]
    assert row["messages"][3] == {"role": "tool", "content": "cold in city4", "tool_call_id": "c4a",
                                  "name": "get_weather"}


def test_prompt_completion_splits_at_the_first_generated_turn():
    ro = agent_rollout(3, history=True)  # input history holds an assistant turn and a tool call
    assert generated_start(ro) == 6
    row = train_row(ro, "prompt_completion")
    assert [m["role"] for m in row["prompt"]] == ["system", "user", "assistant", "tool", "assistant", "user"]
    assert [m["role"] for m in row["completion"]] == ["assistant", "tool", "tool", "assistant"]
    assert row["completion"][0]["tool_calls"][0]["function"]["arguments"] == {"city": "city3"}
    single = train_row(single_rollout(1), "prompt_completion")
    assert single == {"prompt": [{"role": "user", "content": "question 1"}],
                      "completion": [{"role": "assistant", "content": "answer 1"}]}


def test_openai_format_keeps_string_arguments_and_weights_history():
    row = train_row(agent_rollout(3, history=True), "openai")
    assert row["parallel_tool_calls"] is True and row["tools"] == TOOLS
    calls = [c for m in row["messages"] for c in m.get("tool_calls", [])]
    assert all(isinstance(c["function"]["arguments"], str) for c in calls)
    assert json.loads(calls[1]["function"]["arguments"]) == {"city": "city3"}
    weights = [(m["role"], m.get("weight")) for m in row["messages"] if m["role"] == "assistant"]
    assert weights == [("assistant", 0), ("assistant", 0), ("assistant", None), ("assistant", None)]
    assert all("name" not in m for m in row["messages"] if m["role"] == "tool")


def test_include_fields_take_nested_paths():
    ro = agent_rollout(2, input_fields={"response": "reference"})
    row = train_row(ro, "messages", ["id", "metrics.accuracy", "input_fields.response", "usage.missing"])
    assert row["id"] == "p2" and row["metrics"] == {"accuracy": 1.0}
    assert row["input_fields"] == {"response": "reference"} and "usage" not in row


def test_include_fields_may_not_name_the_format_keys():
    from sft_ray.config import ConfigError
    from sft_ray.configload import load_config

    with pytest.raises(ConfigError, match="train.include_fields: messages, tools belong to the training format"):
        load_config(None, ["input=x", "output=y", "model.name=m", "train.include_fields=[id,messages,tools.x]"])
    legacy = load_config(None, ["input=x", "output=y", "model.name=m", "train.format=parquet"]).train
    assert legacy.file_format == "parquet" and legacy.format == "messages"  # run.json written before file_format


@pytest.mark.parametrize("mode, want_content, want_rc", [
    ("keep", "The answer is 4.", "2 + 2 = 4"),
    ("drop", "The answer is 4.", None),
    ("think_tags", "<think>\n2 + 2 = 4\n</think>\n\nThe answer is 4.", None),
])
def test_reasoning_modes(mode, want_content, want_rc):
    ro = single_rollout(1, response="The answer is 4.", reasoning="2 + 2 = 4")
    last = train_row(ro, "messages", reasoning=mode)["messages"][-1]
    assert last["content"] == want_content and last.get("reasoning_content") == want_rc
    # <think> blocks written in the text are removed by `drop`, left by the others
    ro = single_rollout(1, response="<think>hmm</think>\nThe answer is 4.")
    assert train_row(ro, "messages", reasoning="drop")["messages"][-1]["content"] == "The answer is 4."
    assert "<think>hmm</think>" in train_row(ro, "messages", reasoning="keep")["messages"][-1]["content"]


def test_reasoning_content_on_episode_turns_is_kept_per_turn():
    ro = agent_rollout(1)
    ro["messages"][2]["reasoning_content"] = "I need the weather"
    row = train_row(ro, "messages", reasoning="keep")
    assert row["messages"][2]["reasoning_content"] == "I need the weather"
    tagged = train_row(ro, "openai", reasoning="think_tags")
    assert tagged["messages"][2]["content"].startswith("<think>\nI need the weather\n</think>")
    assert "reasoning_content" not in train_row(ro, "openai", reasoning="keep")["messages"][2]
