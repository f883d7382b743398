"""Conversions between the two OpenAI message and tool formats.

sft-ray's one internal form is Chat Completions: messages ``{"role", "content"}``,
assistant turns with ``tool_calls`` (``arguments`` a JSON string) and ``role: tool``
results with ``tool_call_id``; tools nested under ``"function"``. Input rows may use
the Responses form (``function_call`` / ``function_call_output`` items, flat tools), and
the Responses backend and NeMo Gym's ``/verify`` need it back. NeMo Gym's
``responses_converter.py`` does the same mapping; it is not a dependency of ours
(Python >= 3.13, a whole server stack), so the few rules live here.
"""

from __future__ import annotations

from typing import Any

import orjson


class FormatError(ValueError):
    """An item that is neither form; ``field`` names where it is."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"field {field}: {reason}")
        self.field = field


def text_of(content: Any, field: str) -> str:
    """Message content as a string: a string, or a list of text parts joined."""
    if isinstance(content, str):
        return content
    if content is None:
        return ""
    if isinstance(content, list):
        texts = []
        for i, part in enumerate(content):
            if isinstance(part, str):
                texts.append(part)
            elif isinstance(part, dict) and isinstance(part.get("text"), str):
                texts.append(part["text"])
            elif isinstance(part, dict) and part.get("type") == "refusal" and isinstance(part.get("refusal"), str):
                texts.append(part["refusal"])
            else:
                raise FormatError(f"{field}[{i}]", 'expected a text part like {"type": "input_text", "text": "..."}')
        return "".join(texts)
    raise FormatError(field, f"content must be a string or a list of text parts, got {type(content).__name__}")


def arguments_text(args: Any) -> str:
    """Tool-call arguments as the JSON string both APIs carry (an object is encoded)."""
    if isinstance(args, str):
        return args
    return orjson.dumps(args if args is not None else {}).decode()


# --- tools ---------------------------------------------------------------------------------

def tool_to_chat(tool: Any, field: str) -> dict[str, Any]:
    """One function tool, flat (Responses) or nested (Chat), in the nested Chat form."""
    if not isinstance(tool, dict) or tool.get("type", "function") != "function":
        kind = tool.get("type") if isinstance(tool, dict) else type(tool).__name__
        raise FormatError(field, f"only function tools are supported, got {kind!r}")
    fn = tool.get("function") if isinstance(tool.get("function"), dict) else tool
    name = fn.get("name")
    if not isinstance(name, str) or not name:
        raise FormatError(field, "a function tool needs a non-empty string 'name'")
    out: dict[str, Any] = {"name": name}
    if fn.get("description") is not None:
        out["description"] = fn["description"]
    out["parameters"] = fn.get("parameters") or {"type": "object", "properties": {}}
    if fn.get("strict") is not None:
        out["strict"] = fn["strict"]
    return {"type": "function", "function": out}


def tools_to_chat(tools: Any, field: str) -> list[dict[str, Any]]:
    if not isinstance(tools, list):
        raise FormatError(field, "expected a list of tools")
    return [tool_to_chat(t, f"{field}[{i}]") for i, t in enumerate(tools)]


def tool_to_responses(tool: dict[str, Any]) -> dict[str, Any]:
    """A nested Chat tool in the flat Responses form."""
    fn = tool["function"]
    out = {"type": "function", "name": fn["name"], "parameters": fn.get("parameters") or {}}
    if fn.get("description") is not None:
        out["description"] = fn["description"]
    out["strict"] = bool(fn.get("strict", False))
    return out


def tool_choice_to_responses(choice: Any) -> Any:
    """Chat's ``{"type": "function", "function": {"name"}}`` is flat in the Responses API."""
    if isinstance(choice, dict) and isinstance(choice.get("function"), dict):
        return {"type": "function", "name": choice["function"].get("name")}
    return choice


def tool_choice_to_chat(choice: Any) -> Any:
    if isinstance(choice, dict) and choice.get("type") == "function" and "name" in choice:
        return {"type": "function", "function": {"name": choice["name"]}}
    return choice


# --- messages ------------------------------------------------------------------------------

def _tool_call(call_id: str, name: str, arguments: Any) -> dict[str, Any]:
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments_text(arguments)}}


