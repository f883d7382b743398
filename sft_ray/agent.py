"""The agent episode loop: model call -> every tool call of the turn -> results -> next call.

Runs inside a generation actor, one coroutine per sample, as NeMo Gym's simple agent does
(``responses_api_agents/simple_agent``), but without its HTTP hops: the model is a backend
object and the tools an :class:`~sft_ray.environments.base.Episode`. The loop ends at a final
assistant message (no tool calls), at ``agent.max_steps`` model calls, at a length cut, or at a
failed model call. Each model call goes through ``call_model``, which holds the actor's
concurrency permit only while the call is in flight, so ``num_samples_in_parallel`` counts
model calls, not episodes waiting on tools.

A tool call whose arguments are not a JSON object, or that names a tool the row did not
offer, is answered to the model with an error output (NeMo Gym answers bad arguments the
same way) and counted as malformed; the episode goes on. A call whose arguments are a JSON
object that violates the offered tool's JSON Schema (``parameters``) is not run either: the
model is answered with the validation message, so it can correct itself, and the call is
counted in ``num_invalid_tool_arguments`` (finalize drops such episodes by default). A tool
whose schema is not a valid JSON Schema fails the episode as ``bad_input`` before the first
model call, naming the tool.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable

import orjson

from sft_ray import errors
from sft_ray.backends.base import GenerationRequest, GenerationResult
from sft_ray.environments.base import Episode
from sft_ray.toolschema import SchemaProblem, check_arguments, validator

FINAL, MAX_STEPS, LENGTH, ERROR = "final", "max_steps", "length", "error"


@dataclass
class EpisodeState:
    """What an episode produced so far (kept when a timeout cuts it short)."""

    messages: list[dict[str, Any]]
    termination: str | None = None
    num_model_calls: int = 0
    num_tool_calls: int = 0
    num_tool_errors: int = 0
    num_malformed_tool_calls: int = 0
    num_invalid_tool_arguments: int = 0
    attempts: int = 0
    usage: dict[str, int] = field(default_factory=lambda: {"input_tokens": 0, "output_tokens": 0,
                                                           "total_tokens": 0})
    finish_reason: str | None = None
    error: dict[str, str] | None = None
    reasoning: list[str] = field(default_factory=list)
    verify: dict[str, Any] | None = None  # the environment's own verdict (NeMo Gym's /verify answer)

    def counters(self) -> dict[str, Any]:
        return {"termination": self.termination, "num_model_calls": self.num_model_calls,
                "num_tool_calls": self.num_tool_calls, "num_tool_errors": self.num_tool_errors,
                "num_malformed_tool_calls": self.num_malformed_tool_calls,
                "num_invalid_tool_arguments": self.num_invalid_tool_arguments}

    def final_text(self) -> str | None:
        last = self.messages[-1] if self.messages else None
        if last is not None and last["role"] == "assistant" and not last.get("tool_calls"):
            return last.get("content") or ""
        return None


def _error_output(message: str) -> str:
    return orjson.dumps({"error": message}).decode()


def assistant_message(result: GenerationResult) -> dict[str, Any]:
    msg: dict[str, Any] = {"role": "assistant", "content": result.text or (None if result.tool_calls else "")}
    if result.tool_calls:
        msg["tool_calls"] = [{"id": c["id"], "type": "function",
                              "function": {"name": c["name"], "arguments": c["arguments"]}}
                             for c in result.tool_calls]
    if result.reasoning:
        msg["reasoning_content"] = result.reasoning
    if result.thinking_blocks:  # sent back unchanged with the next turn (training formats leave them out)
        msg["thinking_blocks"] = result.thinking_blocks
    return msg


def offered_tools(tools: list[dict[str, Any]] | None) -> dict[str, Any]:
    """The offered tools' argument schemas by name (Chat-form tools; ``True``: no schema given).
    Raises :class:`SchemaProblem` naming the first tool whose schema is not a valid JSON Schema."""
    offered: dict[str, Any] = {}
    for t in tools or []:
        f = t.get("function") or {}
        schema = f.get("parameters", True)
        validator(schema, f"tool {f.get('name')!r}")  # compiled once per schema and cached
        offered[f["name"]] = schema
    return offered


async def run_tool_call(episode: Episode, call: dict[str, str], offered: dict[str, Any],
                        state: EpisodeState) -> dict[str, Any]:
    """Execute one tool call (or answer why not); returns the ``role: tool`` message.
    ``offered``: the offered tools' argument schemas by name (see :func:`offered_tools`)."""
    name, raw = call["name"], call["arguments"]
    state.num_tool_calls += 1
    error = None
    args: Any = None
    if name not in offered:
        error = f"Unknown tool: {name!r}; available tools: {', '.join(sorted(offered))}"
    else:
        try:
            args = orjson.loads(raw) if raw.strip() else {}
        except orjson.JSONDecodeError as e:
            error = f"Invalid tool call arguments: {e}"
        else:
            if not isinstance(args, dict):
                error = f"Invalid tool call arguments: expected a JSON object, got {type(args).__name__}"
    if error is not None:
        state.num_malformed_tool_calls += 1
        text = _error_output(error)
    elif (invalid := check_arguments(offered[name], args, f"tool {name!r}")) is not None:
        state.num_invalid_tool_arguments += 1  # not run: the model reads why and may call again
        text = _error_output(f"Invalid arguments for {name}: {invalid}")
    else:
        output = await episode.call(name, args)
        state.num_tool_errors += int(output.error)
        text = output.text
    return {"role": "tool", "tool_call_id": call["id"], "name": name, "content": text}


async def run_episode(call_model: Callable[[GenerationRequest], Awaitable[GenerationResult]],
                      episode: Episode, state: EpisodeState, params: dict[str, Any],
                      tools: dict[str, Any], max_steps: int, request_id: str) -> EpisodeState:
    """Run the loop on ``state`` (which starts with the prompt) until it terminates."""
    try:
        offered = offered_tools(tools.get("tools"))
    except SchemaProblem as e:  # the row's (or the environment's) tool definitions, not the model's fault
        state.error, state.termination = errors.error(errors.BAD_INPUT, str(e)), ERROR
        return state
    for step in range(max_steps):
        result = await call_model(GenerationRequest(
            list(state.messages), params, f"{request_id}.{step}", tools.get("tools"),
            tools.get("tool_choice"), tools.get("parallel_tool_calls")))
        state.num_model_calls += 1
        state.attempts += result.attempts
        state.finish_reason = result.finish_reason
        for k, v in (result.usage or {}).items():  # cache token counts too, when the API reports them
            state.usage[k] = state.usage.get(k, 0) + int(v or 0)
        if result.error is not None:
            state.error, state.termination = result.error, ERROR
            return state
        state.messages.append(assistant_message(result))
        if result.reasoning:
            state.reasoning.append(result.reasoning)
        if result.finish_reason == "length":
            state.termination = LENGTH  # a cut turn's tool calls are not run: their JSON is likely cut too
            return state
        if not result.tool_calls:
            state.termination = FINAL
            return state
        for call in result.tool_calls:  # in order: a stateful environment may depend on it
            try:
                state.messages.append(await run_tool_call(episode, call, offered, state))
            except SchemaProblem as e:  # e.g. a $ref that cannot be resolved, found on use
                state.error, state.termination = errors.error(errors.BAD_INPUT, str(e)), ERROR
                return state
    state.termination = MAX_STEPS
    return state
