"""A resources server that speaks NeMo Gym's protocol, for tests: ``with NemoGymServer() as s: s.base_url``.

It behaves as /work/shared/AGENT_ROLLOUTS.md measures the real nemo-gym 0.7.0 servers
(``example_single_tool_call`` plus a few test tools), without installing NeMo Gym
(it needs Python 3.13 and pulls its own Ray):

- a session cookie named ``<ServerClass>___<instance>`` is set on every answer; a
  request without a valid one starts a new session. Per-session state is keyed on it,
  so a client that loses its cookie jar between calls is caught (``seeded`` and
  ``session_tool_calls`` in the verify answer, ``recall`` returning nothing);
- ``POST /seed_session`` (the row) -> ``{}``;
- ``POST /get_weather {"city"}`` -> ``{"city", "weather_description": "The weather in <city> is cold."}``;
- ``POST /remember {"value"}`` / ``POST /recall {}``: what THIS session stored (state isolation);
- ``POST /broken_tool``: 500 with a JSON string body (an exception in the server);
- any other tool: 404 ``{"detail": "Not Found"}``;
- ``POST /verify``: the row + ``response`` (validated as the real server does: 422
  ``{"detail": [...]}`` otherwise) -> the same + ``reward`` (a row's ``force_reward`` as is; else 1.0 when any ``function_call``
  named ``get_weather`` is in ``response.output``), ``mask_sample``, ``failure_kind``,
  ``failure_reason`` and numeric metrics. Test knob (not NeMo Gym's): a row with
  ``"force_mask_sample": true`` is answered ``mask_sample: true`` (an infrastructure failure);
- ``POST /close_session``: exactly ``{"resources_session_id": "<string>", "episode_id":
  {"rollout_id": "<[A-Za-z0-9][A-Za-z0-9._-]*, not ending in -a<N>>", "attempt"?: <int >= 0>}}``
  -> ``{"resources_session_id"}``, anything else 422.

Checked against the real ``example_single_tool_call`` of nemo-gym 0.7.0 (its FastAPI app
under uvicorn, the same 59 requests to both): same status codes and the same ``loc`` of
every 422 (NeMo Gym's own loc adds the union member, e.g. ``function_call``). Differences:
the 422 ``msg`` texts, and the verify answer carries extra metrics here.

``counts`` (requests per route), ``cookies_seen`` (session ids that arrived in a cookie),
``sessions`` (per-session state and the routes it called, in order), ``verified`` and
``closed`` (the bodies) are there for assertions.

Run on its own (for examples/agent-nemo-gym.yaml): ``python tests/nemo_gym_server.py --port 8001``.
"""

from __future__ import annotations

import asyncio
import contextvars
import hashlib
import hmac
import re
import secrets
import threading
from collections import Counter
from typing import Any

import orjson
from aiohttp import web

_ROLLOUT_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_ATTEMPT_SUFFIX = re.compile(r"-a[1-9][0-9]*$")
_SID: contextvars.ContextVar[str] = contextvars.ContextVar("session_id")  # the request's session, for its route
_RESPONSE_FIELDS = ("id", "created_at", "model", "object", "parallel_tool_calls", "tool_choice", "tools", "output")


def _missing(loc: list, value: Any = None) -> dict:
    return {"type": "missing", "loc": ["body", *loc], "msg": "Field required", "input": value}


def _wrong(loc: list, msg: str, value: Any, kind: str = "value_error") -> dict:
    return {"type": kind, "loc": ["body", *loc], "msg": msg, "input": value}


def _not_dict(loc: list, value: Any) -> dict:
    return _wrong(loc, "Input should be a valid dictionary or object to extract fields from", value,
                  "model_attributes_type")


def _extra(loc: list, value: Any) -> dict:
    return _wrong(loc, "Extra inputs are not permitted", value, "extra_forbidden")


