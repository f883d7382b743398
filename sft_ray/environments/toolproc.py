"""``environment.isolation: process``: an episode's python tools run in a worker process of its own.

The parent side (:class:`ProcessEpisode`, in the generation actor) starts
``python -m sft_ray.environments.toolproc`` when the episode opens and talks to it over the
child's stdin and stdout: each message is an 8-byte big-endian length and that many bytes of
JSON. Length-prefixed frames rather than lines because a tool's output may be large and may
hold newlines; the child moves the real stdout to a private descriptor and points fd 1 at
stderr first, so a tool that prints cannot corrupt the channel.

The child imports the module, makes the episode's state object (``environment.episode_class``)
and then answers ``call`` messages one at a time, running async tools on an event loop of its
own (kept for the episode, so state bound to a loop stays usable). Whatever a tool raises is
an error output. The parent kills the child when the episode closes (after ``close()`` had up
to 10 s), when a call is abandoned (the episode's timeout cancelled it), or when the actor
goes away. A tool that kills its process (``os._exit``, a segfault, the OOM killer) is a tool
error naming the exit code; the next call starts a fresh process, with a fresh state object.
"""

from __future__ import annotations

import asyncio
import os
import struct
import sys
from typing import Any

import orjson

from sft_ray.environments.base import Episode, ToolOutput, cancelled_from_outside

_HEADER = struct.Struct(">Q")
CLOSE_WAIT_S = 10.0


def _pack(message: Any) -> bytes:
    body = orjson.dumps(message, default=str)
    return _HEADER.pack(len(body)) + body


def _package_root() -> str:
    import sft_ray

    return os.path.dirname(os.path.dirname(os.path.abspath(sft_ray.__file__)))


class ProcessEpisode(Episode):
    """An episode whose tools run in a child process (see the module docstring)."""

    def __init__(self, module: str, episode_class: str | None, row: dict[str, Any]) -> None:
        self.module, self.episode_class, self.row = module, episode_class, row
        self.proc: asyncio.subprocess.Process | None = None
        self._lock = asyncio.Lock()  # one call at a time per process (tool calls of a turn run in order)

    async def start(self) -> None:
        """Start the worker and build the episode's state there; raises when that fails."""
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([_package_root()] + [p for p in env.get("PYTHONPATH", "").split(
            os.pathsep) if p])
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "sft_ray.environments.toolproc", stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE, env=env)
        try:
            answer = await self._roundtrip({"op": "open", "module": self.module, "episode_class": self.episode_class,
                                            "row": self.row, "sys_path": sys.path})
        except BaseException:
            self.kill()
            raise
        if answer is None:
            raise RuntimeError(f"the tool process exited while loading {self.module} (code {self._code()})")
        if not answer["ok"]:
            self.kill()
            raise RuntimeError(orjson.loads(answer["text"])["error"])

    def _code(self) -> Any:
        return None if self.proc is None else self.proc.returncode

    async def _roundtrip(self, message: dict[str, Any]) -> dict[str, Any] | None:
        """Send one message and read the answer; None when the process died."""
        assert self.proc is not None and self.proc.stdin is not None and self.proc.stdout is not None
        try:
            self.proc.stdin.write(_pack(message))
            await self.proc.stdin.drain()
            (size,) = _HEADER.unpack(await self.proc.stdout.readexactly(_HEADER.size))
            return orjson.loads(await self.proc.stdout.readexactly(size))
        except (asyncio.IncompleteReadError, ConnectionError, BrokenPipeError):
            await self.proc.wait()
            return None

    async def call(self, name: str, arguments: dict[str, Any]) -> ToolOutput:
        async with self._lock:
            try:
                if self.proc is None or self.proc.returncode is not None:
                    await self.start()  # a tool killed the last one: a fresh process (and state)
                answer = await self._roundtrip({"op": "call", "name": name, "arguments": arguments})
            except BaseException as e:
                if cancelled_from_outside():
                    self.kill()  # the call is abandoned: its process goes with it
                    raise
                return ToolOutput(orjson.dumps({"error": f"{type(e).__name__}: {e}"[:2000]}).decode(), error=True)
        if answer is None:
            code = self._code()
            self.proc = None
            return ToolOutput(orjson.dumps({"error": f"the tool process exited with code {code} during "
                                                     f"{name!r}"}).decode(), error=True)
        return ToolOutput(answer["text"], error=not answer["ok"])

    async def close(self) -> None:
        try:
            if self.proc is not None and self.proc.returncode is None:
                async with asyncio.timeout(CLOSE_WAIT_S):
                    await self._roundtrip({"op": "close"})
        except TimeoutError:  # a close() that hangs: the kill below ends it
            pass
        finally:
            self.kill()

    def kill(self) -> None:
        """Kill the worker now (idempotent; callable without a running loop)."""
        proc, self.proc = self.proc, None
        if proc is not None and proc.returncode is None:
            try:
                proc.kill()
            except ProcessLookupError:
                pass


# ---- the child ----

def _serve() -> None:
    import inspect

    from sft_ray.environments.base import exception_text
    from sft_ray.environments.pyfuncs import output_text, public_callables

    channel_in = os.fdopen(os.dup(0), "rb", buffering=0)
    channel_out = os.fdopen(os.dup(1), "wb", buffering=0)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)  # a tool reading stdin reads nothing, not the channel
    os.dup2(2, 1)  # a tool's prints go to stderr, not into the channel
    sys.stdout = sys.stderr

    def read() -> Any:
        head = channel_in.read(_HEADER.size)
        if len(head) < _HEADER.size:
            return None
        (size,) = _HEADER.unpack(head)
        body = b""
        while len(body) < size:
            chunk = channel_in.read(size - len(body))
            if not chunk:
                return None
            body += chunk
        return orjson.loads(body)

    def answer(ok: bool, text: str) -> None:
        channel_out.write(_pack({"ok": ok, "text": text}))

    loop = asyncio.new_event_loop()

    def run(fn: Any, *args: Any, **kwargs: Any) -> Any:
        value = fn(*args, **kwargs)
        if inspect.isawaitable(value):
            value = loop.run_until_complete(value)
        return value

    tools: dict[str, Any] = {}
    state = None
    while True:
        message = read()
        if message is None:
            return
        op = message["op"]
        try:
            if op == "open":
                from sft_ray.plugins import load_module

                sys.path[:] = message["sys_path"]
                module = load_module(message["module"], "environment.module")
                if message["episode_class"]:
                    cls = getattr(module, message["episode_class"])
                    takes_row = len([p for p in inspect.signature(cls).parameters.values()
                                     if p.default is inspect.Parameter.empty
                                     and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]) >= 1
                    state = run(cls, message["row"]) if takes_row else run(cls)
                    tools = public_callables(state, None)
                else:
                    tools = public_callables(module, module.__name__)
                answer(True, "")
            elif op == "call":
                fn = tools.get(message["name"])
                if fn is None:
                    answer(False, orjson.dumps({"error": f"Unknown tool: {message['name']}"}).decode())
                else:
                    answer(True, output_text(run(fn, **message["arguments"])))
            elif op == "close":
                close = getattr(state, "close", None)
                if callable(close):
                    run(close)
                answer(True, "")
                return
        except BaseException as e:  # the tool's exception (SystemExit included) is the model's to see
            answer(False, exception_text(e))


if __name__ == "__main__":
    _serve()
