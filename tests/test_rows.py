"""The data contract: three input shapes, stable ids, sampling params, bad lines named by file:line."""

from __future__ import annotations

import json

import pytest

from sft_ray.rows import InputError, parse_line, prompt_messages, row_id, sample_seed, sampling_params


def test_nemo_gym_string_and_part_lists():
    row = {"responses_create_params": {"input": [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": [{"type": "input_text", "text": "What is "}, {"type": "input_text", "text": "2+3?"}]},
    ]}, "expected_answer": "5"}
    assert prompt_messages(row) == [{"role": "system", "content": "be brief"},
                                    {"role": "user", "content": "What is 2+3?"}]
    plain = {"responses_create_params": {"input": "hi", "instructions": "sys"}}
    assert prompt_messages(plain) == [{"role": "system", "content": "sys"}, {"role": "user", "content": "hi"}]


def test_openai_chat_and_plain_shapes():
    chat = {"messages": [{"role": "developer", "content": "d"}, {"role": "user", "content": "q"},
                         {"role": "assistant", "content": "reference reply"}]}
    assert prompt_messages(chat) == [{"role": "system", "content": "d"}, {"role": "user", "content": "q"}]
    assert prompt_messages({"prompt": "p", "system": "s"}) == [{"role": "system", "content": "s"},
                                                                {"role": "user", "content": "p"}]


@pytest.mark.parametrize("line, reason", [
    ('{"prompt": "x"', "not valid JSON"),
    ('[1, 2]', "expected a JSON object"),
    ('{"foo": 1}', "no prompt"),
    ('{"prompt": 3}', "field prompt"),
    ('{"messages": []}', "field messages"),
    ('{"responses_create_params": {"input": [{"role": "user", "content": [{"type": "image"}]}]}}',
     "field responses_create_params.input[0].content[0]"),
])
def test_bad_lines_name_file_line_and_field(line, reason):
    with pytest.raises(InputError) as e:
        parse_line(line, "data/in.jsonl:7")
    assert str(e.value).startswith("data/in.jsonl:7: ")
    assert reason in str(e.value)


def test_ids_are_stable_and_given_ids_win():
    row = {"prompt": "x", "meta": {"b": 1, "a": 2}}
    same = json.loads(json.dumps({"meta": {"a": 2, "b": 1}, "prompt": "x"}))
    assert row_id(row) == row_id(same)  # key order does not matter
    assert row_id({"prompt": "y"}) != row_id(row)
    assert row_id({"id": 17, "prompt": "x"}) == "17"
    assert row_id({"id": "abc", "prompt": "x"}) == "abc"


def test_sampling_params_row_wins_and_seeds_differ_per_sample():
    defaults = {"temperature": 1.0, "top_p": 1.0, "max_output_tokens": 100, "seed": None}
    row = {"responses_create_params": {"input": "q", "temperature": 0.2, "stop": ["\n"]}}
    p0 = sampling_params(row, defaults, "id1", 0)
    p1 = sampling_params(row, defaults, "id1", 1)
    assert p0["temperature"] == 0.2 and p0["max_output_tokens"] == 100 and p0["stop"] == ["\n"]
    assert "input" not in p0
    assert p0["seed"] != p1["seed"]
    assert p0["seed"] == sample_seed(None, "id1", 0)  # deterministic
    assert sampling_params(row, {**defaults, "seed": 5}, "id1", 0)["seed"] != p0["seed"]
