"""Chat messages and Responses items, both ways: parallel calls become one assistant turn, tool
results keep their tool's name, developer becomes system, and a bad item names its field."""

from __future__ import annotations

import pytest

from sft_ray.messages import (
    FormatError,
    arguments_text,
    text_of,
    to_chat,
    to_responses_input,
    to_responses_output,
    tool_choice_to_chat,
    tool_choice_to_responses,
    tool_to_chat,
    tool_to_responses,
)

RESPONSES_ITEMS = [
    {"role": "developer", "content": "Be brief."},
    {"role": "user", "content": [{"type": "input_text", "text": "Weather in Paris, "}, {"type": "input_text", "text": "and 1+2?"}]},
    {"type": "function_call", "call_id": "c1", "name": "get_weather", "arguments": '{"city": "Paris"}'},
    {"type": "function_call", "call_id": "c2", "name": "add", "arguments": {"a": 1, "b": 2}},
    {"type": "function_call_output", "call_id": "c1", "output": "cold"},
    {"type": "function_call_output", "call_id": "c2", "output": [{"type": "output_text", "text": "3"}]},
    {"role": "assistant", "content": "Cold; 3."},
]


def test_responses_items_become_chat_messages_with_parallel_calls_in_one_turn():
    chat = to_chat(RESPONSES_ITEMS, "input")
    assert chat == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather in Paris, and 1+2?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
            {"id": "c2", "type": "function", "function": {"name": "add", "arguments": '{"a":1,"b":2}'}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "cold", "name": "get_weather"},
        {"role": "tool", "tool_call_id": "c2", "content": "3", "name": "add"},
        {"role": "assistant", "content": "Cold; 3."},
    ]
    # and back: what the Responses API is sent each turn, and what NeMo Gym's /verify reads
    items = to_responses_input(chat)
    assert [i.get("type") for i in items] == ["message", "message", "function_call", "function_call",
                                              "function_call_output", "function_call_output", "message"]
    assert items[0] == {"type": "message", "role": "system", "content": "Be brief."}
    assert items[3] == {"type": "function_call", "call_id": "c2", "name": "add", "arguments": '{"a":1,"b":2}'}
    out = to_responses_output(chat[2:])
    assert [(o["type"], o["id"]) for o in out] == [("function_call", "fc_c1"), ("function_call", "fc_c2"),
                                                   ("function_call_output", "fco_1"),
                                                   ("function_call_output", "fco_2"), ("message", "msg_3")]


def test_a_reasoning_item_joins_the_assistant_turn_after_it():
    chat = to_chat([{"role": "user", "content": "q"},
                    {"type": "reasoning", "summary": [{"type": "summary_text", "text": "think"}]},
                    {"role": "assistant", "content": "a"}], "input")
    assert chat == [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "reasoning_content": "think"}]
    assert to_responses_output(chat[1:])[0] == {"type": "reasoning", "id": "rs_0",
                                                 "summary": [{"type": "summary_text", "text": "think"}]}


@pytest.mark.parametrize("items, field, reason", [
    ([], "input", "expected a non-empty list of messages"),
    (["hi"], "input[0]", "expected a message object"),
    ([{"content": "x"}], "input[0]", "expected a message with a string 'role'"),
    ([{"role": "user", "content": [{"type": "input_image", "image_url": "u"}]}], "input[0].content[0]",
     "expected a text part"),
    ([{"role": "user", "content": 7}], "input[0].content", "content must be a string or a list of text parts, got int"),
    ([{"type": "function_call", "name": "f"}], "input[0]", "a function_call needs string 'call_id' and 'name'"),
    ([{"role": "tool", "content": "r"}], "input[0]", "a tool message needs a string 'tool_call_id'"),
    ([{"type": "web_search_call"}], "input[0]", "item type 'web_search_call' is not supported"),
])
def test_a_bad_item_names_its_field(items, field, reason):
    with pytest.raises(FormatError) as err:
        to_chat(items, "input")
    assert err.value.field == field and reason in str(err.value) and str(err.value).startswith(f"field {field}: ")


def test_tools_and_tool_choice_in_both_forms():
    flat = {"type": "function", "name": "f", "description": "d", "parameters": {"type": "object"}, "strict": True}
    nested = tool_to_chat(flat, "tools[0]")
    assert nested == {"type": "function", "function": {"name": "f", "description": "d",
                                                       "parameters": {"type": "object"}, "strict": True}}
    assert tool_to_chat(nested, "tools[0]") == nested and tool_to_responses(nested) == flat
    assert tool_to_chat({"name": "g"}, "t")["function"]["parameters"] == {"type": "object", "properties": {}}
    with pytest.raises(FormatError, match="field tools\\[1\\]: only function tools are supported, got 'web_search'"):
        tool_to_chat({"type": "web_search"}, "tools[1]")
    with pytest.raises(FormatError, match="needs a non-empty string 'name'"):
        tool_to_chat({"type": "function", "function": {"name": ""}}, "t")
    named_chat = {"type": "function", "function": {"name": "f"}}
    assert tool_choice_to_responses(named_chat) == {"type": "function", "name": "f"}
    assert tool_choice_to_chat({"type": "function", "name": "f"}) == named_chat
    assert tool_choice_to_chat("required") == tool_choice_to_responses("required") == "required"


def test_text_and_arguments():
    assert text_of(None, "c") == "" and text_of(["a", {"text": "b"}, {"type": "refusal", "refusal": "c"}], "c") == "abc"
    assert arguments_text('{"a": 1}') == '{"a": 1}' and arguments_text(None) == "{}" and arguments_text({"a": 1}) == '{"a":1}'
