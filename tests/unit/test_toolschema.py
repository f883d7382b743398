"""A tool call's arguments against the tool's (untrusted) JSON Schema: one message for a
violation, a SchemaProblem naming the tool for a schema that cannot be applied, nothing fetched."""

from __future__ import annotations

import pytest

from sft_ray.toolschema import MAX_SCHEMA_BYTES, SchemaProblem, check_arguments

WEATHER = {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer", "minimum": 1}},
           "required": ["city"], "additionalProperties": False}


def test_arguments_that_conform_or_not():
    assert check_arguments(WEATHER, {"city": "Paris", "days": 2}, "tool get_weather") is None
    assert check_arguments(WEATHER, {}, "tool get_weather") == "'city' is a required property"
    assert check_arguments(WEATHER, {"city": "Paris", "days": 0}, "t") == "0 is less than the minimum of 1 (at $.days)"
    assert check_arguments(WEATHER, {"city": 3}, "t") == "3 is not of type 'string' (at $.city)"
    assert "'extra' was unexpected" in check_arguments(WEATHER, {"city": "x", "extra": 1}, "t")
    assert check_arguments(True, {"anything": 1}, "t") is None  # the schema `true` takes everything


@pytest.mark.parametrize("schema, message", [
    ("a string", "tool t: its parameters must be a JSON Schema object, not str"),
    ({"type": "nonsense"}, "tool t: its parameters are not a valid JSON Schema: "),
    ({"type": "object", "properties": {"a": {"minimum": "one"}}},
     "tool t: its parameters are not a valid JSON Schema: 'one' is not of type 'number' (at properties/a/minimum)"),
    ({"$ref": "https://example.com/schema.json"}, "tool t: its parameters schema has a $ref that cannot be resolved"),
    ({"$ref": "#/definitions/missing"}, "tool t: its parameters schema has a $ref that cannot be resolved"),
    ({"description": "x" * MAX_SCHEMA_BYTES}, f"bytes, over the {MAX_SCHEMA_BYTES} bytes allowed"),
])
def test_a_schema_that_cannot_be_applied_names_the_tool(schema, message):
    with pytest.raises(SchemaProblem) as err:
        check_arguments(schema, {"a": 1}, "tool t")
    assert message in str(err.value)


def test_a_schema_nested_past_what_json_reads_is_a_problem_not_a_crash():
    deep: dict = {}
    node = deep
    for _ in range(300):
        node["not"] = {}
        node = node["not"]
    with pytest.raises(SchemaProblem, match="tool t: its parameters schema"):
        check_arguments(deep, {}, "tool t")
