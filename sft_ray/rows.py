"""The data contract: turning an input row into a prompt, an id and sampling params.

Input rows stay opaque JSON values end to end: we parse each line ourselves
(orjson) and never let Arrow infer a schema for them, because Ray Data's JSON
readers fail on or silently coerce real NeMo Gym rows (mixed string/list ``content``,
extra fields of varying types: see :mod:`sft_ray.stages.read`).
"""

from __future__ import annotations

import difflib
import hashlib
from typing import Any

import orjson

from sft_ray.messages import FormatError, text_of, to_chat, tool_choice_to_chat, tools_to_chat


class InputError(ValueError):
    """A bad input line; the message names ``file:line`` and the field."""

    def __init__(self, source: str, reason: str) -> None:
        super().__init__(f"{source}: {reason}")
        self.source = source
        self.reason = reason

    def __reduce__(self):  # picklable with its two arguments, so Ray can carry it between processes
        return (InputError, (self.source, self.reason))


def load_object(line: bytes | str, source: str) -> dict[str, Any]:
    """One row's JSON text as its object, or :class:`InputError` naming ``source`` (``file:line``)."""
    try:
        row = orjson.loads(line)
    except orjson.JSONDecodeError as e:
        raise InputError(source, f"not valid JSON ({e})") from None
    if not isinstance(row, dict):
        raise InputError(source, f"expected a JSON object, got {type(row).__name__}")
    return row


def rename_fields(row: dict[str, Any], rename: dict[str, str] | None, source: str = "<row>") -> dict[str, Any]:
    """``row`` with its top-level fields renamed by ``read.rename`` (``{column: field}``), in their
    order; the row itself when it has none of them. :class:`InputError` when a field would be
    given twice (the row has the new name already: ``{question: prompt}`` on a row with both)."""
    if not rename or not any(k in row for k in rename):
        return row
    out: dict[str, Any] = {}
    for k, v in row.items():
        name = rename.get(k, k)
        if name in out or (name != k and name in row and name not in rename):
            raise InputError(source, f"field {name}: given twice, by the row's own {name} and by {k} "
                             f"(read.rename maps {k} to {name})")
        out[name] = v
    return out


def check_row(row: dict[str, Any], source: str) -> dict[str, Any]:
    """``row`` if its prompt, tools and ``responses_create_params`` are well formed, else
    :class:`InputError` naming ``source`` and the field."""
    prompt_messages(row, source)  # validates the prompt shape early, at read time
    prompt_tools(row, source)
    rcp = row.get("responses_create_params")
    if isinstance(rcp, dict):
        from sft_ray.config import ROW_PARAM_KEYS

        for key in rcp:
            if key not in ROW_PARAM_KEYS:
                close = difflib.get_close_matches(key, ROW_PARAM_KEYS, n=1)
                hint = f"did you mean {close[0]}?" if close else "a typo?"
                raise InputError(source, f"field responses_create_params.{key}: unknown key ({hint} fields an "
                                 "API has beyond the known ones go in model.extra_body)")
        row_sampling(rcp, source)
    return row


def parse_line(line: bytes | str, source: str, rename: dict[str, str] | None = None) -> dict[str, Any]:
    """Parse one row's JSON text (a JSONL line, or a Parquet row as :mod:`sft_ray.tabular` gives it)
    into a checked input row, its fields renamed by ``rename`` (``read.rename``), or raise
    :class:`InputError` naming ``source``."""
    return check_row(rename_fields(load_object(line, source), rename, source), source)


_MAX_ALIASES = ("max_completion_tokens", "max_tokens")  # a row's own output limit, under any API's name


