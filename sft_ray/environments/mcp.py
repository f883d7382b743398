"""``environment.type: mcp``: a Model Context Protocol server's tools, with the official ``mcp`` SDK.

The server is started as a subprocess speaking MCP over stdio (``command``, ``args``, ``env``,
``env_from``, ``cwd``, as MCP client configs write them), or reached over Streamable HTTP
(``url``, ``headers_env``). Its ``tools/list`` becomes the Chat-form function tools offered to
rows that bring none (and written to their training rows); a row that declares tools the server
lacks fails as ``bad_input`` naming them (:meth:`McpEnvironment.check_tools`).

A ``tools/call`` result becomes the tool message (:func:`result_text`); ``isError`` is a tool
error the model reads, counted in ``num_tool_errors``, and so is a JSON-RPC error answer to the
call (the server is alive and said no). A connection that ends (the server crashed, was killed,
or an HTTP server went away) or a call that gets no answer within ``call_timeout_s`` (a hung
server) is the environment's failure: the episode ends as ``environment_error`` (no reward; a
rerun retries it) with the server's last stderr lines, and the server is restarted for the
episodes that come next.

``session: actor`` (default) shares one connection per generation actor among its episodes;
``session: episode`` starts a fresh server process (or HTTP session) per episode and closes it
after, for stateful servers. ``max_concurrent_calls`` bounds calls in flight per connection.

The SDK's transports and ``ClientSession`` are anyio context managers that must be entered and
left in one task, so each connection is owned by one long-lived task (:class:`_Connection`) that
holds the contexts open until it is told to stop; episodes call tools on the session from their
own tasks (the session correlates concurrent requests by id). Secrets (``env_from`` values,
``headers_env`` values) arrive as :class:`~sft_ray.backends.base.Secret` from the driver and are
replaced by ``***`` in every message this module writes, the stderr lines included.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import tempfile
from typing import Any

import orjson

from sft_ray.environments.base import Environment, EnvironmentFailure, Episode, ToolOutput

log = logging.getLogger(__name__)

STDERR_TAIL_LINES = 5
STDERR_TAIL_CHARS = 320  # the failure record's message is capped at 500 characters (sft_ray/errors.py)


def chat_tool(tool: Any) -> dict[str, Any]:
    """An MCP ``Tool`` as a Chat-form function tool."""
    return {"type": "function", "function": {"name": tool.name, "description": tool.description or "",
                                             "parameters": tool.input_schema or {"type": "object"}}}


def _describe(block: Any) -> str:
    """A content block that is not text, described in words (never dropped silently)."""
    kind = getattr(block, "type", type(block).__name__)
    if kind in ("image", "audio"):
        return f"[{kind} content: {block.mime_type}, {len(block.data) * 3 // 4} bytes]"
    if kind == "resource_link":
        return f"[resource link: {block.uri} ({block.name})" + (f", {block.mime_type}" if block.mime_type else "") + "]"
    if kind == "resource":
        res = block.resource
        text = getattr(res, "text", None)
        if text is not None:
            return f"[resource {res.uri}]\n{text}"
        blob = getattr(res, "blob", "") or ""
        return f"[resource {res.uri}: {res.mime_type or 'binary'}, {len(blob) * 3 // 4} bytes]"
    return f"[{kind} content]"


def result_text(result: Any) -> ToolOutput:
    """A ``tools/call`` result as the tool message: text blocks joined with newlines, other content
    described in brackets. With structured content, its JSON replaces the text blocks (the MCP spec
    has a tool that returns structured content send the same as serialized text, so the text would
    repeat it); other content is still described after it."""
    parts: list[str] = []
    structured = getattr(result, "structured_content", None)
    if structured is not None:
        parts.append(orjson.dumps(structured, default=str).decode())
    for block in result.content or []:
        if getattr(block, "type", None) == "text":
            if structured is None:
                parts.append(block.text)
        else:
            parts.append(_describe(block))
    return ToolOutput("\n".join(parts), error=bool(result.is_error))


def _from_env(mapping: dict[str, str] | None, key: str) -> dict[str, str]:
    """``mapping``'s variables read from this process's environment (used directly, not through a run)."""
    if not mapping:
        return {}
    from sft_ray.config import read_env_mapping  # the driver's models: an actor's start never imports them

    return read_env_mapping(mapping, key)


class _NotSent(EnvironmentFailure):
    """The connection had failed before this call was sent: another connection may take it."""


class _Connection:
    """One MCP client session, owned by one task from connect to close."""

    def __init__(self, env: "McpEnvironment", label: str) -> None:
        self.env = env
        self.label = label
        self.session: Any = None
        self.tools: list[Any] = []
        self.failed: str | None = None  # why it can no longer serve; None while healthy
        self.sem = asyncio.Semaphore(int(env.cfg.get("max_concurrent_calls") or 16))
        self._stop = asyncio.Event()
        self._ready: asyncio.Future = asyncio.get_running_loop().create_future()
        self._task: asyncio.Task | None = None
        # The server's stderr goes to a file (a pipe would need a reader); its tail goes into failures.
        self._errlog = tempfile.TemporaryFile() if env.stdio else None

    async def open(self, list_tools: bool) -> None:
        self._task = asyncio.create_task(self._own(list_tools), name=f"mcp {self.label}")
        timeout = float(self.env.cfg.get("connect_timeout_s") or 60.0)
        try:
            await asyncio.wait_for(asyncio.shield(self._ready), timeout)
        except TimeoutError:
            self._ready.cancel()  # nobody waits for it any more (and an exception set later would go unread)
            await self.close()
            raise EnvironmentFailure(self.env.redact(f"MCP server {self.label}: not ready within connect_timeout_s="
                                                     f"{timeout:g} s{self.stderr_tail()}")) from None
        except EnvironmentFailure:
            await self.close()
            raise

    async def _own(self, list_tools: bool) -> None:
        from mcp import ClientSession

        try:
            async with contextlib.AsyncExitStack() as stack:
                if self.env.stdio:
                    from mcp.client.stdio import StdioServerParameters, stdio_client

                    params = StdioServerParameters(command=self.env.cfg["command"], args=self.env.cfg.get("args") or [],
                                                   env=self.env.server_env(), cwd=self.env.cfg.get("cwd") or None,
                                                   encoding_error_handler="replace")
                    read, write = await stack.enter_async_context(stdio_client(params, errlog=self._errlog))
                else:
                    import httpx2
                    from mcp.client.streamable_http import streamable_http_client

                    # The SDK takes headers through a client of its own HTTP library (httpx2);
                    # each call is bounded by call_timeout_s in call() as well.
                    timeout = float(self.env.cfg.get("call_timeout_s") or 60.0)
                    client = httpx2.AsyncClient(headers=self.env.headers(),
                                                timeout=httpx2.Timeout(30.0, read=timeout + 5))
                    await stack.enter_async_context(client)
                    read, write = await stack.enter_async_context(
                        streamable_http_client(self.env.cfg["url"], http_client=client))
                session = await stack.enter_async_context(ClientSession(read, write))
                await session.initialize()
                if list_tools:
                    self.tools = await _list_all(session)
                self.session = session
                self._ready.set_result(None)
                await self._stop.wait()
        except asyncio.CancelledError:
            self._mark(f"MCP server {self.label}: connection cancelled")
            raise
        except Exception as e:  # an ExceptionGroup from the transport's task group included
            self._mark(f"MCP server {self.label}: {_reason(e)}")
        finally:
            self.session = None
            self._mark(f"MCP server {self.label}: connection closed")

    def _mark(self, why: str) -> None:
        if self.failed is None:
            self.failed = why
        if not self._ready.done():
            self._ready.set_exception(EnvironmentFailure(self.env.redact(why + self.stderr_tail())))

    def stderr_tail(self) -> str:
        """The server's last stderr lines, as a suffix for a failure message ('' when none)."""
        if self._errlog is None:
            return ""
        try:
            fd = self._errlog.fileno()
            size = os.fstat(fd).st_size
            raw = os.pread(fd, 4096, max(0, size - 4096))
        except (OSError, ValueError):
            return ""
        lines = [line.strip() for line in raw.decode("utf-8", "replace").splitlines() if line.strip()]
        tail = " | ".join(lines[-STDERR_TAIL_LINES:])
        if not tail:
            return ""
        if len(tail) > STDERR_TAIL_CHARS:
            tail = "..." + tail[-STDERR_TAIL_CHARS:]
        return f"; server stderr: {tail}"

    async def call(self, name: str, arguments: dict[str, Any]) -> ToolOutput:
        from mcp.shared.exceptions import MCPError
        from mcp.types import CONNECTION_CLOSED

        timeout = float(self.env.cfg.get("call_timeout_s") or 60.0)
        async with self.sem:
            session = self.session
            if session is None or self.failed is not None:
                raise _NotSent(self.env.redact((self.failed or f"MCP server {self.label}: not connected")
                                                         + self.stderr_tail()))
            try:
                async with asyncio.timeout(timeout):
                    result = await session.call_tool(name, arguments)
            except TimeoutError:
                self.failed = f"MCP server {self.label}: tools/call {name} got no answer within call_timeout_s={timeout:g} s"
            except MCPError as e:
                if e.error.code != CONNECTION_CLOSED:  # the server answered the call with an error
                    return ToolOutput(orjson.dumps({"error": self.env.redact(e.error.message)[:2000]}).decode(),
                                      error=True)
                self.failed = f"MCP server {self.label}: the connection closed during tools/call {name}"
            except Exception as e:  # a transport failure (HTTP connection refused, a broken pipe)
                self.failed = f"MCP server {self.label}: tools/call {name}: {_reason(e)}"
            else:
                out = result_text(result)
                return ToolOutput(self.env.redact(out.text), out.error)
            # Read before letting the next call (and with it a restart that closes this connection) go.
            await asyncio.sleep(0.05)  # a dying process's last stderr lines land before they are read
            message = self.env.redact(self.failed + self.stderr_tail())
        self.env.discard(self)
        raise EnvironmentFailure(message)

    async def close(self) -> None:
        self._stop.set()
        if self._task is not None:
            try:
                # stdio_client's own shutdown is bounded (stdin close, SIGTERM, SIGKILL: about 5 s).
                await asyncio.wait_for(asyncio.shield(self._task), 15)
            except (TimeoutError, asyncio.CancelledError, Exception):
                self._task.cancel()
        if self._errlog is not None:
            self._errlog.close()


