"""What every config section shares: the error type, strict models, credential checks, and the
tagged unions (one model per verifier type, per model backend) with their flat form for run.json."""

from __future__ import annotations

import os
from typing import Annotated, Any, ClassVar, Union, get_args, get_origin

from pydantic import BaseModel, ConfigDict, Discriminator, Tag


class ConfigError(ValueError):
    """A configuration problem, worded for the user (names the field or file)."""


# Header names that carry credentials (matched case-insensitively as substrings).
_SECRET_HEADER_WORDS = ("key", "token", "secret", "auth", "password", "cookie", "credential", "signature")


def looks_secret(header: str) -> bool:
    """Whether a header's name says it carries a credential (`api-key`, `Authorization`, `x-auth-token`...)."""
    low = header.lower()
    return any(w in low for w in _SECRET_HEADER_WORDS)


def read_env_mapping(mapping: dict[str, str], key: str) -> dict[str, str]:
    """``{name: ENV_VAR}`` with the variables' values; :class:`ConfigError` names unset ones (never a value)."""
    missing = [f"{name} (from {var})" for name, var in mapping.items() if not os.environ.get(var)]
    if missing:
        raise ConfigError(f"{key}: environment variable(s) not set: {', '.join(missing)}")
    return {name: os.environ[var] for name, var in mapping.items()}


def env_var_name(header: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in header).upper()


class Strict(BaseModel):
    """A config section: unknown keys are refused (a typo would otherwise be dropped without a word)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class Tagged(Strict):
    """One member of a tagged union of config sections: the value of its key ``TAG`` (``type`` for a
    verifier, ``backend`` for a model) picks the member, whose fields are all the section may hold, so a
    key of another member is refused naming both (:func:`foreign_key`). See :func:`tagged_union`."""

    TAG: ClassVar[str]

    @classmethod
    def tag(cls) -> str:
        """This member's value of its union's key (the one value its Literal field allows)."""
        return get_args(cls.model_fields[cls.TAG].annotation)[0]


# Every union's members, by its key and by "key=value" tag (the tag is what pydantic puts in an
# error's location, so configload can tell a union's member from a field and word the error).
_MEMBERS: dict[str, list[type[Tagged]]] = {}
_BY_TAG: dict[str, type[Tagged]] = {}
_PHRASE: dict[str, str] = {}


def tagged_union(members: list[type[Tagged]], default: str, phrase: str) -> Any:
    """The annotation of a section that is one of ``members``, picked by their ``TAG`` key (``default``
    when the key is not given, so `verifier: {answer_field: x}` is the default type's section).
    ``phrase`` names members in errors: ``"the {} backend"`` -> "the vllm backend"."""
    key = members[0].TAG
    _MEMBERS[key], _PHRASE[key] = members, phrase
    for m in members:
        _BY_TAG[f"{key}={m.tag()}"] = m
    names = ", ".join(m.tag() for m in members)

    def pick(value: Any) -> str | None:
        if isinstance(value, dict):
            return f"{key}={value.get(key, default)}"
        return f"{key}={getattr(value, key)}" if isinstance(value, Tagged) else None

    choices = tuple(Annotated[m, Tag(f"{key}={m.tag()}")] for m in members)
    return Annotated[Union[choices], Discriminator(  # noqa: UP007 (a tuple of members: Union[] is the way)
        pick, custom_error_type="invalid_tag", custom_error_message=f"{key} must be one of {names}",
        custom_error_context={"key": key})]


def member_of(tag: str) -> type[Tagged] | None:
    """The union member a location part such as ``type=regex`` names (None: not a tag, a field)."""
    return _BY_TAG.get(tag)


def foreign_key(tag: str, key: str) -> str:
    """Why ``key`` is refused in the section of member ``tag`` (``backend=vllm``): "for the vllm backend",
    and which other members take it ("(omit_params applies to the openai backend)")."""
    union_key, _, value = tag.partition("=")
    phrase = _PHRASE[union_key]
    owners = [m.tag() for m in _MEMBERS[union_key] if key in m.model_fields]
    why = f"for {phrase.format(value)}"
    return why + (f" ({key} applies to {phrase.format(' / '.join(owners))})" if owners else "")


def _defaults(members: list[type[Tagged]], mode: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for m in members:
        for name, f in m.model_fields.items():
            if name not in out and not f.is_required():
                d = f.get_default(call_default_factory=True)
                out[name] = d.model_dump(mode=mode) if isinstance(d, BaseModel) else d
    return out


def flat_dump(section: BaseModel, mode: str = "python") -> dict[str, Any]:
    """``section`` dumped with every union member's keys, those of the other members at their defaults:
    the layout of run.json's config, of the config fingerprint and of the dicts actors are given, the
    same as before the sections were split by type (so run folders and fingerprints stay as they were)."""
    out = section.model_dump(mode=mode)
    for name in type(section).model_fields:
        value = getattr(section, name)
        if isinstance(value, BaseModel):
            out[name] = flat_dump(value, mode)
        elif isinstance(value, list) and value and all(isinstance(v, BaseModel) for v in value):
            out[name] = [flat_dump(v, mode) for v in value]
    if isinstance(section, Tagged):
        out = {**_defaults(_MEMBERS[section.TAG], mode), **out}
    return out


def own_keys(data: Any, key: str, default: str) -> Any:
    """A flat section as run.json holds it (:func:`flat_dump`) with only the keys of the member it
    names, so that it validates again (the other members' keys are at their defaults there)."""
    if not isinstance(data, dict):
        return data
    member = _BY_TAG.get(f"{key}={data.get(key, default)}")
    return data if member is None else {k: v for k, v in data.items() if k in member.model_fields}


def union_members(annotation: Any) -> list[type[Tagged]]:
    """The members of a field's tagged-union annotation (:func:`tagged_union`); [] for any other field."""
    args = [get_args(a)[0] if get_origin(a) is Annotated else a for a in get_args(annotation)]
    ok = args and all(isinstance(a, type) and issubclass(a, Tagged) for a in args)
    return args if ok else []


def applies_to(member: type[Tagged], key: str) -> str:
    """The members of ``member``'s union that take ``key``, in words ("the openai backend"), or ''
    when every member does."""
    members = _MEMBERS[member.TAG]
    owners = [m.tag() for m in members if key in m.model_fields]
    return "" if len(owners) == len(members) else _PHRASE[member.TAG].format(" / ".join(owners))
