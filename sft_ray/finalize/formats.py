"""Training-row formats (``train.format``) and the one Parquet schema every shard shares.

Rollouts keep the transcript in Chat Completions form: tool-call ``arguments`` are JSON
*strings*, tools nest under ``function``. Each format turns a rollout into what its trainer
takes unchanged:

- ``messages``: ``{"messages", "tools"}`` for TRL's ``SFTTrainer`` and Hugging Face chat
  templates. Arguments become JSON *objects*: templates such as Qwen2.5's render
  ``arguments | tojson`` and would double-encode a string.
- ``prompt_completion``: TRL's conversational prompt/completion. ``prompt`` is every message
  before the first generated assistant turn, ``completion`` the generated turns (tool calls
  and tool results included), so a completion-only loss trains on exactly what the model did.
- ``openai``: OpenAI fine-tuning JSONL: arguments stay strings, ``tools`` and
  ``parallel_tool_calls`` ride along, and assistant turns that came with the input (history,
  not generated) get ``"weight": 0``.
- ``preference``: TRL's conversational preference rows, one per pair of samples of a prompt
  (:func:`preference_row`, from two ``prompt_completion`` rows): ``prompt``, ``chosen`` and
  ``rejected`` (each the generated turns of one sample, tool calls and results included), ``tools``.
"""

from __future__ import annotations

import re
from typing import Any

import orjson

from sft_ray.decontaminate import card_section

_PLAIN_ROLES = ("user", "system", "assistant")
_THINK = re.compile(r"<think>.*?</think>\s*", re.DOTALL)


def generated_start(rollout: dict[str, Any]) -> int:
    """Index in ``messages`` of the first assistant turn the model generated.

    Each model call of an episode adds one assistant message (``num_model_calls``; a
    single-turn row has one), so the generated part starts at that many assistant messages
    from the end; anything before it (system, user, history) is the prompt.
    """
    msgs = rollout.get("messages") or []
    calls = rollout.get("num_model_calls")
    want = int(calls) if isinstance(calls, int) and calls > 0 else 1
    start, seen = len(msgs), 0
    for i in range(len(msgs) - 1, -1, -1):
        if msgs[i].get("role") == "assistant":
            start, seen = i, seen + 1
            if seen == want:
                break
    return start


def _text(content: Any) -> str | None:
    if content is None or isinstance(content, str):
        return content
    if isinstance(content, list):  # content parts: keep their text
        return "".join(p.get("text", "") if isinstance(p, dict) else str(p) for p in content)
    return orjson.dumps(content).decode()


def _arguments(raw: Any, as_object: bool) -> Any:
    if as_object:
        if isinstance(raw, str):
            try:
                return orjson.loads(raw)
            except orjson.JSONDecodeError:
                return raw  # malformed (kept only when filter.drop_malformed_tool_calls is off): left as written
        return raw
    return raw if isinstance(raw, str) else orjson.dumps(raw).decode()


def _message(m: dict[str, Any], fmt: str, reasoning: str, history: bool) -> dict[str, Any]:
    role = m.get("role")
    content = m.get("content")
    if (len(m) == 2 and type(content) is str and role in ("user", "system", "assistant")
            and (role != "assistant" or not ((reasoning == "drop" and "<think>" in content)
                                             or (fmt == "openai" and history)))):
        return m  # plain text turn: nothing to convert (the common case, so it skips the work below)
    out: dict[str, Any] = {"role": "system" if role == "developer" else role, "content": _text(m.get("content"))}
    if role == "assistant":
        calls = m.get("tool_calls") or []
        if calls:
            out["tool_calls"] = [
                {"id": c.get("id"), "type": c.get("type", "function"),
                 "function": {"name": (c.get("function") or {}).get("name"),
                              "arguments": _arguments((c.get("function") or {}).get("arguments"), fmt != "openai")}}
                for c in calls
            ]
        thought = m.get("reasoning_content")
        if reasoning == "drop":
            if out["content"]:
                out["content"] = _THINK.sub("", out["content"])
        elif thought:
            if reasoning == "think_tags":
                out["content"] = f"<think>\n{thought}\n</think>\n\n{out['content'] or ''}"
            elif fmt != "openai":  # OpenAI fine-tuning has no reasoning field: keep means think_tags there or nothing
                out["reasoning_content"] = thought
        if fmt == "openai" and history:
            out["weight"] = 0  # a turn given in the input, not generated: do not train on it
    elif role == "tool":
        out["tool_call_id"] = m.get("tool_call_id")
        if fmt != "openai" and m.get("name"):
            out["name"] = m["name"]
    elif m.get("name"):
        out["name"] = m["name"]
    return out


