"""Loading a run config: YAML file, ``dotted.key=value`` overrides, validation into
:class:`sft_ray.config.RunConfig`, with errors that name each field."""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Annotated, Any, get_args, get_origin

import yaml
from pydantic import AliasChoices, BaseModel, ValidationError

from sft_ray.config import ConfigError, RunConfig, foreign_key, member_of, union_members

# The other names a top-level key is accepted by (NeMo Gym's: `input_jsonl_fpath` for `input`), each
# with its own name: a YAML key and an override by either name are one key.
ALIASES = {alias: name for name, f in RunConfig.model_fields.items() if isinstance(f.validation_alias, AliasChoices)
           for alias in f.validation_alias.choices if alias != name}


def _parse_value(raw: str) -> Any:
    """`key=value` overrides take YAML scalars/flow values: 4 -> int, true -> bool, [1,2] -> list."""
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw


def override_parts(item: str) -> tuple[list[str], str]:
    """(the dotted key's parts, the raw value) of an override ``a.b.c=value``. Hydra's ``+a.b=value`` and
    ``++a.b=value`` (add, force-add; NeMo Gym's documented commands use them) mean the same here; a
    top-level key by its other name (:data:`ALIASES`) is given by its own."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not of the form dotted.key=value")
    key, raw = item.split("=", 1)
    parts = [p for p in key.strip().removeprefix("+").removeprefix("+").split(".") if p]
    if not parts:
        raise ConfigError(f"override {item!r} has an empty key")
    parts[0] = ALIASES.get(parts[0], parts[0])
    return parts, raw


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``a.b.c=value`` overrides (:func:`override_parts`) to a nested dict (in place, and returned)."""
    for key in list(data):  # a YAML's top-level keys by their own names, as the overrides'
        if key in ALIASES:
            data[ALIASES[key]] = data.pop(key)
    for item in overrides:
        parts, raw = override_parts(item)
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


def _section_at(loc: tuple[Any, ...]) -> type[BaseModel] | None:
    """The config section (model class) a pydantic location leads to, from :class:`RunConfig`."""
    model: type[BaseModel] | None = RunConfig
    for p in loc:
        if isinstance(p, str) and member_of(p) is not None:
            model = member_of(p)
        elif isinstance(p, str):
            f = model.model_fields.get(p) if model is not None else None
            model = _section_of(f.annotation) if f is not None else None
    return model


def _section_of(annotation: Any) -> type[BaseModel] | None:
    """The section a field holds: itself, or the model inside ``X | None``, ``list[X]``, a tagged union."""
    if get_origin(annotation) is Annotated:
        annotation = get_args(annotation)[0]
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    members = union_members(annotation)
    if members:
        return members[0]  # the location names the member next (its tag)
    return next((m for m in map(_section_of, get_args(annotation)) if m is not None), None)


def _nearest(loc: tuple[Any, ...]) -> str:
    """" (did you mean temperature?)" for an unknown key at ``loc``: the closest key of its section
    (difflib's ratio; a top-level key's other names count), or ''."""
    section = _section_at(loc[:-1])
    if section is None:
        return ""
    known = list(section.model_fields) + (list(ALIASES) if section is RunConfig else [])
    close = difflib.get_close_matches(str(loc[-1]), known, n=1, cutoff=0.6)
    return f"(did you mean {close[0]}?)" if close else ""


def format_validation_error(err: ValidationError, source: str, section: str = "") -> str:
    """One line per problem, each naming the dotted field (under ``section`` when one section was validated)."""
    lines = [f"invalid configuration ({source}):"]
    for e in err.errors():
        loc, tag = _where(e["loc"])
        loc = ".".join(p for p in (section, loc) if p) or "<root>"
        if e["type"] == "extra_forbidden":
            why = foreign_key(tag, str(e["loc"][-1])) if tag else ""
            if "applies to" not in why:
                why = f"{why} {_nearest((*section.split('.'), *e['loc']) if section else e['loc'])}".strip()
            lines.append(f"  {loc}: unknown key {why}".rstrip())
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
    def __init__(self, key: Any, first: int, line: int, first_name: Any = None):
        as_ = f", as {first_name!r}" if first_name is not None and first_name != key else ""
        super().__init__(f"{line}: key {key!r} is given twice (first on line {first}{as_}); remove one")
        self.line = line


class _UniqueKeyLoader(yaml.SafeLoader):
    """A SafeLoader that refuses a key given twice in one mapping (PyYAML keeps the last one silently,
    so `num_repeats: 4` followed later by `num_repeats: 1` would quietly run with 1); at the top level a
    key and its other name (:data:`ALIASES`: `input` and `input_jsonl_fpath`) are one key."""

    def construct_document(self, node: yaml.Node) -> Any:
        self._root = node
        return super().construct_document(node)

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, tuple[int, Any]] = {}
        top = node is getattr(self, "_root", None)
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor` may repeat; YAML merges those
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                one = ALIASES.get(key, key) if top else key
                first = seen.get(one)
            except TypeError:  # an unhashable key: SafeLoader's own error says so below
                continue
            line = key_node.start_mark.line + 1
            if first is not None:
                raise _DuplicateKey(key, first[0], line, first[1])
            seen[one] = (line, key)
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
