"""The Batch API against the mock server over real sockets: the mock's files and batches endpoints."""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from pathlib import Path

from sft_ray.backends.base import Secret
from sft_ray.backends.openai_batch import BatchClient, custom_id, parse_custom_id, parse_line, request_line
from sft_ray.configload import load_config
from sft_ray.devserver import MockConfig, MockServer
from tests.conftest import read_rows, write_jsonl

ROOT = Path(__file__).resolve().parent.parent


def _rows(n: int) -> list[dict]:
    return [{"id": f"r{i}", "prompt": f"answer {i}", "expected_answer": f"answer {i}"} for i in range(n)]


def _overrides(tmp_path: Path, server: MockServer, inp: Path, *extra: str) -> list[str]:
    return [f"input={inp}", f"output={tmp_path / 'run'}", "model.name=mock", f"model.base_url={server.url}",
            "model.timeout_s=5", "model.base_retry_wait_s=0.01", "model.max_retry_wait_s=0.2",
            "model.batch.enabled=true", "model.batch.poll_interval_s=0.1", "verifier.type=exact_match",
            "responses_create_params.max_output_tokens=64", *extra]


def _config(tmp_path: Path, server: MockServer, rows: list, *extra: str):
    inp = write_jsonl(tmp_path / "in.jsonl", rows)
    return load_config(None, _overrides(tmp_path, server, inp, *extra))


def _keys(run_dir: Path) -> Counter:
    return Counter((r["id"], r["sample_index"]) for r in read_rows(run_dir / "rollouts"))


def _events(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "batches.jsonl").read_text().splitlines()]


# -- the mock's endpoints -------------------------------------------------------------------


def test_custom_id_round_trips_any_id():
    for rid in ["r1", "3:7", "a\nb", "ü 🙂", ":", "", "x" * 500, "0:0:0"]:
        for k in (0, 7, 123456):
            assert parse_custom_id(custom_id(rid, k)) == (rid, k)
    for foreign in [None, 3, "abc", ":x", "-1:x", "1e3:x", "12345678901:x"]:
        assert parse_custom_id(foreign) is None


def test_mock_serves_files_and_batches_with_line_errors_and_expiry():
    async def go(server: MockServer) -> None:
        model = {"base_url": server.url, "timeout_s": 5, "connect_timeout_s": 5, "max_retries": 0,
                 "base_retry_wait_s": 0.01, "max_retry_wait_s": 0.1, "api_key": Secret("sk-test")}
        async with BatchClient(model) as client:
            prompts = ["hello", "[[batch_error:1]] flaky", "[[fail:500:1]] boom", "[[status:400]] long"]
            lines = [request_line(custom_id(f"p{i}", 0), "/v1/chat/completions",
                                  json.dumps({"model": "m", "messages": [{"role": "user", "content": p}]}).encode())
                     for i, p in enumerate(prompts)]
            fid = await client.upload(b"\n".join(lines) + b"\n", "in.jsonl")
            batch = await client.create(fid, "/v1/chat/completions", "24h", {})
            assert batch["status"] == "validating"
            assert (await client.find(fid))["id"] == batch["id"]
            assert await client.find("file-nope") is None
            while batch["status"] not in ("completed", "failed", "expired"):
                await asyncio.sleep(0.02)
                batch = await client.get(batch["id"])
            assert batch["status"] == "completed"
            assert batch["request_counts"] == {"total": 4, "completed": 1, "failed": 3}
            out = [json.loads(x) for x in (await client.content(batch["output_file_id"])).splitlines()]
            err = [json.loads(x) for x in (await client.content(batch["error_file_id"])).splitlines()]
            results = {parse_custom_id(x["custom_id"]): parse_line(x, "chat") for x in out + err}
            assert results[("p0", 0)].error is None and results[("p0", 0)].text == "hello"
            assert results[("p1", 0)].error["type"] == "server_error"
            assert results[("p2", 0)].error["type"] == "server_error" and "HTTP 500" in results[("p2", 0)].error["message"]
            assert results[("p3", 0)].error["type"] == "context_length"
            # A second batch of the same file: the flaky lines now succeed; the first one expires.
            again = await client.create(fid, "/v1/chat/completions", "24h", {})
            while again["status"] not in ("completed", "failed", "expired"):
                await asyncio.sleep(0.02)
                again = await client.get(again["id"])
            assert again["request_counts"]["completed"] == 3
            # A file with a repeated custom_id fails validation.
            bad = await client.upload(lines[0] + b"\n" + lines[0] + b"\n", "dup.jsonl")
            failed = await client.create(bad, "/v1/chat/completions", "24h", {})
            assert failed["status"] == "failed" and "duplicate" in failed["errors"]["data"][0]["message"]
        assert server.state.uploads == 2 and server.state.batches_created == 3
        assert server.state.batch_lines[custom_id("p0", 0)] == 3

    with MockServer(MockConfig()) as server:
        asyncio.run(go(server))
    with MockServer(MockConfig(batch_expire=1, batch_expire_keep=0.5)) as server:
        async def expire() -> None:
            async with BatchClient({"base_url": server.url, "timeout_s": 5, "connect_timeout_s": 5}) as client:
                lines = [request_line(custom_id(f"p{i}", 0), "/v1/responses",
                                      json.dumps({"model": "m", "input": f"q{i}"}).encode()) for i in range(10)]
                batch = await client.create(await client.upload(b"\n".join(lines), "x.jsonl"), "/v1/responses",
                                            "24h", {})
                while batch["status"] not in ("completed", "failed", "expired"):
                    await asyncio.sleep(0.02)
                    batch = await client.get(batch["id"])
                assert batch["status"] == "expired" and batch["request_counts"]["completed"] == 5
                err = [json.loads(x) for x in (await client.content(batch["error_file_id"])).splitlines()]
                assert len(err) == 5 and all(parse_line(x, "responses") is None for x in err)  # never ran
        asyncio.run(expire())
