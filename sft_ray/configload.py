"""Loading a run config: YAML file, ``dotted.key=value`` overrides, validation into
:class:`sft_ray.config.RunConfig`, with errors that name each field."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from sft_ray.config import ConfigError, RunConfig, foreign_key, member_of


def _parse_value(raw: str) -> Any:
    """`key=value` overrides take YAML scalars/flow values: 4 -> int, true -> bool, [1,2] -> list."""
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``a.b.c=value`` overrides to a nested dict (in place, and returned)."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form dotted.key=value")
        key, raw = item.split("=", 1)
        parts = [p for p in key.strip().split(".") if p]
        if not parts:
            raise ConfigError(f"override {item!r} has an empty key")
        node = data
        for p in parts[:-1]:
            child = node.get(p)
            if child is None:
                child = node[p] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"override {item!r}: {'.'.join(parts[:-1])} is not a section")
            node = child
        node[parts[-1]] = _parse_value(raw)
    return data


def _where(loc: tuple[Any, ...]) -> tuple[str, str | None]:
    """(the dotted field a pydantic location names, the last union member it passed through: ``type=regex``).
    A union member shows in a location as its tag (:func:`sft_ray.config.tagged_union`); the user's YAML
    has no such level, so it is left out of the name."""
    parts, tag = [], None
    for p in loc:
        if isinstance(p, str) and member_of(p) is not None:
            tag = p
        else:
            parts.append(str(p))
    return ".".join(parts), tag


def format_validation_error(err: ValidationError, source: str, section: str = "") -> str:
    """One line per problem, each naming the dotted field (under ``section`` when one section was validated)."""
    lines = [f"invalid configuration ({source}):"]
    for e in err.errors():
        loc, tag = _where(e["loc"])
        loc = ".".join(p for p in (section, loc) if p) or "<root>"
        if e["type"] == "extra_forbidden":
            why = f" {foreign_key(tag, str(e['loc'][-1]))}" if tag else ""
            lines.append(f"  {loc}: unknown key{why}")
            continue
        if e["type"] == "invalid_tag":  # a union's key with a value no member has: name the key
            key = e["ctx"]["key"]
            got = e["input"].get(key) if isinstance(e["input"], dict) else None
            loc = f"{loc}.{key}" if loc != "<root>" else key
            lines.append(f"  {loc}: {e['msg'].removeprefix(key + ' ')}" + (f" (got {got!r})" if got else ""))
            continue
        got = e.get("input")
        # Header values may be credentials: never echo them.
        hidden = isinstance(got, dict) or e["type"] == "missing" or "extra_headers" in e["loc"]
        shown = "" if hidden else f" (got {got!r})"
        msg = e["msg"].removeprefix("Value error, ")
        lines.append(f"  {loc}: {msg}{shown}" if loc != "<root>" else f"  {msg}")
    return "\n".join(lines)


class _DuplicateKey(yaml.YAMLError):
    def __init__(self, key: Any, first: int, line: int):
        super().__init__(f"{line}: key {key!r} is given twice (first on line {first}); remove one")
        self.line = line


class _UniqueKeyLoader(yaml.SafeLoader):
    """A SafeLoader that refuses a key given twice in one mapping (PyYAML keeps the last one silently,
    so `num_repeats: 4` followed later by `num_repeats: 1` would quietly run with 1)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor` may repeat; YAML merges those
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                first = seen.get(key)
            except TypeError:  # an unhashable key: SafeLoader's own error says so below
                continue
            line = key_node.start_mark.line + 1
            if first is not None:
                raise _DuplicateKey(key, first, line)
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> RunConfig:
    """Read YAML (optional), apply overrides, validate. Raises :class:`ConfigError`."""
    data: dict[str, Any] = {}
    source = str(path) if path else "overrides"
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            loaded = yaml.load(p.read_text(), Loader=_UniqueKeyLoader)  # noqa: S506 (a SafeLoader subclass)
        except _DuplicateKey as e:
            raise ConfigError(f"{p}:{e}") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"{p}: not valid YAML: {e}") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{p}: the top level must be a mapping of keys to values")
        data = loaded
    apply_overrides(data, overrides or [])
    try:
        return RunConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, source)) from None