def row_sampling(rcp: dict[str, Any], source: str = "<row>") -> dict[str, Any]:
    """The sampling keys of a row's ``responses_create_params``, checked by the model that checks
    the config's (:class:`sft_ray.config.SamplingConfig`: types, ranges, allowed values) and
    with its coercions applied (1024.0 -> 1024); :class:`InputError` naming the field otherwise.
    Prompt and tool keys and null values are left out (tool keys are read by :func:`prompt_tools`)."""
    from pydantic import ValidationError

    from sft_ray.config import SamplingConfig

    given = {k: v for k, v in rcp.items() if k in SamplingConfig.model_fields and k not in TOOL_KEYS
             and v is not None}
    aliases = {k: rcp[k] for k in _MAX_ALIASES if rcp.get(k) is not None}
    checks = [(given, None)] + [({"max_output_tokens": v}, k) for k, v in aliases.items()]
    out: dict[str, Any] = {}
    for data, alias in checks:
        try:
            checked = SamplingConfig.model_validate(data)
        except ValidationError as e:
            err = e.errors()[0]
            # loc: the field, then union member names ("str") and list positions: keep the positions
            field = alias or str(err["loc"][0]) + "".join(f"[{p}]" for p in err["loc"][1:] if isinstance(p, int))
            raise InputError(source, f"field responses_create_params.{field}: {err['msg']} "
                             f"(got {err.get('input')!r:.100})") from None
        values = checked.model_dump(include=set(data))
        out.update({alias: values["max_output_tokens"]} if alias else values)
    return out


def prompt_messages(row: dict[str, Any], source: str = "<row>") -> list[dict[str, Any]]:
    """The prompt of a row as Chat Completions messages, from whichever of the three shapes it has.

    NeMo Gym (``responses_create_params.input``, a string or messages and Responses items
    such as ``function_call`` / ``function_call_output``, with optional ``instructions``),
    OpenAI chat (``messages``, possibly with ``tool_calls`` and ``role: tool`` turns) or plain
    (``prompt`` + optional ``system``). See :mod:`sft_ray.messages` for the conversion.
    """
    try:
        return _prompt(row)
    except FormatError as e:
        raise InputError(source, str(e)) from None


def _prompt(row: dict[str, Any]) -> list[dict[str, Any]]:
    rcp = row.get("responses_create_params")
    if rcp is not None:
        if not isinstance(rcp, dict):
            raise FormatError("responses_create_params", "expected an object")
        if "input" in rcp:
            inp = rcp["input"]
            msgs = ([{"role": "user", "content": inp}] if isinstance(inp, str)
                    else to_chat(inp, "responses_create_params.input"))
            instructions = rcp.get("instructions")
            if instructions:
                msgs = [{"role": "system", "content": text_of(instructions, "responses_create_params.instructions")},
                        *msgs]
            return msgs
    if "messages" in row:
        msgs = to_chat(row["messages"], "messages")
        # A chat row may already end with the reference reply; the prompt is what precedes it.
        while msgs and msgs[-1]["role"] == "assistant":
            msgs.pop()
        if not msgs:
            raise FormatError("messages", "no prompt left once assistant turns are removed")
        return msgs
    if "prompt" in row:
        prompt = row["prompt"]
        if not isinstance(prompt, str):
            raise FormatError("prompt", f"expected a string, got {type(prompt).__name__}")
        msgs = [{"role": "user", "content": prompt}]
        system = row.get("system")
        if system is not None:
            if not isinstance(system, str):
                raise FormatError("system", "expected a string")
            msgs.insert(0, {"role": "system", "content": system})
        return msgs
    raise FormatError("<row>", "no prompt: expected responses_create_params.input, messages, or prompt")


# Keys that describe the tools offered to the model: read by prompt_tools, not sent as sampling.
TOOL_KEYS = ("tools", "tool_choice", "parallel_tool_calls")


def prompt_tools(row: dict[str, Any], source: str = "<row>") -> dict[str, Any]:
    """The row's tools in Chat form plus ``tool_choice`` / ``parallel_tool_calls`` (each only
    when given), from ``responses_create_params`` (flat Responses tools) or the row itself
    (nested Chat tools, as OpenAI chat rows carry them)."""
    rcp = row.get("responses_create_params")
    holder, where = ((rcp, "responses_create_params.") if isinstance(rcp, dict) and "tools" in rcp
                     else (row, ""))
    out: dict[str, Any] = {}
    try:
        if holder.get("tools"):
            out["tools"] = tools_to_chat(holder["tools"], f"{where}tools")
    except FormatError as e:
        raise InputError(source, str(e)) from None
    for key in ("tool_choice", "parallel_tool_calls"):
        value = (rcp or {}).get(key) if isinstance(rcp, dict) and key in rcp else row.get(key)
        if value is not None:
            out[key] = tool_choice_to_chat(value) if key == "tool_choice" else bool(value)
    return out