async def _list_all(session: Any) -> list[Any]:
    """Every tool of ``tools/list``, following pagination cursors."""
    from mcp import types

    tools, cursor = [], None
    for _ in range(1000):  # a server that returns cursors forever is not followed forever
        page = await session.list_tools(params=types.PaginatedRequestParams(cursor=cursor) if cursor else None)
        tools += page.tools
        cursor = page.next_cursor
        if not cursor:
            break
    return tools


def _reason(e: BaseException) -> str:
    """An exception (an ExceptionGroup unwrapped to its first leaf) in one line."""
    while isinstance(e, BaseExceptionGroup) and e.exceptions:
        e = e.exceptions[0]
    text = str(e)
    return f"{type(e).__name__}: {text}"[:300] if text else type(e).__name__


class McpEpisode(Episode):
    def __init__(self, env: "McpEnvironment", conn: _Connection | None, owned: bool) -> None:
        self.env = env
        self.conn = conn
        self.owned = owned  # session: episode: this episode's own server

    async def call(self, name: str, arguments: dict[str, Any]) -> ToolOutput:
        if self.owned:
            return await self.conn.call(name, arguments)
        # The actor's connection of the moment: an episode outlives a restart of a stateless server,
        # and a call that was queued on a connection that failed before sending it goes to the next.
        for attempt in range(3):
            try:
                return await (await self.env._shared()).call(name, arguments)
            except _NotSent:
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    async def close(self) -> None:
        if self.owned and self.conn is not None:
            await self.conn.close()


