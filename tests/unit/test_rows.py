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


def test_unknown_sampling_keys_are_refused_in_rows_and_config():
    from sft_ray.config import ConfigError
    from sft_ray.configload import load_config

    with pytest.raises(InputError) as e:
        parse_line('{"responses_create_params": {"input": "q", "temprature": 0.2}}', "in.jsonl:3")
    assert "in.jsonl:3: field responses_create_params.temprature: unknown key (did you mean temperature?" in str(e.value)
    with pytest.raises(ConfigError) as e:
        load_config(None, ["input=x", "output=o", "model.name=m", "responses_create_params.temprature=0.2"])
    assert "responses_create_params.temprature: unknown key (did you mean temperature?)" in str(e.value)
    with pytest.raises(ConfigError) as e:
        load_config(None, ["input=x", "output=o", "model.name=m", "responses_create_params.max_tokens=5"])
    assert "use max_output_tokens" in str(e.value)


def test_a_rows_own_token_limit_wins_under_any_name():
    defaults = {"max_output_tokens": 100}
    for key in ("max_tokens", "max_completion_tokens", "max_output_tokens"):
        row = {"responses_create_params": {"input": "q", key: 7}}
        params = sampling_params(row, defaults, "i", 0)
        assert params["max_output_tokens"] == 7 and "max_tokens" not in params and "max_completion_tokens" not in params


def test_tool_history_in_both_forms_becomes_chat_messages():
    from sft_ray.rows import prompt_tools

    responses_row = {"responses_create_params": {
        "input": [{"role": "developer", "content": "dev"}, {"role": "user", "content": "weather in sf and nyc?"},
                  {"type": "function_call", "call_id": "c1", "name": "get_weather", "arguments": '{"city": "sf"}'},
                  {"type": "function_call", "call_id": "c2", "name": "get_weather", "arguments": '{"city": "nyc"}'},
                  {"type": "function_call_output", "call_id": "c1", "output": "cold"},
                  {"type": "function_call_output", "call_id": "c2", "output": "warm"}],
        "tools": [{"type": "function", "name": "get_weather", "description": "", "strict": True,
                   "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}],
        "tool_choice": "auto", "parallel_tool_calls": True}}
    msgs = prompt_messages(responses_row)
    assert msgs[0] == {"role": "system", "content": "dev"}
    assert msgs[2]["role"] == "assistant" and msgs[2]["content"] is None
    assert [c["id"] for c in msgs[2]["tool_calls"]] == ["c1", "c2"]  # one turn, two parallel calls
    assert msgs[3] == {"role": "tool", "tool_call_id": "c1", "content": "cold", "name": "get_weather"}
    tools = prompt_tools(responses_row)
    assert tools["tools"][0]["function"]["name"] == "get_weather" and tools["tools"][0]["type"] == "function"
    assert tools["tool_choice"] == "auto" and tools["parallel_tool_calls"] is True

    chat_row = {"messages": [{"role": "user", "content": "q"},
                             {"role": "assistant", "content": None, "tool_calls": [
                                 {"id": "x", "type": "function",
                                  "function": {"name": "f", "arguments": {"a": 1}}}]},
                             {"role": "tool", "tool_call_id": "x", "content": "1"}],
                "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]}
    msgs = prompt_messages(chat_row)
    assert msgs[1]["tool_calls"][0]["function"]["arguments"] == '{"a":1}'  # objects become JSON strings
    assert msgs[2]["name"] == "f"
    assert prompt_tools(chat_row)["tools"][0]["function"]["name"] == "f"
    params = sampling_params(responses_row, {}, "i", 0)
    assert not {"tools", "tool_choice", "parallel_tool_calls", "input"} & set(params)


@pytest.mark.parametrize("params, field, words", [
    ({"max_output_tokens": "many"}, "max_output_tokens", "valid integer"),
    ({"temperature": -3}, "temperature", "greater than or equal to 0"),
    ({"top_p": 0}, "top_p", "greater than 0"),
    ({"reasoning_effort": "extreme"}, "reasoning_effort", "'minimal', 'low', 'medium' or 'high'"),
    ({"max_tokens": 0}, "max_tokens", "greater than or equal to 1"),
    ({"max_completion_tokens": "lots"}, "max_completion_tokens", "valid integer"),
    ({"stop": 7}, "stop", ""),
    ({"presence_penalty": 9}, "presence_penalty", "less than or equal to 2"),
])
def test_bad_row_sampling_params_name_file_line_and_field(params, field, words):
    line = '{"responses_create_params": {"input": "q", ' + ", ".join(
        f'"{k}": {__import__("json").dumps(v)}' for k, v in params.items()) + "}}"
    with pytest.raises(InputError) as e:
        parse_line(line, "data/in.jsonl:4")
    assert str(e.value).startswith(f"data/in.jsonl:4: field responses_create_params.{field}: "), str(e.value)
    assert words in str(e.value)


def test_good_row_params_pass_and_are_coerced_like_the_configs():
    row = parse_line('{"responses_create_params": {"input": "q", "max_output_tokens": 64.0, "temperature": 0, '
                     '"top_p": null, "tools": []}}', "in.jsonl:1")
    params = sampling_params(row, {"temperature": 1.0, "top_p": 1.0, "max_output_tokens": 100}, "i", 0)
    assert params["max_output_tokens"] == 64 and isinstance(params["max_output_tokens"], int)
    assert params["temperature"] == 0.0 and params["top_p"] == 1.0  # null: the config's default
