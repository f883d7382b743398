"""What submits: samples cut into files within the provider's limits, each file uploaded and its batch
created, both recorded in ``batches.jsonl`` first; the spending budget checked before each file."""

from __future__ import annotations

from sft_ray import errors
from sft_ray.backends.base import GenerationResult, error_result
from sft_ray.backends.batchapi import BatchProvider, BatchStatus
from sft_ray.batch.record import BatchRecorder, Spending
from sft_ray.batch.samples import Samples
from sft_ray.cost import estimate_tokens
from sft_ray.driver import Session
from sft_ray.runfolder.batches import BatchEntry, BatchLog
from sft_ray.runfolder.layout import Key
from sft_ray.runfolder.manifest import StopReason


class Submitter:
    """Sends files of requests to the provider, never more than ``max_open_batches`` open at once."""

    def __init__(self, provider: BatchProvider, log: BatchLog, samples: Samples, session: Session,
                 spending: Spending, recorder: BatchRecorder, max_open_batches: int, max_output_tokens: int | None) -> None:
        self.provider, self.log, self.samples, self.session = provider, log, samples, session
        self.spending, self.recorder = spending, recorder
        self.max_open_batches, self.max_output_tokens = max_open_batches, max_output_tokens

    async def send(self, keys: list[Key], data: bytes, filename: str) -> None:
        """Upload one file (recorded), then create its batch (recorded)."""
        file_id = await self.provider.upload(data, filename)
        entry = self.log.uploaded(file_id, keys, len(data), self.session.number)
        self.spending.sent(len(keys))
        await self.create(entry, data)

    async def create(self, entry: BatchEntry, data: bytes | None, existing: BatchStatus | None = None) -> None:
        batch = existing or await self.provider.create(entry.file_id, data, entry.n)
        self.log.submitted(entry, batch.id)

    async def submit_uploaded(self) -> None:
        """Create the batch of each upload that has none (a run killed between upload and submit):
        the same file, after checking the provider has no batch made from it already."""
        for entry in self.log.open():
            if entry.batch_id is None:
                found = await self.provider.find(entry.file_id)
                data = None
                if found is None and not self.provider.stores_files:  # the file's bytes, rebuilt from its keys
                    data = b"".join(self.line(k) + b"\n" for k in entry.keys)
                await self.create(entry, data, found)

    def line(self, key: Key) -> bytes:
        request = self.samples.request(key)
        assert not isinstance(request, GenerationResult), "a sample refused before its request was never in a file"
        return self.provider.request_line(key, request)

    def cut(self, keys: list[Key], lines: dict[Key, bytes]) -> list[list[Key]]:
        """Keys in files within the limits (a line over max_bytes goes alone: the provider's refusal
        fails that call)."""
        limits = self.provider.limits
        files: list[list[Key]] = [[]]
        size = 0
        for key in keys:
            n = len(lines[key]) + 1
            if files[-1] and (len(files[-1]) >= limits.max_requests or size + n > limits.max_bytes):
                files.append([])
                size = 0
            files[-1].append(key)
            size += n
        return [f for f in files if f]

    async def fill(self) -> None:
        """Cut pending samples into files within the limits and submit them, up to max_open_batches open;
        a file the spending budget refuses stops sending (the session's stop reason says so)."""
        limits, pending = self.provider.limits, self.samples.pending
        while pending and len(self.log.open()) < self.max_open_batches:
            keys, lines, size, refused = [], [], 0, []
            for key in list(pending):
                request = self.samples.request(key)
                line = request if isinstance(request, GenerationResult) else self.provider.request_line(key, request)
                if isinstance(line, GenerationResult):
                    refused.append((key, line))
                elif len(line) + 1 > limits.max_bytes:
                    refused.append((key, error_result(errors.CLIENT_ERROR, f"the request is {len(line)} bytes, "
                                                      f"over model.batch.max_bytes={limits.max_bytes}")))
                elif size + len(line) + 1 > limits.max_bytes:
                    break
                else:
                    keys.append(key)
                    lines.append(line)
                    size += len(line) + 1
                del pending[key]
                if len(keys) >= limits.max_requests:
                    break
            if refused:
                await self.recorder.write([(k, self.samples.rollout(k, r)) for k, r in refused])
            if not keys:
                continue
            est_in, est_out = estimate_tokens(size, self.max_output_tokens)  # as the online limiter estimates
            if self.spending.over(len(keys), est_in, len(keys) * est_out):
                # Nothing more is sent (open batches are still collected); a rerun with a raised budget sends it.
                self.session.record.stop(StopReason.SPENDING_BUDGET)
                pending.clear()
                return
            n = max(self.log.entries, default=-1) + 1
            await self.send(keys, b"".join(x + b"\n" for x in lines), f"sft-ray-batch-{n:05d}.jsonl")
