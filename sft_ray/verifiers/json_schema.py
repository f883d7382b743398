"""Structured output: the reply parsed as JSON and validated against a JSON Schema
(``jsonschema``, the reference validator for Python; drafts 3 to 2020-12)."""

from __future__ import annotations

import functools
import re
from typing import Any

import orjson

_FENCE = re.compile(r"```[ \t]*([\w-]*)[^\n]*\n(.*?)```", re.DOTALL)


def extract_json(text: str) -> Any:
    """The reply's JSON value: the last fenced block (a ``json``-tagged one first), else the whole
    reply. Raises ValueError when it does not parse."""
    blocks = _FENCE.findall(text)
    tagged = [b for lang, b in blocks if lang.lower() == "json"]
    source = (tagged or [b for _, b in blocks] or [text])[-1]
    try:
        return orjson.loads(source.strip())
    except orjson.JSONDecodeError as e:
        raise ValueError(str(e)) from None


@functools.lru_cache(maxsize=256)
def _validator(schema_json: bytes):
    from jsonschema.validators import validator_for

    schema = orjson.loads(schema_json)
    cls = validator_for(schema)
    cls.check_schema(schema)  # a broken schema is a row (or config) problem, not a failed reply
    return cls(schema, format_checker=cls.FORMAT_CHECKER)


class JsonSchema:
    """Reward 1 when the reply is JSON that the schema accepts.

    The schema is the row's ``verifier.schema_field`` (an object, or a JSON string), else
    ``verifier.json_schema``. Metrics: ``json_valid`` (it parsed), ``schema_valid`` and
    ``schema_errors`` (how many violations).
    """

    def __init__(self, cfg: dict[str, Any]) -> None:
        self.field = cfg.get("schema_field", "schema")
        self.default = cfg.get("json_schema")
        if self.default is not None:
            _validator(orjson.dumps(self.default, option=orjson.OPT_SORT_KEYS))

    def _schema(self, row: dict[str, Any]) -> Any:
        schema = row.get(self.field, self.default)
        if isinstance(schema, str):
            try:
                schema = orjson.loads(schema)
            except orjson.JSONDecodeError as e:
                raise ValueError(f"field {self.field}: not a JSON schema ({e})") from None
        if not isinstance(schema, (dict, bool)):
            raise ValueError(f"row has no JSON schema in field {self.field!r} and verifier.json_schema is not set")
        return schema

    def __call__(self, row: dict[str, Any], response: str) -> dict[str, Any]:
        from jsonschema import SchemaError

        schema = self._schema(row)
        try:
            validator = _validator(orjson.dumps(schema, option=orjson.OPT_SORT_KEYS))
        except SchemaError as e:
            raise ValueError(f"field {self.field}: invalid JSON Schema: {e.message}") from None
        try:
            value = extract_json(response)
        except ValueError:
            return {"reward": 0.0, "json_valid": 0.0, "schema_valid": 0.0}
        errors = sum(1 for _ in validator.iter_errors(value))
        return {"reward": float(errors == 0), "json_valid": 1.0, "schema_valid": float(errors == 0),
                "schema_errors": float(errors)}
