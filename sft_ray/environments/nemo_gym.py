"""``environment.type: nemo_gym``: a running NeMo Gym resources server, unchanged.

Per episode (the protocol, with bodies, is in docs/nemo_gym_protocol.md):
``POST /seed_session`` with the row; ``POST /<tool name>`` with the parsed arguments
as the JSON body for each tool call (the answer body is the tool's output, an HTTP
error body included, as NeMo Gym's own agent does); ``POST /verify`` with the row plus
``response``, a Responses object of the whole episode; ``POST /close_session``.

Stateful servers key their state on a session cookie, so every request of an episode
must carry the cookie the server set. One shared connection pool serves all episodes
of an actor, and each episode carries its own cookies by hand: a cookie jar per
episode would need a client session (and a connection pool) per episode, and
aiohttp's default jar refuses cookies from an IP host such as 127.0.0.1 anyway.

Connection errors, timeouts and 5xx answers of seed/verify are retried with the
backoff of :mod:`sft_ray.backends.retry`; a server that stays down fails the sample
as an ``environment_error`` (an infrastructure failure: no reward, retried by a rerun).
"""

from __future__ import annotations

import asyncio
import re
import time
from http.cookies import SimpleCookie
from typing import Any

import aiohttp
import orjson

from sft_ray.backends import retry
from sft_ray.backends.openai import close_session_now
from sft_ray.environments.base import Environment, EnvironmentFailure, Episode, ToolOutput
from sft_ray.messages import to_responses_output, tool_choice_to_responses, tool_to_responses

_ROLLOUT_ID = re.compile(r"[^A-Za-z0-9._-]")