def validate_verify(body: Any) -> list[dict]:
    """Validation errors of a /verify body, pydantic-style; [] when valid."""
    if not isinstance(body, dict):
        return [_not_dict([], body)]
    errors = []
    rcp = body.get("responses_create_params")
    if not isinstance(rcp, dict):
        errors.append(_missing(["responses_create_params"], body) if rcp is None
                      else _not_dict(["responses_create_params"], rcp))
    elif "input" not in rcp:
        errors.append(_missing(["responses_create_params", "input"], rcp))
    resp = body.get("response")
    if not isinstance(resp, dict):
        return errors + [_missing(["response"], body) if resp is None else _not_dict(["response"], resp)]
    errors += [_missing(["response", k], resp) for k in _RESPONSE_FIELDS if k not in resp]
    if resp.get("object", "response") != "response":
        errors.append(_wrong(["response", "object"], "Input should be 'response'", resp.get("object"), "literal_error"))
    if not isinstance(resp.get("parallel_tool_calls", True), bool):
        errors.append(_wrong(["response", "parallel_tool_calls"], "Input should be a valid boolean",
                             resp["parallel_tool_calls"], "bool_type"))
    if not isinstance(resp.get("tools", []), list):
        errors.append(_wrong(["response", "tools"], "Input should be a valid list", resp.get("tools"), "list_type"))
    output = resp.get("output", [])
    if not isinstance(output, list):
        return errors + [_wrong(["response", "output"], "Input should be a valid list", output, "list_type")]
    for i, item in enumerate(output):
        loc = ["response", "output", i]
        if not isinstance(item, dict):
            errors.append(_not_dict(loc, item))
            continue
        kind = item.get("type")
        if kind is None:
            errors.append(_wrong(loc, "Unable to extract tag using discriminator 'type'", item, "union_tag_not_found"))
        elif kind == "function_call":
            for k in ("call_id", "name", "arguments"):
                if k not in item:
                    errors.append(_missing(loc + [k], item))
                elif not isinstance(item[k], str):
                    errors.append(_wrong(loc + [k], "Input should be a valid string", item[k], "string_type"))
        elif kind == "function_call_output":
            errors += [_missing(loc + [k], item) for k in ("call_id", "output") if k not in item]
            if not isinstance(item.get("output", ""), (str, list)):
                errors.append(_wrong(loc + ["output"], "Input should be a valid string", item["output"], "string_type"))
        elif kind == "message":
            content = item.get("content")
            if content is None:
                errors.append(_missing(loc + ["content"], item))
            elif isinstance(content, list):
                if item.get("role", "assistant") == "assistant" and "id" not in item:
                    errors.append(_missing(loc + ["id"], item))
                for j, part in enumerate(content):
                    if isinstance(part, dict) and part.get("type") == "output_text":
                        errors += [_missing(loc + ["content", j, k], part) for k in ("text", "annotations")
                                   if k not in part]
            elif not isinstance(content, str):
                errors.append(_wrong(loc + ["content"], "Input should be a valid string", content, "string_type"))
        elif kind != "reasoning":
            errors.append(_wrong(loc + ["type"], f"unknown output item type {kind!r}", kind, "union_tag_invalid"))
    return errors