def _get_path(row: dict[str, Any], path: str) -> tuple[bool, Any]:
    node: Any = row
    for part in path.split("."):
        if not isinstance(node, dict) or part not in node:
            return False, None
        node = node[part]
    return True, node


def _set_path(out: dict[str, Any], path: str, value: Any) -> None:
    parts = path.split(".")
    node = out
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value


def train_row(rollout: dict[str, Any], fmt: str = "messages", include_fields: list[str] | tuple[str, ...] = (),
              reasoning: str = "keep") -> dict[str, Any]:
    """One training row of format ``fmt`` from a rollout."""
    msgs = list(rollout.get("messages") or [])
    # Where the generated turns start matters to the prompt/completion split and to OpenAI's
    # weights only (finalize converts every kept rollout, so the plain format skips the search).
    start = generated_start(rollout) if fmt != "messages" else 0
    top = rollout.get("reasoning")
    if top and reasoning != "drop":
        # The rollout's reasoning belongs to its final assistant turn (unless that turn carries its own).
        for i in range(len(msgs) - 1, -1, -1):
            if msgs[i].get("role") == "assistant":
                if not msgs[i].get("reasoning_content"):
                    msgs[i] = {**msgs[i], "reasoning_content": top}
                break
    if fmt == "messages" and reasoning == "keep":
        # The common case, inlined (finalize converts every kept rollout): plain text turns pass as they are.
        conv = [m if len(m) == 2 and type(m.get("content")) is str and m.get("role") in _PLAIN_ROLES
                else _message(m, fmt, reasoning, False) for m in msgs]
    else:
        conv = [_message(m, fmt, reasoning, i < start) for i, m in enumerate(msgs)]
    out: dict[str, Any] = (
        {"prompt": conv[:start], "completion": conv[start:]} if fmt == "prompt_completion" else {"messages": conv}
    )
    tools = rollout.get("tools")
    if tools:
        out["tools"] = tools
    if fmt == "openai" and isinstance(rollout.get("parallel_tool_calls"), bool):
        out["parallel_tool_calls"] = rollout["parallel_tool_calls"]
    for path in include_fields:
        found, value = _get_path(rollout, path)
        if found:
            _set_path(out, path, value)
    return out


PREFERENCE = "preference"
# What a preference candidate carries from the scan to the per-prompt pass: its prompt/completion row.
CANDIDATE_FORMAT = "prompt_completion"


def preference_row(chosen: dict[str, Any], rejected: dict[str, Any]) -> dict[str, Any]:
    """A ``preference`` row from the ``prompt_completion`` rows of two samples of one prompt: the
    chosen sample's prompt, both completions, the tools (and the chosen sample's include_fields)."""
    out: dict[str, Any] = {"prompt": chosen["prompt"], "chosen": chosen["completion"],
                           "rejected": rejected["completion"]}
    tools = chosen.get("tools") or rejected.get("tools")
    if tools:
        out["tools"] = tools
    for k, v in chosen.items():
        if k not in ("prompt", "completion", "tools"):
            out[k] = v
    return out


# --- Parquet: one declared schema ---------------------------------------------------------------
# Every shard is written with the same schema, decided from the config alone (never inferred from
# the rows of one shard, where a field may be all-null or change type). Free-form values (tool-call
# arguments, tools, include_fields other than the known ones) use Arrow's canonical JSON extension
# type: stored as JSON text, and `datasets` decodes it back to objects (its `Json` feature).
_KNOWN_INCLUDE = {"id": "string", "sample_index": "int64", "reward": "float64"}


def parquet_schema(fmt: str, include_fields: list[str] | tuple[str, ...] = ()):
    import pyarrow as pa

    args = pa.string() if fmt == "openai" else pa.json_()
    call = pa.struct([("id", pa.string()), ("type", pa.string()),
                      ("function", pa.struct([("name", pa.string()), ("arguments", args)]))])
    fields = [("role", pa.string()), ("content", pa.string()), ("tool_calls", pa.list_(call)),
              ("tool_call_id", pa.string()), ("name", pa.string())]
    fields.append(("weight", pa.int64()) if fmt == "openai" else ("reasoning_content", pa.string()))
    conv = pa.list_(pa.struct(fields))
    cols = ([("prompt", conv), ("completion", conv)] if fmt == "prompt_completion"
            else [("prompt", conv), ("chosen", conv), ("rejected", conv)] if fmt == PREFERENCE
            else [("messages", conv)])
    cols.append(("tools", pa.json_()))
    if fmt == "openai":
        cols.append(("parallel_tool_calls", pa.bool_()))
    for top in dict.fromkeys(p.split(".")[0] for p in include_fields):
        known = _KNOWN_INCLUDE.get(top) if top in include_fields else None
        cols.append((top, getattr(pa, known)() if known else pa.json_()))
    return pa.schema(cols)


