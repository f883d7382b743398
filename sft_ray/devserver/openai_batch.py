"""OpenAI's Batch API: ``/v1/files`` and ``/v1/batches`` (see the package doc), each line answered as
the online endpoints answer it, and ``GET /batch_stats``."""

from __future__ import annotations

import asyncio
import re
import time
from collections import Counter

import orjson
from aiohttp import web

from sft_ray.devserver.agent import _last_user_text
from sft_ray.devserver.openai import OpenAIRoutes

_BATCH_ERROR = re.compile(r"\[\[batch_error:(\d+)\]\]")


def api_error(status: int, message: str) -> web.Response:
    return web.json_response({"error": {"message": message, "type": "invalid_request_error"}}, status=status)


class BatchRoutes:
    """Files and batches, kept in the server's :class:`~sft_ray.devserver.state.MockState`."""

    def __init__(self, online: OpenAIRoutes) -> None:
        self.online, self.cfg, self.state, self.rng = online, online.cfg, online.state, online.rng

    async def upload(self, request: web.Request) -> web.Response:
        if request.content_type != "multipart/form-data":
            return api_error(400, "expected multipart/form-data with 'purpose' and 'file'")
        form = await request.post()
        part = form.get("file")
        if form.get("purpose") != "batch" or not hasattr(part, "file"):
            return api_error(400, "'purpose' must be 'batch' and 'file' a file")
        content = part.file.read()
        self.state.uploads += 1
        fid = f"file-{self.state.uploads:06d}{self.rng.randrange(16 ** 6):06x}"
        self.state.files[fid] = content
        return web.json_response({"id": fid, "object": "file", "bytes": len(content), "created_at": int(time.time()),
                                  "filename": part.filename, "purpose": "batch"})

    async def file_content(self, request: web.Request) -> web.Response:
        content = self.state.files.get(request.match_info["file_id"])
        if content is None:
            return api_error(404, "no such file")
        return web.Response(body=content, content_type="application/octet-stream")

    def batch_line(self, custom_id: str, status: int | None, body: dict | None, error: dict | None) -> bytes:
        response = None if status is None else {"status_code": status, "request_id": f"req_{self.rng.randrange(1 << 48):x}",
                                                "body": body}
        return orjson.dumps({"id": f"batch_req_{self.rng.randrange(1 << 48):x}", "custom_id": custom_id,
                             "response": response, "error": error})

    async def process(self, batch: dict, lines: list[dict], api: str, expire: bool) -> None:
        """Answer a batch's lines as the online endpoints would, after ``batch_delay_s``; an expiring
        batch answers only ``batch_expire_keep`` of them; lines come out in reverse order (a
        provider keeps no order)."""
        await asyncio.sleep(self.cfg.batch_delay_s)
        if batch["status"] == "validating":
            batch["status"], batch["in_progress_at"] = "in_progress", int(time.time())
        out, err = [], []
        keep = int(len(lines) * self.cfg.batch_expire_keep) if expire else len(lines)
        counts = batch["request_counts"]
        for i, line in enumerate(lines):
            if i and i % 200 == 0:
                await asyncio.sleep(0)  # let polls in
            cid = line.get("custom_id")
            if batch["status"] == "cancelling" or i >= keep:
                reason = "batch_cancelled" if batch["status"] == "cancelling" else "batch_expired"
                err.append(self.batch_line(cid, None, None, {"code": reason, "message": "This request could not be "
                                                        "executed before the batch ended."}))
                continue
            body = line.get("body") if isinstance(line.get("body"), dict) else {}
            text = _last_user_text(body.get("messages") if api == "chat" else body.get("input"))
            if m := _BATCH_ERROR.search(text):
                self.state.attempts[f"batch|{text}"] += 1
                if self.state.attempts[f"batch|{text}"] <= int(m.group(1)):
                    err.append(self.batch_line(cid, None, None, {"code": "server_error", "message": "The server had "
                                                            "an error processing this request."}))
                    counts["failed"] += 1
                    continue
            resp = await self.online.answer(api, body, {}, online=False)
            try:
                payload = orjson.loads(resp.body)
            except orjson.JSONDecodeError:  # a simulated malformed answer
                payload = {"error": {"message": "the model's answer was malformed"}}
                resp.set_status(500)
            (out if resp.status == 200 else err).append(self.batch_line(cid, resp.status, payload, None))
            counts["completed" if resp.status == 200 else "failed"] += 1
        batch["status"] = "finalizing"
        await asyncio.sleep(0)
        for name, data in (("output_file_id", out), ("error_file_id", err)):
            if data:
                fid = f"file-out{len(self.state.files):06d}"
                self.state.files[fid] = b"".join(d + b"\n" for d in data)
                batch[name] = fid
        end = "cancelled" if batch["status"] == "cancelling" else "expired" if keep < len(lines) else "completed"
        batch["status"], batch[f"{end}_at"] = end, int(time.time())

    async def create_batch(self, request: web.Request) -> web.Response:
        try:
            body = orjson.loads(await request.read())
        except orjson.JSONDecodeError:
            return api_error(400, "body is not JSON")
        endpoint = body.get("endpoint")
        content = self.state.files.get(body.get("input_file_id"))
        if endpoint not in ("/v1/chat/completions", "/v1/responses"):
            return api_error(400, "endpoint must be /v1/chat/completions or /v1/responses")
        if content is None:
            return api_error(400, "no such input_file_id")
        if body.get("completion_window") != "24h":
            return api_error(400, "completion_window must be '24h'")
        self.state.batches_created += 1
        bid = f"batch_{self.state.batches_created:06d}{self.rng.randrange(16 ** 6):06x}"
        batch = {"id": bid, "object": "batch", "endpoint": endpoint, "errors": None,
                 "input_file_id": body["input_file_id"], "completion_window": "24h", "status": "validating",
                 "output_file_id": None, "error_file_id": None, "created_at": int(time.time()),
                 "request_counts": {"total": 0, "completed": 0, "failed": 0}, "metadata": body.get("metadata")}
        self.state.batches[bid] = batch
        lines, seen = [], set()
        for n, raw in enumerate(content.splitlines(), 1):
            if not raw.strip():
                continue
            try:
                line = orjson.loads(raw)
            except orjson.JSONDecodeError:
                line = None
            problem = None
            if not isinstance(line, dict) or not isinstance(line.get("custom_id"), str):
                problem = "each line must be a JSON object with a string custom_id"
            elif line["custom_id"] in seen:
                problem = f"duplicate custom_id {line['custom_id']!r}"
            elif line.get("method") != "POST" or line.get("url") != endpoint:
                problem = f"method must be POST and url {endpoint}"
            if problem:  # the provider fails the whole batch in validation
                batch["status"], batch["failed_at"] = "failed", int(time.time())
                batch["errors"] = {"object": "list", "data": [{"code": "invalid_request", "message": problem,
                                                               "line": n}]}
                return web.json_response(batch)
            seen.add(line["custom_id"])
            self.state.batch_lines[line["custom_id"]] += 1
            lines.append(line)
        batch["request_counts"]["total"] = len(lines)
        expire = self.state.batches_created <= self.cfg.batch_expire
        api = "chat" if endpoint == "/v1/chat/completions" else "responses"
        batch["_task"] = asyncio.ensure_future(self.process(batch, lines[::-1], api, expire))
        return web.json_response({k: v for k, v in batch.items() if not k.startswith("_")})

    async def get_batch(self, request: web.Request) -> web.Response:
        batch = self.state.batches.get(request.match_info["batch_id"])
        if batch is None:
            return api_error(404, "no such batch")
        return web.json_response({k: v for k, v in batch.items() if not k.startswith("_")})

    async def list_batches(self, request: web.Request) -> web.Response:
        newest = [{k: v for k, v in b.items() if not k.startswith("_")} for b in reversed(self.state.batches.values())]
        after = request.query.get("after")
        if after:
            ids = [b["id"] for b in newest]
            newest = newest[ids.index(after) + 1:] if after in ids else []
        limit = max(1, min(100, int(request.query.get("limit", "20")) if request.query.get("limit", "").isdigit()
                           else 20))
        return web.json_response({"object": "list", "data": newest[:limit], "has_more": len(newest) > limit})

    async def cancel_batch(self, request: web.Request) -> web.Response:
        batch = self.state.batches.get(request.match_info["batch_id"])
        if batch is None:
            return api_error(404, "no such batch")
        if batch["status"] in ("validating", "in_progress"):
            batch["status"] = "cancelling"
        return web.json_response({k: v for k, v in batch.items() if not k.startswith("_")})

    async def batch_stats(self, request: web.Request) -> web.Response:
        return web.json_response({"uploads": self.state.uploads, "batches_created": self.state.batches_created,
                                  "lines_submitted": sum(self.state.batch_lines.values()),
                                  "most_submissions_of_one_custom_id": max(self.state.batch_lines.values(), default=0),
                                  "statuses": dict(Counter(b["status"] for b in self.state.batches.values()))})

    def routes(self) -> list[web.RouteDef]:
        return [web.post("/v1/files", self.upload), web.get("/v1/files/{file_id}/content", self.file_content),
                web.post("/v1/batches", self.create_batch), web.get("/v1/batches", self.list_batches),
                web.get("/v1/batches/{batch_id}", self.get_batch),
                web.post("/v1/batches/{batch_id}/cancel", self.cancel_batch),
                web.get("/batch_stats", self.batch_stats)]
