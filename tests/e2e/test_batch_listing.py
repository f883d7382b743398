"""BatchClient.pages: the one "list batches, page by page" loop of both Batch API adapters, over
HTTP to the mock server (OpenAI's ``after`` cursor from the last item, Anthropic's ``after_id``
from the page's ``last_id``)."""

from __future__ import annotations

import asyncio
import json

from sft_ray.backends.anthropic_batch import AnthropicBatchProvider
from sft_ray.backends.base import GenerationRequest, Secret
from sft_ray.backends.batchapi import BatchLimits
from sft_ray.backends.openai_batch import BatchClient, request_line
from sft_ray.devserver import MockConfig, MockServer
from sft_ray.runfolder.layout import batch_custom_id

RETRIES = {"timeout_s": 5.0, "connect_timeout_s": 5.0, "max_retries": 0, "base_retry_wait_s": 0.01,
           "max_retry_wait_s": 0.1, "api_key": Secret("sk-test")}


async def _listed(client: BatchClient, path: str, cursor: str, max_pages: int) -> list[list[str]]:
    return [[b["id"] for b in page] async for page in client.pages(path, cursor, max_pages, limit=2)]


def test_openai_listing_pages_on_the_last_items_id():
    async def go(server: MockServer) -> None:
        async with BatchClient({"base_url": server.url, **RETRIES}) as client:
            made = []
            for i in range(5):
                line = request_line(batch_custom_id((f"p{i}", 0)), "/v1/chat/completions",
                                    json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}]}).encode())
                fid = await client.upload(line + b"\n", f"in{i}.jsonl")
                made.append((await client.create(fid, "/v1/chat/completions", "24h", {}))["id"])
            newest = made[::-1]
            pages = await _listed(client, "/batches", "after", 10)
            assert pages == [newest[:2], newest[2:4], newest[4:]]  # 3 pages, no batch twice
            assert await _listed(client, "/batches", "after", 2) == [newest[:2], newest[2:4]]
            assert (await client.find(fid))["id"] == made[-1]

    with MockServer(MockConfig()) as server:
        asyncio.run(go(server))


def test_anthropic_listing_pages_on_last_id_and_find_takes_the_oldest_match():
    async def go(server: MockServer) -> None:
        model = {"backend": "anthropic", "name": "claude-sonnet-4-5", "base_url": server.url[: -len("/v1")],
                 "anthropic_version": "2023-06-01", "timeout_per_1k_output_tokens_s": 0.0, "prompt_caching": False,
                 "thinking": None, **RETRIES}
        async with AnthropicBatchProvider(model, BatchLimits(100, 10**6)) as p:
            request = GenerationRequest([{"role": "user", "content": "hi"}], {"max_output_tokens": 16})
            data = p.request_line(("r", 0), request) + b"\n"
            ref = await p.upload(data, "batch-000001.jsonl")
            made = [(await p.create(ref, data, i)).id for i in range(3)]
            newest = made[::-1]
            assert await _listed(p.client, "/v1/messages/batches", "after_id", 10) == [newest[:2], newest[2:]]
            found = await p.find(ref)
            assert found is not None and found.id == made[0]  # the oldest batch of that size since the upload

    with MockServer(MockConfig()) as server:
        asyncio.run(go(server))