def to_chat(items: Any, field: str) -> list[dict[str, Any]]:
    """Messages or Responses input items (any mix) as Chat Completions messages.

    Consecutive ``function_call`` items become one assistant turn with several
    ``tool_calls`` (a parallel call), attached to the assistant message just before
    them when there is one. A ``developer`` message becomes ``system`` (every chat
    template knows ``system``; few know ``developer``).
    """
    if not isinstance(items, list) or not items:
        raise FormatError(field, "expected a non-empty list of messages")
    out: list[dict[str, Any]] = []
    names: dict[str, str] = {}  # call id -> tool name, for tool results that do not repeat it
    for i, m in enumerate(items):
        where = f"{field}[{i}]"
        if not isinstance(m, dict):
            raise FormatError(where, "expected a message object")
        kind = m.get("type", "message")
        if kind == "function_call":
            call_id, name = m.get("call_id") or m.get("id"), m.get("name")
            if not isinstance(call_id, str) or not isinstance(name, str):
                raise FormatError(where, "a function_call needs string 'call_id' and 'name'")
            names[call_id] = name
            call = _tool_call(call_id, name, m.get("arguments"))
            last = out[-1] if out else None
            if last is not None and last["role"] == "assistant":  # same turn: a message, then its calls
                last.setdefault("tool_calls", []).append(call)
            else:
                out.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            call_id = m.get("call_id")
            if not isinstance(call_id, str):
                raise FormatError(where, "a function_call_output needs a string 'call_id'")
            msg = {"role": "tool", "tool_call_id": call_id, "content": _output_text(m.get("output"), where)}
            if call_id in names:
                msg["name"] = names[call_id]
            out.append(msg)
        elif kind == "reasoning":
            summary = m.get("summary") or m.get("content") or []
            text = "".join(p.get("text", "") for p in summary if isinstance(p, dict))
            out.append({"role": "assistant", "content": None, "reasoning_content": text})
        elif kind == "message":
            role = m.get("role")
            if not isinstance(role, str):
                raise FormatError(where, "expected a message with a string 'role'")
            role = "system" if role == "developer" else role
            msg = {"role": role, "content": text_of(m.get("content"), f"{where}.content")}
            if role == "assistant":
                if m.get("content") is None:
                    msg["content"] = None
                calls = m.get("tool_calls") or []
                if calls:
                    msg["tool_calls"] = []
                    for j, c in enumerate(calls):
                        fn = c.get("function") if isinstance(c, dict) else None
                        if not isinstance(fn, dict) or not isinstance(c.get("id"), str):
                            raise FormatError(f"{where}.tool_calls[{j}]", "expected {id, function: {name, arguments}}")
                        names[c["id"]] = fn.get("name", "")
                        msg["tool_calls"].append(_tool_call(c["id"], fn.get("name", ""), fn.get("arguments")))
                if isinstance(m.get("reasoning_content"), str):
                    msg["reasoning_content"] = m["reasoning_content"]
                prev = out[-1] if out else None
                if prev is not None and prev["role"] == "assistant" and prev.get("content") is None \
                        and not prev.get("tool_calls") and "reasoning_content" in prev:
                    msg.setdefault("reasoning_content", prev["reasoning_content"])  # a reasoning item's turn
                    out.pop()
            elif role == "tool":
                if not isinstance(m.get("tool_call_id"), str):
                    raise FormatError(where, "a tool message needs a string 'tool_call_id'")
                msg["tool_call_id"] = m["tool_call_id"]
                name = m.get("name") or names.get(m["tool_call_id"])
                if name:
                    msg["name"] = name
            out.append(msg)
        else:
            raise FormatError(where, f"item type {kind!r} is not supported")
    return out


def _output_text(output: Any, field: str) -> str:
    if isinstance(output, str):
        return output
    if isinstance(output, list):
        return text_of(output, f"{field}.output")
    return orjson.dumps(output).decode()


def to_responses_input(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Chat messages as Responses input items (what the Responses API resends each turn)."""
    items: list[dict[str, Any]] = []
    for m in messages:
        role = m["role"]
        if role == "tool":
            items.append({"type": "function_call_output", "call_id": m["tool_call_id"], "output": m["content"]})
            continue
        if role == "assistant":
            if m.get("content"):
                items.append({"type": "message", "role": "assistant",
                              "content": [{"type": "output_text", "text": m["content"], "annotations": []}]})
            for c in m.get("tool_calls") or []:
                items.append({"type": "function_call", "call_id": c["id"], "name": c["function"]["name"],
                              "arguments": c["function"]["arguments"]})
            continue
        items.append({"type": "message", "role": role, "content": m.get("content") or ""})
    return items


def to_responses_output(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The generated part of a transcript as a Responses object's ``output`` items
    (what NeMo Gym's ``/verify`` reads): ``message``, ``function_call``, ``function_call_output``."""
    out: list[dict[str, Any]] = []
    for n, m in enumerate(messages):
        if m["role"] == "tool":
            out.append({"type": "function_call_output", "call_id": m["tool_call_id"], "output": m["content"],
                        "id": f"fco_{n}", "status": "completed"})
        elif m["role"] == "assistant":
            if m.get("reasoning_content"):
                out.append({"type": "reasoning", "id": f"rs_{n}",
                            "summary": [{"type": "summary_text", "text": m["reasoning_content"]}]})
            if m.get("content"):
                out.append({"type": "message", "role": "assistant", "id": f"msg_{n}", "status": "completed",
                            "content": [{"type": "output_text", "text": m["content"], "annotations": []}]})
            for c in m.get("tool_calls") or []:
                out.append({"type": "function_call", "call_id": c["id"], "name": c["function"]["name"],
                            "arguments": c["function"]["arguments"], "id": f"fc_{c['id']}",
                            "status": "completed"})
    return out
