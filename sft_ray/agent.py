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
same way) and counted as malformed; the episode goes on.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable

import orjson

from sft_ray.backends.base import GenerationRequest, GenerationResult
from sft_ray.environments.base import Episode

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
                "num_malformed_tool_calls": self.num_malformed_tool_calls}

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
    return msg


async def run_tool_call(episode: Episode, call: dict[str, str], offered: set[str],
                        state: EpisodeState) -> dict[str, Any]:
    """Execute one tool call (or answer why not); returns the ``role: tool`` message."""
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
    else:
        output = await episode.call(name, args)
        state.num_tool_errors += int(output.error)
        text = output.text
    return {"role": "tool", "tool_call_id": call["id"], "name": name, "content": text}


async def run_episode(call_model: Callable[[GenerationRequest], Awaitable[GenerationResult]],
                      episode: Episode, state: EpisodeState, params: dict[str, Any],
                      tools: dict[str, Any], max_steps: int, request_id: str) -> EpisodeState:
    """Run the loop on ``state`` (which starts with the prompt) until it terminates."""
    offered = {t["function"]["name"] for t in tools.get("tools") or []}
    for step in range(max_steps):
        result = await call_model(GenerationRequest(
            list(state.messages), params, f"{request_id}.{step}", tools.get("tools"),
            tools.get("tool_choice"), tools.get("parallel_tool_calls")))
        state.num_model_calls += 1
        state.attempts += result.attempts
        state.finish_reason = result.finish_reason
        for k in state.usage:
            state.usage[k] += int((result.usage or {}).get(k) or 0)
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
            state.messages.append(await run_tool_call(episode, call, offered, state))
    state.termination = MAX_STEPS
    return state