class NemoGymEpisode(Episode):
    def __init__(self, env: "NemoGymEnvironment", episode_id: str) -> None:
        self.env = env
        self.episode_id = _ROLLOUT_ID.sub("_", episode_id).lstrip("._-") or "episode"
        self.cookies: dict[str, str] = {}

    def _headers(self) -> dict[str, str]:
        return {"Cookie": "; ".join(f"{k}={v}" for k, v in self.cookies.items())} if self.cookies else {}

    async def _post(self, route: str, body: Any) -> tuple[int, bytes]:
        """One POST; connection errors and timeouts raise aiohttp/asyncio errors."""
        assert self.env.session is not None
        async with self.env.session.post(f"{self.env.base_url}/{route}", data=orjson.dumps(body),
                                         headers=self._headers()) as resp:
            raw = await resp.read()
            for name, morsel in resp.cookies.items():
                self.cookies[name] = morsel.value
            # resp.cookies keeps only what aiohttp parsed; a server that sets a cookie with an
            # attribute aiohttp rejects still sends it: read the headers too.
            for header in resp.headers.getall("Set-Cookie", []):
                parsed = SimpleCookie()
                try:
                    parsed.load(header)
                except Exception:  # an odd header is not ours to fail on
                    continue
                for name, morsel in parsed.items():
                    self.cookies[name] = morsel.value
            return resp.status, raw

    async def _post_retried(self, route: str, body: Any, retry_5xx: bool = True) -> tuple[int, bytes]:
        """POST with the retry policy for connection errors, timeouts and (``retry_5xx``) 5xx."""

        async def attempt(n: int) -> tuple[int, bytes] | retry.Failure:
            try:
                status, raw = await self._post(route, body)
            except (aiohttp.ClientError, asyncio.TimeoutError) as e:
                return retry.Failure(retry.CONNECTION_ERROR, f"{type(e).__name__}: {e}" if str(e) else type(e).__name__)
            if status < 500 or not retry_5xx:
                return status, raw
            # The last 5xx is passed on as an answer (the caller reads its status).
            return retry.Failure(retry.SERVER_ERROR, f"HTTP {status}: {raw[:200].decode('utf-8', 'replace')}",
                                 value=(status, raw))

        outcome, attempts = await retry.run(attempt, self.env.policy)
        if not isinstance(outcome, retry.Failure):
            return outcome
        if outcome.value is not None:
            return outcome.value
        raise EnvironmentFailure(f"POST /{route}: {outcome.message} (after {attempts} attempts)")

    async def seed(self, row: dict[str, Any]) -> None:
        status, raw = await self._post_retried("seed_session", row)
        if status >= 400:
            raise EnvironmentFailure(f"POST /seed_session: HTTP {status}: {raw[:300].decode('utf-8', 'replace')}")

    async def call(self, name: str, arguments: dict[str, Any]) -> ToolOutput:
        # A 5xx from a tool is the tool's exception, a valid output: only a request that never
        # got an answer is retried, and a server that stays down is the environment's failure.
        status, raw = await self._post_retried(name, arguments, retry_5xx=False)
        # The body is the tool's output even on an HTTP error (NeMo Gym's agent does the same).
        return ToolOutput(raw.decode("utf-8", "replace"), error=status >= 400)

    async def verify(self, row: dict[str, Any], messages: list[dict[str, Any]],
                     tools: list[dict[str, Any]] | None) -> dict[str, Any]:
        rcp = row.get("responses_create_params") if isinstance(row.get("responses_create_params"), dict) else {}
        response = {
            "id": f"resp_{self.episode_id}", "object": "response", "created_at": int(time.time()),
            "model": self.env.model_name or "sft-ray", "status": "completed",
            "parallel_tool_calls": bool(rcp.get("parallel_tool_calls", True)),
            "tool_choice": tool_choice_to_responses(rcp.get("tool_choice", "auto")),
            "tools": [tool_to_responses(t) for t in tools or []],
            "output": to_responses_output(messages),
        }
        body = {**row, "response": response}
        if "responses_create_params" not in body:  # /verify validates it as a required field
            body["responses_create_params"] = {"input": [m for m in messages if m["role"] in ("system", "user")]}
        status, raw = await self._post_retried("verify", body)
        if status >= 400:
            raise EnvironmentFailure(f"POST /verify: HTTP {status}: {raw[:300].decode('utf-8', 'replace')}")
        try:
            answer = orjson.loads(raw)
        except orjson.JSONDecodeError:
            raise EnvironmentFailure("POST /verify: the answer is not JSON") from None
        if not isinstance(answer, dict) or "reward" not in answer:
            raise EnvironmentFailure("POST /verify: the answer has no 'reward'")
        # Keep what the server added, not the echo of the row and the response.
        return {k: v for k, v in answer.items() if k not in body or k == "reward"}

    async def close(self) -> None:
        body = {"resources_session_id": self.episode_id, "episode_id": {"rollout_id": self.episode_id}}
        try:
            await self._post("close_session", body)
        except (aiohttp.ClientError, asyncio.TimeoutError):
            pass  # the episode is done and written; a lost close only leaves the server's state to expire


class NemoGymEnvironment(Environment):
    def __init__(self, cfg: dict[str, Any]) -> None:
        super().__init__(cfg)
        if not cfg.get("base_url"):
            raise ValueError("environment.base_url is required for environment.type nemo_gym")
        self.base_url = cfg["base_url"].rstrip("/")
        self.session: aiohttp.ClientSession | None = None
        self.policy = retry.Policy.of(cfg, max_retries=4, base_s=0.5, cap_s=10.0)
        self.model_name: str | None = None

    async def start(self) -> None:
        timeout = aiohttp.ClientTimeout(total=self.cfg.get("timeout_s", 60.0))
        self.session = aiohttp.ClientSession(
            timeout=timeout, cookie_jar=aiohttp.DummyCookieJar(),  # cookies are carried per episode
            headers={"Content-Type": "application/json"},
            connector=aiohttp.TCPConnector(limit=int(self.cfg.get("max_connections", 256))))

    async def open(self, row: dict[str, Any], episode_id: str) -> Episode:
        episode = NemoGymEpisode(self, episode_id)
        await episode.seed(row)
        return episode

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()

    def close_now(self) -> None:
        close_session_now(self.session)
