"""A local OpenAI-compatible server that echoes prompts, for trials, tests and benchmarks.

It answers ``POST /v1/chat/completions`` and ``POST /v1/responses`` with the
last user message as the reply, after an optional latency, and simulates what
hosted APIs do when they misbehave: 429 with ``Retry-After``, 500, hangs past
the client's timeout and malformed bodies, either at random rates or on
request through markers in the prompt:

- ``[[fail:500:N]]`` / ``[[fail:429:N]]`` / ``[[fail:timeout:N]]`` / ``[[fail:malformed:N]]``:
  the first N attempts of this prompt fail that way, later ones succeed;
- ``[[status:400]]``: always 400 (context length exceeded);
- ``[[echo_auth]]``: 401 whose body repeats the request's Authorization and ``api-key``
  headers (a careless server: the client must keep the keys out of its error text);
- ``[[echo_key_prefix]]``: 401 whose body quotes the first 24 characters of each of those
  headers' keys (as providers quote part of a wrong key);
- ``[[sleep:S]]``: answer after S more seconds (a long generation, for scaled timeouts).

A model whose name contains ``reasoning`` (``mock-reasoning``, ``mock-judge-reasoning``)
refuses what OpenAI's reasoning models refuse, with OpenAI's 400 body
(``code: unsupported_parameter``, ``param``): ``temperature`` and ``top_p``, and
``max_tokens`` in Chat Completions (it wants ``max_completion_tokens``).

As an agent model: a request that carries ``tools`` (Chat Completions nests them
under ``"function"``, Responses has them flat; both forms are read in both APIs)
is answered with tool calls until the conversation has tool results, then with a
final message holding those results verbatim (one per line). Markers in the last
user message steer it:

- ``[[tool:NAME {"arg": ...}]]``: call NAME with these arguments (several markers:
  several calls in one turn; NAME need not be among the tools). Without a marker it
  calls the first tool with its first required string property set to the user text
  (markers stripped);
- ``[[parallel:N]]``: N calls in one turn (the chosen calls repeated), distinct ids;
- ``[[steps:N]]``: keep calling tools for the first N model calls of the episode
  (default 1; 0: answer at once), to test ``max_steps``.

``MockConfig.tool_malformed_rate`` / ``tool_unknown_rate`` make a share of calls carry
arguments that are not JSON or a tool name that does not exist. In agent requests
the ``[[fail:...]]`` markers count attempts per model call of the episode.

A request for model ``mock-judge`` is answered as an LLM judge would (:func:`judge_reply`).

With ``requests_per_minute`` / ``tokens_per_minute`` set it enforces real limits, as
hosted APIs do: a token bucket per limit that refills continuously and holds
``limit_window_s`` seconds of refill; a request that finds a bucket short is answered
429 with ``Retry-After`` (seconds until it would fit) and every answer carries
``x-ratelimit-limit-*``, ``x-ratelimit-remaining-*`` and ``x-ratelimit-reset-*`` headers.
A request's tokens are its prompt words plus its output limit (``max_tokens``).

The Batch API (OpenAI's): ``POST /v1/files`` (multipart, ``purpose=batch``), ``GET
/v1/files/{id}/content``, ``POST /v1/batches``, ``GET /v1/batches`` (newest first),
``GET /v1/batches/{id}`` and ``POST /v1/batches/{id}/cancel``. A batch stays ``validating``
for ``batch_delay_s``, then its lines are answered as the online endpoints answer them
(same bodies, no latency or rate limits), in reverse order, into an output file (status 200)
and an error file (other statuses, and ``error`` lines); it ends ``completed``. A file
with a malformed line or a repeated ``custom_id`` fails the batch in validation. Markers:
``[[batch_error:N]]``: the first N batch attempts of this prompt get an ``error`` line
(``server_error``); ``[[fail:500:N]]`` gives a line with ``status_code`` 500. With
``batch_expire`` the first N batches run only ``batch_expire_keep`` of their lines and end
``expired`` (the rest get ``batch_expired`` error lines). ``GET /batch_stats`` counts
uploads, batches created and, per ``custom_id``, how often it was submitted.

``GET /stats`` reports requests served and the most requests ever in flight at
once, which the tests use to check the concurrency limit.

The package: ``state`` (settings, counters, token bucket), ``core`` (what every provider's routes
share: :class:`~sft_ray.devserver.core.Mock`, its simulated failures and rate limits, ``/stats``),
``agent`` (the agent model), ``judge`` (the judge), and one module of routes per provider API:
``openai`` (the online endpoints) and ``openai_batch`` (its Batch API). A new provider's mock is a
module with a class taking the :class:`~sft_ray.devserver.core.Mock` (or the routes it builds on)
whose ``routes()`` lists its routes, added to :func:`route_tables`.
"""

from __future__ import annotations

import asyncio
import threading

from aiohttp import web

from sft_ray.devserver.agent import UNKNOWN_TOOL, AgentTurn, agent_turn, tool_call_answer
from sft_ray.devserver.anthropic import AnthropicRoutes
from sft_ray.devserver.core import Mock
from sft_ray.devserver.judge import judge_reply
from sft_ray.devserver.openai import OpenAIRoutes, refused_by_reasoning_model
from sft_ray.devserver.openai_batch import BatchRoutes
from sft_ray.devserver.state import Bucket, MockConfig, MockState

__all__ = ["UNKNOWN_TOOL", "AgentTurn", "Bucket", "MockConfig", "MockServer", "MockState", "agent_turn",
           "judge_reply", "make_app", "refused_by_reasoning_model", "route_tables", "serve", "tool_call_answer"]


def route_tables(mock: Mock) -> list[list[web.RouteDef]]:
    """Every provider's routes on one server (a new provider's mock: one more line here)."""
    openai = OpenAIRoutes(mock)
    return [mock.routes(), openai.routes(), BatchRoutes(openai).routes(), AnthropicRoutes(mock).routes()]


def make_app(cfg: MockConfig, state: MockState) -> web.Application:
    """The mock server's application: every provider's routes over one :class:`Mock`."""
    app = web.Application(client_max_size=512 << 20)  # a batch file may be up to 200 MB
    for table in route_tables(Mock(cfg, state)):
        app.router.add_routes(table)
    return app


def serve(cfg: MockConfig, host: str = "127.0.0.1", port: int = 8000) -> None:
    """Serve until interrupted."""
    print(f"mock OpenAI-compatible server on http://{host}:{port}/v1", flush=True)
    web.run_app(make_app(cfg, MockState()), host=host, port=port, print=None, access_log=None)


class MockServer:
    """The server in a background thread, for tests: ``with MockServer(cfg) as s: s.url``."""

    def __init__(self, cfg: MockConfig | None = None, host: str = "127.0.0.1") -> None:
        self.cfg = cfg or MockConfig()
        self.state = MockState()
        self.host = host
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._started = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._runner = web.AppRunner(make_app(self.cfg, self.state), access_log=None)
        self._loop.run_until_complete(self._runner.setup())
        site = web.TCPSite(self._runner, self.host, 0)
        self._loop.run_until_complete(site.start())
        self.port = site._server.sockets[0].getsockname()[1]
        self._started.set()
        self._loop.run_forever()

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    def start(self) -> "MockServer":
        self._thread.start()
        self._started.wait(10)
        return self

    def stop(self) -> None:
        async def _shutdown() -> None:
            await self._runner.cleanup()

        asyncio.run_coroutine_threadsafe(_shutdown(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def __enter__(self) -> "MockServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
