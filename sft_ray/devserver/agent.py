"""The mock agent model: which tools a request with ``tools`` calls, or its final answer, and
the tool-calling answer in either API's form; the last user text a request carries."""

from __future__ import annotations

import random
import re
import time
from dataclasses import dataclass

import orjson

from sft_ray.devserver.state import MockConfig

_TOOL_MARK = re.compile(r"\[\[tool:([^\s\]]+)\s*(\{.*?\})?\]\]", re.S)
_PARALLEL = re.compile(r"\[\[parallel:(\d+)\]\]")
_STEPS = re.compile(r"\[\[steps:(\d+)\]\]")
_ANY_MARK = re.compile(r"\[\[.*?\]\]", re.S)
UNKNOWN_TOOL = "no_such_tool"


def _last_user_text(messages) -> str:
    for m in reversed(messages if isinstance(messages, list) else []):
        if isinstance(m, dict) and m.get("role") == "user":
            c = m.get("content")
            if isinstance(c, list):
                return "".join(p.get("text", "") for p in c if isinstance(p, dict))
            return c or ""
    return messages if isinstance(messages, str) else ""


@dataclass
class AgentTurn:
    """This model call's answer in an agent conversation: tool calls, or a final text."""

    step: int  # 1-based number of this model call in the episode (tool-call turns so far + 1)
    calls: list[dict]  # {"id", "name", "arguments": JSON string (or not, when malformed)}; empty: final
    final: str = ""


def _text_of(content) -> str:
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict))
    if content is None or isinstance(content, str):
        return content or ""
    return orjson.dumps(content).decode()


def _tool_specs(tools) -> list[dict]:
    """Function tools as ``{"name", "parameters"}``, from either API's form (nested or flat)."""
    specs = []
    for t in tools if isinstance(tools, list) else []:
        if isinstance(t, dict):
            f = t["function"] if isinstance(t.get("function"), dict) else t
            if f.get("name"):
                specs.append({"name": f["name"], "parameters": f.get("parameters") or {}})
    return specs


def _episode(items) -> tuple[int, list[str]]:
    """Tool-call turns and tool outputs since the last user message, in either API's form.

    Consecutive Responses ``function_call`` items are one turn (how NeMo Gym and the
    Chat conversion lay out a parallel turn); a Chat assistant message with ``tool_calls``
    is one turn.
    """
    turns, outputs, prev_call = 0, [], False
    for it in items if isinstance(items, list) else []:
        if not isinstance(it, dict):
            continue
        is_call = it.get("type") == "function_call"
        if it.get("role") == "user":
            turns, outputs = 0, []
        elif (is_call and not prev_call) or (it.get("role") == "assistant" and it.get("tool_calls")):
            turns += 1
        elif it.get("role") == "tool":
            outputs.append(_text_of(it.get("content")))
        elif it.get("type") == "function_call_output":
            outputs.append(_text_of(it.get("output")))
        prev_call = is_call
    return turns, outputs


def _forced_tool(tool_choice) -> str | None:
    if isinstance(tool_choice, dict):
        f = tool_choice["function"] if isinstance(tool_choice.get("function"), dict) else tool_choice
        return f.get("name")
    return None


def _default_args(spec: dict, text: str) -> dict:
    """The first required string property (or the first string property) set to ``text``."""
    props = spec["parameters"].get("properties") or {}
    for name in list(spec["parameters"].get("required") or []) + list(props):
        if isinstance(props.get(name), dict) and props[name].get("type") == "string":
            return {name: text}
    return {}


def agent_turn(body: dict, items, text: str, cfg: MockConfig, rng: random.Random, call_no: int) -> AgentTurn | None:
    """The agent's answer to a request with tools; None for a request without tools (echo)."""
    specs = _tool_specs(body.get("tools"))
    if not specs:
        return None
    turns, outputs = _episode(items)
    steps = int(m.group(1)) if (m := _STEPS.search(text)) else 1
    if turns >= steps or body.get("tool_choice") == "none":
        return AgentTurn(step=turns + 1, calls=[], final="\n".join(outputs) if outputs else text)
    planned: list[tuple[str, str]] = []
    for name, args in _TOOL_MARK.findall(text):
        try:  # a marker's arguments are sent as compact JSON, or as written when they are not JSON
            planned.append((name, orjson.dumps(orjson.loads(args)).decode() if args else "{}"))
        except orjson.JSONDecodeError:
            planned.append((name, args))
    if not planned:
        forced = _forced_tool(body.get("tool_choice"))
        spec = next((t for t in specs if t["name"] == forced), specs[0])
        plain = _ANY_MARK.sub("", text).strip()
        planned = [(spec["name"], orjson.dumps(_default_args(spec, plain)).decode())]
    if m := _PARALLEL.search(text):
        planned = [planned[i % len(planned)] for i in range(int(m.group(1)))]
    calls = []
    for i, (name, args) in enumerate(planned):
        if cfg.tool_malformed_rate and rng.random() < cfg.tool_malformed_rate:
            args = args[:-1]  # cut the closing brace: no longer JSON
        if cfg.tool_unknown_rate and rng.random() < cfg.tool_unknown_rate:
            name = UNKNOWN_TOOL
        calls.append({"id": f"call_{call_no}_{i}", "name": name, "arguments": args})
    return AgentTurn(step=turns + 1, calls=calls)


def tool_call_answer(api: str, body: dict, calls: list[dict], call_no: int, n_in: int) -> dict:
    """A tool-calling answer: Chat ``tool_calls`` (content null) or Responses ``function_call`` items."""
    n_out = sum(len(c["arguments"].split()) + 1 for c in calls)
    if api == "chat":
        tool_calls = [{"id": c["id"], "type": "function", "function": {"name": c["name"], "arguments": c["arguments"]}}
                      for c in calls]
        return {"id": f"chatcmpl-{call_no}", "object": "chat.completion", "created": int(time.time()),
                "model": body.get("model"),
                "choices": [{"index": 0, "message": {"role": "assistant", "content": None, "tool_calls": tool_calls},
                             "finish_reason": "tool_calls"}],
                "usage": {"prompt_tokens": n_in, "completion_tokens": n_out, "total_tokens": n_in + n_out}}
    output = [{"type": "function_call", "id": f"fc_{call_no}_{i}", "call_id": c["id"], "name": c["name"],
               "arguments": c["arguments"], "status": "completed"} for i, c in enumerate(calls)]
    return {"id": f"resp_{call_no}", "object": "response", "created_at": int(time.time()), "model": body.get("model"),
            "status": "completed", "incomplete_details": None, "output": output,
            "parallel_tool_calls": body.get("parallel_tool_calls", True),
            "tool_choice": body.get("tool_choice", "auto"), "tools": body.get("tools") or [],
            "usage": {"input_tokens": n_in, "output_tokens": n_out, "total_tokens": n_in + n_out}}