def validate_close(body: Any) -> list[dict]:
    """Validation errors of a /close_session body (NeMo Gym's ``ResourcesCloseSessionRequest``)."""
    if not isinstance(body, dict):
        return [_not_dict([], body)]
    errors = [_extra([k], body[k]) for k in body if k not in ("resources_session_id", "episode_id")]
    if "resources_session_id" not in body:
        errors.append(_missing(["resources_session_id"], body))
    elif not isinstance(body["resources_session_id"], str):
        errors.append(_wrong(["resources_session_id"], "Input should be a valid string",
                             body["resources_session_id"], "string_type"))
    ep = body.get("episode_id")
    if not isinstance(ep, dict):
        return errors + [_missing(["episode_id"], body) if ep is None else _not_dict(["episode_id"], ep)]
    errors += [_extra(["episode_id", k], ep[k]) for k in ep if k not in ("rollout_id", "attempt")]
    rid = ep.get("rollout_id")
    if not isinstance(rid, str) or not _ROLLOUT_ID.fullmatch(rid):
        errors.append(_wrong(["episode_id", "rollout_id"], "String should match pattern "
                             "'^[A-Za-z0-9][A-Za-z0-9._-]*$'", rid, "string_pattern_mismatch"))
    elif _ATTEMPT_SUFFIX.search(rid):
        errors.append(_wrong(["episode_id", "rollout_id"], "Value error, rollout_id must not end with the reserved "
                             "attempt suffix '-a<N>'", rid))
    attempt = ep.get("attempt", 0)
    if not isinstance(attempt, int) or isinstance(attempt, bool) or attempt < 0:
        errors.append(_wrong(["episode_id", "attempt"], "Input should be greater than or equal to 0", attempt,
                             "greater_than_equal"))
    return errors