class McpEnvironment(Environment):
    def __init__(self, cfg: dict[str, Any]) -> None:
        super().__init__(cfg)
        try:
            import mcp  # noqa: F401
        except ImportError:
            raise ValueError("environment.type mcp needs the MCP SDK: pip install 'sft-ray[mcp]'") from None
        if bool(cfg.get("command")) == bool(cfg.get("url")):
            raise ValueError("environment.type mcp needs exactly one of environment.command (a stdio server) "
                             "and environment.url (a Streamable HTTP server)")
        self.stdio = bool(cfg.get("command"))
        if self.stdio:  # checked here, on the driver before any actor starts, for one clear error
            command, cwd = cfg["command"], cfg.get("cwd") or os.getcwd()
            if not (shutil.which(command) if os.sep not in command else os.path.isfile(os.path.join(cwd, command))):
                raise ValueError(f"environment.command: {command!r} is not a program on PATH"
                                 + (f" or in {cwd}" if os.sep in command else ""))
        self.label = " ".join([cfg["command"], *(cfg.get("args") or [])])[:160] if self.stdio else cfg["url"]
        # Secrets read on the driver (sft_ray/stages/generate.py:wiring) travel as Secret; used directly
        # (sft-ray validate, tests), they are read from this process's environment.
        self._secret_env = _secret(cfg.get("secret_env")) or _from_env(cfg.get("env_from"), "environment.env_from")
        self._secret_headers = (_secret(cfg.get("secret_headers"))
                                or _from_env(cfg.get("headers_env"), "environment.headers_env"))
        self._secrets = [v for v in (*self._secret_env.values(), *self._secret_headers.values()) if v]
        self.conn: _Connection | None = None
        self._tools: list[dict[str, Any]] = []
        self._names: set[str] = set()
        self._lock: asyncio.Lock | None = None
        self._listed = False
        self._closing: set[asyncio.Task] = set()  # closes in the background: referenced until done
        self._start_error: str | None = None

    def redact(self, text: str) -> str:
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return text

    def server_env(self) -> dict[str, str]:
        return {**{k: str(v) for k, v in (self.cfg.get("env") or {}).items()}, **self._secret_env}

    def headers(self) -> dict[str, str]:
        return dict(self._secret_headers)

    async def start(self) -> None:
        """Connect once and list the tools; ``session: actor`` keeps this connection for the episodes.
        A server that does not come up does not fail the actor: its episodes fail as
        ``environment_error`` (see :meth:`open`)."""
        self._lock = asyncio.Lock()
        try:
            await self._connect_and_list()
        except EnvironmentFailure as e:
            self._start_error = str(e)
            log.warning("%s", e)

    async def _connect_and_list(self) -> None:
        conn = _Connection(self, self.label)
        await conn.open(list_tools=True)
        self._tools = [chat_tool(t) for t in conn.tools]
        self._names = {t.name for t in conn.tools}
        self._listed = True
        if self.cfg.get("session", "actor") == "episode":
            await conn.close()
        else:
            self.conn = conn

    def default_tools(self) -> list[dict[str, Any]]:
        return self._tools

    def check_tools(self, tools: list[dict[str, Any]]) -> str | None:
        if not self._listed:
            return None  # the server never answered tools/list: open() fails the episode instead
        missing = sorted({(t.get("function") or {}).get("name") for t in tools} - self._names, key=str)
        if missing:
            return (f"declares tool(s) the MCP server {self.label} does not offer: {', '.join(map(str, missing))} "
                    f"(it offers: {', '.join(sorted(self._names)) or 'none'})")
        return None

    async def _shared(self) -> _Connection:
        """The actor's connection, restarted when the last one failed."""
        assert self._lock is not None, "start() first"
        async with self._lock:
            if self.conn is None or self.conn.failed is not None:
                old, self.conn = self.conn, None
                if old is not None:
                    self._close_later(old)
                conn = _Connection(self, self.label)
                await conn.open(list_tools=False)
                self.conn = conn
            return self.conn

    def discard(self, conn: _Connection) -> None:
        """A connection that failed: closed now (its process killed); the next episode starts a new one."""
        if conn is self.conn:
            self.conn = None
        self._close_later(conn)

    def _close_later(self, conn: _Connection) -> None:
        task = asyncio.ensure_future(conn.close())
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def open(self, row: dict[str, Any], episode_id: str) -> Episode:
        if not self._listed:
            # This episode was set up without the server's tools: it cannot run. Try the server again
            # for the episodes after it.
            assert self._lock is not None, "start() first"
            async with self._lock:
                if not self._listed:
                    await self._connect_and_list()  # raises EnvironmentFailure while it stays down
            raise EnvironmentFailure(f"MCP server {self.label} was not ready when this episode began "
                                     f"({self._start_error or 'not started'})")
        if self.cfg.get("session", "actor") == "episode":
            conn = _Connection(self, self.label)
            await conn.open(list_tools=False)
            return McpEpisode(self, conn, owned=True)
        await self._shared()  # a server that cannot be (re)started fails the episode before its first model call
        return McpEpisode(self, None, owned=False)

    async def close(self) -> None:
        if self.conn is not None:
            await self.conn.close()
            self.conn = None
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)

    def close_now(self) -> None:
        # No loop to run the SDK's shutdown in: a stdio server sees its stdin close when this
        # process exits, which ends an MCP stdio server (the protocol's shutdown).
        self.conn = None


def _secret(value: Any) -> dict[str, str]:
    return (value.get() or {}) if value is not None and hasattr(value, "get") else {}


async def list_tools(cfg: dict[str, Any]) -> list[dict[str, Any]]:
    """The tools an MCP environment offers (Chat form), connecting once: for ``sft-ray validate``."""
    env = McpEnvironment(cfg)
    await env.start()
    try:
        return env.default_tools()
    finally:
        await env.close()