def row_id(row: dict[str, Any]) -> str:
    """A stable id: the row's own ``id`` if it has one, else a hash of its content."""
    given = row.get("id")
    if given is not None and given != "":
        return given if isinstance(given, str) else orjson.dumps(given).decode()
    canonical = orjson.dumps(row, option=orjson.OPT_SORT_KEYS)
    return hashlib.blake2b(canonical, digest_size=8).hexdigest()


def sample_seed(base: int | None, rid: str, sample_index: int) -> int:
    """Per-sample seed, stable across runs and machines (Python's hash() is salted)."""
    h = hashlib.blake2b(f"{base or 0}:{rid}:{sample_index}".encode(), digest_size=4).digest()
    return int.from_bytes(h, "little") & 0x7FFFFFFF


def sampling_params(row: dict[str, Any], defaults: dict[str, Any], rid: str, sample_index: int) -> dict[str, Any]:
    """Config defaults, overridden by the row's own ``responses_create_params``, plus the sample seed."""
    params = {k: v for k, v in defaults.items() if v is not None}
    rcp = row.get("responses_create_params")
    if isinstance(rcp, dict):
        params.update(row_sampling(rcp))  # checked when the row was read; here for the coerced values
        for alias in _MAX_ALIASES:  # a row's own limit wins, under any name
            if alias in params:
                value = params.pop(alias)
                if rcp.get("max_output_tokens") is None:
                    params["max_output_tokens"] = value
    params["seed"] = sample_seed(params.get("seed"), rid, sample_index)
    return params


# Names of one setting: omitting one omits the other (model.omit_params).
_PARAM_ALIASES = {"reasoning": "reasoning_effort", "reasoning_effort": "reasoning"}


def drop_params(params: dict[str, Any], omit: list[str] | set[str] | None) -> dict[str, Any]:
    """``params`` without the keys ``model.omit_params`` names (and their aliases): what is neither
    sent to the model nor recorded as used."""
    if not omit:
        return params
    names = set(omit) | {_PARAM_ALIASES[n] for n in omit if n in _PARAM_ALIASES}
    return {k: v for k, v in params.items() if k not in names}


# Fields a rollout row gets from the pipeline. An input field of the same name is not lost:
# build_rollout moves it to ``input_fields`` and :func:`input_row` gives it back.
GENERATED_FIELDS = frozenset({
    "id", "sample_index", "messages", "tools", "response", "reasoning", "reward", "metrics", "finish_reason",
    "usage", "model", "sampling_params", "attempts", "error", "node_id", "latency_s", "termination",
    "num_model_calls", "num_tool_calls", "num_tool_errors", "num_malformed_tool_calls", "num_invalid_tool_arguments",
    "input_fields",
    "verify_result", "parallel_tool_calls", "tool_choice", "source_file", "source_line",
    "previous", "rescore_attempts",  # `sft-ray rescore`: the reward it replaced; its tries of a failing row
})


def split_input(row: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(fields that keep their name on the rollout, fields the rollout shadows)."""
    kept = {k: v for k, v in row.items() if k not in GENERATED_FIELDS}
    shadowed = {k: v for k, v in row.items() if k in GENERATED_FIELDS}
    return kept, shadowed


def input_row(rollout: dict[str, Any]) -> dict[str, Any]:
    """The input row a rollout was made from, every field with its original value
    (what verifiers look reference answers up in)."""
    row = {k: v for k, v in rollout.items() if k not in GENERATED_FIELDS}
    row.update(rollout.get("input_fields") or {})
    return row