class NemoGymServer:
    """The server in a background thread on 127.0.0.1 (port 0: a free one)."""

    def __init__(self, server_class: str = "SimpleWeatherResourcesServer", instance: str = "example_single_tool_call",
                 tool_delay_s: float = 0.0, port: int = 0) -> None:
        self.cookie_name = f"{server_class}___{instance}"
        self.tool_delay_s = tool_delay_s
        self._secret = secrets.token_bytes(16)
        self.counts: Counter = Counter()
        self.cookies_seen: set[str] = set()
        self.sessions: dict[str, dict] = {}
        self.verified: list[dict] = []
        self.closed: list[dict] = []
        self.port = port
        self._loop = asyncio.new_event_loop()
        self._started = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    # Starlette's SessionMiddleware signs the cookie with itsdangerous; an HMAC over the
    # session id does the same job here without pulling Starlette into the tests.
    def _sign(self, sid: str) -> str:
        return f"{sid}.{hmac.new(self._secret, sid.encode(), hashlib.sha256).hexdigest()[:16]}"

    def _session(self, request: web.Request) -> str:
        raw = request.cookies.get(self.cookie_name, "")
        sid = raw.rsplit(".", 1)[0]
        if raw and hmac.compare_digest(self._sign(sid), raw) and sid in self.sessions:
            self.cookies_seen.add(sid)
            return sid
        sid = secrets.token_hex(8)
        self.sessions[sid] = {"seeded": False, "routes": [], "tool_calls": 0, "stored": None}
        return sid

    def _app(self) -> web.Application:
        @web.middleware
        async def session(request: web.Request, handler) -> web.StreamResponse:
            route = request.path.lstrip("/")
            self.counts[route] += 1
            sid = self._session(request)
            _SID.set(sid)
            self.sessions[sid]["routes"].append(route)
            try:
                resp = await handler(request)
            except web.HTTPException as e:  # 404 and friends carry the cookie too
                resp = web.json_response({"detail": e.reason}, status=e.status)
            resp.set_cookie(self.cookie_name, self._sign(sid), path="/", max_age=14 * 24 * 3600,
                            httponly=True, samesite="lax")
            return resp

        async def body_of(request: web.Request) -> Any:
            try:
                return orjson.loads(await request.read())
            except orjson.JSONDecodeError as e:
                raise _Invalid([{"type": "json_invalid", "loc": ["body", 0], "msg": "JSON decode error",
                                 "input": {}, "ctx": {"error": str(e)}}]) from None

        def route(fn):
            async def wrapped(request: web.Request) -> web.Response:
                try:
                    out = await fn(request, await body_of(request), self.sessions[_SID.get()])
                except _Invalid as e:
                    return web.json_response({"detail": e.errors}, status=422)
                except Exception as e:  # what FastAPI answers for an exception in a route
                    return web.Response(body=orjson.dumps(f"{type(e).__name__}: {e}"), status=500,
                                        content_type="application/json")
                return web.Response(body=orjson.dumps(out), content_type="application/json")

            return wrapped

        async def tool_delay() -> None:
            if self.tool_delay_s:
                await asyncio.sleep(self.tool_delay_s)

        async def seed_session(request, body, state):
            if not isinstance(body, dict):
                raise _Invalid([_wrong([], "Input should be a valid dictionary", body)])
            state["seeded"] = True
            state["row"] = body
            return {}

        async def get_weather(request, body, state):
            if not isinstance(body, dict) or not isinstance(body.get("city"), str):
                raise _Invalid([_missing(["city"], body)] if not isinstance(body, dict) or "city" not in body
                               else [_wrong(["city"], "Input should be a valid string", body["city"])])
            await tool_delay()
            state["tool_calls"] += 1
            return {"city": body["city"], "weather_description": f"The weather in {body['city']} is cold."}

        async def remember(request, body, state):
            if not isinstance(body, dict) or "value" not in body:
                raise _Invalid([_missing(["value"], body)])
            await tool_delay()
            state["tool_calls"] += 1
            state["stored"] = body["value"]
            return {"stored": body["value"]}

        async def recall(request, body, state):
            await tool_delay()
            state["tool_calls"] += 1
            return {"value": state["stored"]}

        async def broken_tool(request, body, state):
            state["tool_calls"] += 1
            raise RuntimeError("the tool broke")

        async def verify(request, body, state):
            if errors := validate_verify(body):
                raise _Invalid(errors)
            output = body["response"]["output"]
            calls = [i for i in output if isinstance(i, dict) and i.get("type") == "function_call"]
            weather = sum(c["name"] == "get_weather" for c in calls)
            self.verified.append(body)
            masked = bool(body.get("force_mask_sample"))
            reward = body["force_reward"] if "force_reward" in body else (1.0 if weather else 0.0)  # a broken server
            return {**body, "reward": reward, "mask_sample": masked,
                    "failure_kind": "infrastructure" if masked else None,
                    "failure_reason": "forced by the row" if masked else None,
                    "num_function_calls": len(calls), "num_get_weather_calls": weather,
                    "session_tool_calls": state["tool_calls"], "seeded": 1.0 if state["seeded"] else 0.0}

        async def close_session(request, body, state):
            if errors := validate_close(body):
                raise _Invalid(errors)
            self.closed.append(body)
            state["closed"] = True
            return {"resources_session_id": body["resources_session_id"]}

        app = web.Application(middlewares=[session], client_max_size=64 << 20)
        for fn in (seed_session, get_weather, remember, recall, broken_tool, verify, close_session):
            app.router.add_post(f"/{fn.__name__}", route(fn))
        return app

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._runner = web.AppRunner(self._app(), access_log=None)
        self._loop.run_until_complete(self._runner.setup())
        site = web.TCPSite(self._runner, "127.0.0.1", self.port)
        self._loop.run_until_complete(site.start())
        self.port = site._server.sockets[0].getsockname()[1]
        self._started.set()
        self._loop.run_forever()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> "NemoGymServer":
        self._thread.start()
        if not self._started.wait(10):
            raise RuntimeError("the NeMo Gym test server did not start")
        return self

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def __enter__(self) -> "NemoGymServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class _Invalid(Exception):
    def __init__(self, errors: list[dict]) -> None:
        super().__init__("invalid body")
        self.errors = errors


if __name__ == "__main__":
    import argparse
    import time

    ap = argparse.ArgumentParser(description="A NeMo Gym-protocol weather resources server on 127.0.0.1.")
    ap.add_argument("--port", type=int, default=8001)
    args = ap.parse_args()
    with NemoGymServer(port=args.port) as server:
        print(f"NeMo Gym-protocol resources server on {server.base_url}", flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass
