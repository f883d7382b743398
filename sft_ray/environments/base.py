"""The seam every tool environment plugs into.

An environment is built once per generation actor; each agent episode opens an
:class:`Episode` (its own state: a Python object, or a NeMo Gym session cookie),
calls tools on it, optionally asks it to verify the finished episode, and closes it.

Tool failures the model should see (an exception in a tool, an HTTP error body)
come back as a :class:`ToolOutput` with ``error=True``: the episode goes on. A
failure of the environment itself (a server that stays down) raises
:class:`EnvironmentFailure`: the sample fails as an infrastructure error and a
rerun retries it; it is never scored.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any


@dataclass
class ToolOutput:
    text: str  # what the model sees as the tool's result
    error: bool = False  # the tool failed (counted as a tool error)


class EnvironmentFailure(Exception):
    """The environment could not serve the episode (not the model's fault)."""


def cancelled_from_outside() -> bool:
    """Whether the running task has been asked to stop (``task.cancel()``: the episode timeout,
    or the batch being torn down), as opposed to code it runs raising ``CancelledError`` itself.

    A tool that raises ``asyncio.CancelledError`` (or swallows the cancellation) must not be able
    to end or outlive its episode: callers catch ``BaseException`` from tools, and re-raise only
    when this says the cancellation is real."""
    try:
        task = asyncio.current_task()
    except RuntimeError:  # no running loop
        return False
    return task is not None and task.cancelling() > 0


def exception_text(e: BaseException, limit: int = 2000) -> str:
    """``{"error": "Type: message"}``, the tool-error output the model reads."""
    import orjson

    try:
        message = str(e)
    except BaseException:  # a hostile __str__ is the tool's problem, not the episode's
        message = "(unprintable)"
    return orjson.dumps({"error": f"{type(e).__name__}: {message}"[:limit]}).decode()


class Episode:
    async def call(self, name: str, arguments: dict[str, Any]) -> ToolOutput:
        raise NotImplementedError

    async def verify(self, row: dict[str, Any], messages: list[dict[str, Any]],
                     tools: list[dict[str, Any]] | None) -> dict[str, Any] | None:
        """The environment's own verdict on the finished episode, or None if it has none."""
        return None

    async def close(self) -> None:
        """Release the episode's state."""


class Environment:
    def __init__(self, cfg: dict[str, Any]) -> None:
        self.cfg = cfg

    async def start(self) -> None:
        """Open connections; called once in the actor's event loop."""

    def default_tools(self) -> list[dict[str, Any]] | None:
        """Tools (Chat form) offered to rows that bring none; None: rows must bring their own."""
        return None

    def check_tools(self, tools: list[dict[str, Any]]) -> str | None:
        """Why the tools a row declares (Chat form) cannot be served here, or None. Called after
        ``start``; a problem fails the sample as ``bad_input``. Default: anything goes (an unknown
        tool is answered to the model when called)."""
        return None

    async def open(self, row: dict[str, Any], episode_id: str) -> Episode:
        raise NotImplementedError

    async def close(self) -> None:
        """Release connections."""

    def close_now(self) -> None:
        """Best-effort synchronous release, for when the actor is torn down without a loop."""
