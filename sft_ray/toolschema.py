"""Checking a tool call's arguments against the tool's JSON Schema, with ``jsonschema``.

Schemas come from input rows and tool servers, so they are untrusted: one that is not a
valid JSON Schema, is larger than :data:`MAX_SCHEMA_BYTES`, nests too deeply, or refers
(``$ref``) to something it does not contain raises :class:`SchemaProblem` naming the tool;
it never crashes the actor. A ``$ref`` to another document is never fetched (jsonschema's
``referencing`` retrieves nothing unless told to): it is a schema problem.

Validators are compiled once per distinct schema and cached (an actor sees the same few
schemas for every episode).
"""

from __future__ import annotations

from typing import Any

import orjson

MAX_SCHEMA_BYTES = 256 * 1024  # far above real tools' schemas; bounds compile time and memory
_CACHE_SIZE = 1024
_validators: dict[bytes, Any] = {}  # serialized schema -> validator, or the SchemaProblem text


class SchemaProblem(ValueError):
    """A tool's schema cannot be used to check arguments (the tool's definition, not the model, is at fault)."""


def _key(schema: Any, what: str) -> bytes:
    try:
        key = orjson.dumps(schema, option=orjson.OPT_SORT_KEYS)
    except (orjson.JSONEncodeError, TypeError) as e:  # nested past orjson's 254 levels, or not JSON
        raise SchemaProblem(f"{what}: its parameters schema cannot be read as JSON ({e})") from None
    if len(key) > MAX_SCHEMA_BYTES:
        raise SchemaProblem(f"{what}: its parameters schema is {len(key)} bytes, over the {MAX_SCHEMA_BYTES} "
                            "bytes allowed")
    return key


def validator(schema: Any, what: str) -> Any:
    """The cached jsonschema validator of ``schema``; raises :class:`SchemaProblem` naming ``what``."""
    from jsonschema.exceptions import SchemaError
    from jsonschema.validators import validator_for

    key = _key(schema, what)
    hit = _validators.get(key)
    if hit is None:
        if not isinstance(schema, (dict, bool)):
            hit = f"its parameters must be a JSON Schema object, not {type(schema).__name__}"
        else:
            try:
                cls = validator_for(schema)
                cls.check_schema(schema)
                hit = cls(schema)
            except SchemaError as e:
                where = "/".join(str(p) for p in e.path)
                hit = f"its parameters are not a valid JSON Schema: {e.message[:300]}" + (f" (at {where})"
                                                                                           if where else "")
            except RecursionError:
                hit = "its parameters schema nests too deeply"
        if len(_validators) >= _CACHE_SIZE:
            _validators.clear()
        _validators[key] = hit
    if isinstance(hit, str):
        raise SchemaProblem(f"{what}: {hit}")
    return hit


def check_arguments(schema: Any, arguments: Any, what: str) -> str | None:
    """Why ``arguments`` violate ``schema`` (one message, the most relevant error), or None when they
    conform. Raises :class:`SchemaProblem` when the schema itself cannot be applied."""
    from jsonschema.exceptions import best_match
    from referencing.exceptions import Unresolvable

    v = validator(schema, what)
    try:
        err = best_match(v.iter_errors(arguments))
    except Unresolvable as e:
        raise SchemaProblem(f"{what}: its parameters schema has a $ref that cannot be resolved "
                            f"({str(e)[:200]}); references to other documents are not fetched") from None
    except RecursionError:
        raise SchemaProblem(f"{what}: its parameters schema refers to itself without end ($ref)") from None
    if err is None:
        return None
    where = err.json_path if err.path else ""
    message = err.message if len(err.message) <= 300 else err.message[:300] + "..."
    return f"{message} (at {where})" if where else message