def _storage(t):
    """The schema with every JSON extension type replaced by its string storage (what we fill)."""
    import pyarrow as pa

    if isinstance(t, pa.JsonType):
        return pa.string()
    if pa.types.is_list(t):
        return pa.list_(_storage(t.value_type))
    if pa.types.is_struct(t):
        return pa.struct([(f.name, _storage(f.type)) for f in t])
    return t


def _encode(value: Any, t) -> Any:
    """A Python value laid out for the storage of type ``t`` (JSON-typed parts become JSON text)."""
    import pyarrow as pa

    if value is None:
        return None
    if isinstance(t, pa.JsonType):
        return orjson.dumps(value).decode()
    if pa.types.is_list(t) and isinstance(value, list):
        return [_encode(v, t.value_type) for v in value]
    if pa.types.is_struct(t) and isinstance(value, dict):
        return {f.name: _encode(value.get(f.name), f.type) for f in t}
    return value


def parquet_table(rows: list[dict[str, Any]], schema):
    """Rows as a table of exactly ``schema`` (missing fields are null; unknown ones are not written)."""
    import pyarrow as pa

    storage = pa.schema([(f.name, _storage(f.type)) for f in schema])
    encoded = [{f.name: _encode(r.get(f.name), f.type) for f in schema} for r in rows]
    return pa.Table.from_pylist(encoded, schema=storage).cast(schema)


def _feature_yaml(t) -> dict[str, Any]:
    import pyarrow as pa

    if isinstance(t, pa.JsonType):
        return {"dtype": "json"}
    if pa.types.is_list(t):
        inner = _feature_yaml(t.value_type)
        return {"list": inner["struct"]} if "struct" in inner else {"list": inner["dtype"]}
    if pa.types.is_struct(t):
        return {"struct": [{"name": f.name, **_feature_yaml(f.type)} for f in t]}
    return {"dtype": {"bool": "bool"}.get(str(t), str(t))}


def dataset_card(schemas: dict[str, Any], file_format: str, splits: list[str],
                 stats: dict[str, Any] | None = None) -> str:
    """A Hugging Face dataset card (README.md) declaring the splits and the features of the shards,
    so ``datasets.load_dataset(<run folder>)`` reads every shard with one schema, JSONL included
    (left to itself it infers a schema from the first file and fails on a later one that differs).

    ``schemas``: the schema of each format written. One format: the ``default`` config over
    ``<split>/part-*``; several: one config per format (named after it, the first the default)
    over ``<split>/<format>/part-*``, so ``load_dataset(<run folder>, "preference")`` picks one.

    Written by hand from the Arrow schema: ``datasets`` is not a runtime dependency of sft-ray.
    ``stats``: the run's statistics, for the sections that report them (decontamination).
    """
    import yaml

    ext = "jsonl" if file_format == "jsonl" else "parquet"

    def features(schema) -> list[dict[str, Any]]:
        return [{"name": f.name, **_feature_yaml(f.type)} for f in schema]

    if len(schemas) == 1:
        (schema,) = schemas.values()
        card = {
            "configs": [{"config_name": "default",
                         "data_files": [{"split": s, "path": f"{s}/part-*.{ext}"} for s in splits]}],
            "dataset_info": {"features": features(schema)},
        }
        how = '`datasets.load_dataset("<this folder>")`'
    else:
        card = {
            "configs": [{"config_name": fmt, **({"default": True} if i == 0 else {}),
                         "data_files": [{"split": s, "path": f"{s}/{fmt}/part-*.{ext}"} for s in splits]}
                        for i, fmt in enumerate(schemas)],
            "dataset_info": [{"config_name": fmt, "features": features(schema)} for fmt, schema in schemas.items()],
        }
        how = '`datasets.load_dataset("<this folder>", "<format>")`, one of: ' + ", ".join(schemas)
    return ("---\n" + yaml.safe_dump(card, sort_keys=False) + "---\n\nTraining data written by sft-ray "
            f"(`sft-ray filter` rewrites it). Load it with {how}.\n"
            + ("\n" + card_section(stats) if stats and card_section(stats) else ""))
