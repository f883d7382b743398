"""A provider's Batch API as the batch loop (:mod:`sft_ray.batch`) uses it: the interface each
provider's adapter implements (:class:`BatchProvider`), and the batch status it reports (:class:`BatchStatus`).

The loop, for each file of requests:

1. :meth:`BatchProvider.request_line` builds each sample's line from its :class:`GenerationRequest`
   (the same request an online call would send); the loop cuts lines into files within
   :attr:`BatchProvider.limits` (most requests, most bytes per file);
2. :meth:`BatchProvider.upload` stores the file (its reference is recorded in ``batches.jsonl``
   before any batch is made from it);
3. :meth:`BatchProvider.create` makes the batch (its id recorded before the loop waits on it); a rerun
   of a run killed between the two asks :meth:`BatchProvider.find` for a batch already made from that
   file before it creates one;
4. :meth:`BatchProvider.status` polls it until :attr:`BatchStatus.ended`;
5. :meth:`BatchProvider.result_lines` reads an ended batch's lines and :meth:`BatchProvider.parse_result`
   turns each into its sample key and result: an answer, a failure with its error class
   (:mod:`sft_ray.errors`), or None for a request the batch never ran (it expired or was cancelled
   first: sent again without counting an attempt).

An adapter raises :class:`BatchAPIError` when a call is refused (after the retries of
:mod:`sft_ray.backends.retry`), with every secret redacted. The sample key travels as the line's
``custom_id`` (:func:`~sft_ray.runfolder.layout.batch_custom_id`,
:func:`~sft_ray.runfolder.layout.anthropic_custom_id`), never as a position: a provider keeps no order.

A provider without files (the request lines go in the create call itself) sets
``stores_files = False``: :meth:`~BatchProvider.upload` then only names the file, and
:meth:`~BatchProvider.create` gets its bytes (rebuilt from the recorded keys on a rerun).

Adapters: :class:`sft_ray.backends.openai_batch.OpenAIBatchProvider` (OpenAI's ``/v1/files`` +
``/v1/batches``, and the OpenAI-compatible endpoints of other providers and ``sft-ray serve-mock``) and
:class:`sft_ray.backends.anthropic_batch.AnthropicBatchProvider` (Message Batches: no files).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

from sft_ray.backends.base import GenerationRequest, GenerationResult
from sft_ray.runfolder.layout import Key

# The statuses of an ended batch, in every adapter's words: its results can be read.
TERMINAL = ("completed", "failed", "expired", "cancelled")


class BatchAPIError(Exception):
    """The Batch API refused a call (after retries, for transient failures)."""


@dataclass(frozen=True)
class BatchLimits:
    """The most requests and bytes one batch file may hold."""

    max_requests: int
    max_bytes: int


@dataclass
class BatchStatus:
    """One batch as the provider reports it.

    ``status``: the provider's word for it (shown in the progress line), one of :data:`TERMINAL` once it
    ended; ``counts``: ``total``, ``completed``, ``failed`` as far as known; ``results``: what
    :meth:`BatchProvider.result_lines` reads (file ids, a results URL); ``refusal``: why the
    provider refused the whole batch (its status is then ``failed`` and it has no result lines)."""

    id: str
    status: str
    counts: dict[str, int] = field(default_factory=dict)
    results: list[str] = field(default_factory=list)
    refusal: str | None = None

    @property
    def ended(self) -> bool:
        return self.status in TERMINAL


class BatchProvider(ABC):
    """One provider's Batch API for one run (``async with`` opens and closes its connections).

    ``model_name``: the model the answers name; ``limits``: per-file limits (the config's
    ``model.batch.max_requests`` / ``max_bytes``, within the provider's own); ``stores_files``: see the
    module docstring."""

    model_name: str | None
    limits: BatchLimits
    stores_files: bool = True

    async def __aenter__(self) -> "BatchProvider":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        return None

    @abstractmethod
    def request_line(self, key: Key, request: GenerationRequest) -> bytes:
        """One line of a batch file: the request of sample ``key``, without its newline."""

    @abstractmethod
    async def upload(self, data: bytes, filename: str) -> str:
        """Store a batch file (newline-terminated lines); its reference."""

    @abstractmethod
    async def create(self, file_ref: str, data: bytes | None, n: int) -> BatchStatus:
        """Make a batch of an uploaded file (``data``: its bytes, given when the loop still has them;
        ``n``: the batch's number in ``batches.jsonl``, for the provider's metadata)."""

    @abstractmethod
    async def find(self, file_ref: str) -> BatchStatus | None:
        """The batch already made from ``file_ref``, or None (a run killed after create, before its record)."""

    @abstractmethod
    async def status(self, batch_id: str) -> BatchStatus:
        """Poll one batch."""

    @abstractmethod
    async def result_lines(self, batch: BatchStatus) -> list[bytes]:
        """An ended batch's result lines (answers and failures, any order)."""

    def expect(self, keys: list[Key]) -> None:
        """The samples of the batch whose result lines are parsed next (called before
        :meth:`parse_result`): a provider whose custom ids cannot hold every sample key (Anthropic's:
        ``^[a-zA-Z0-9_-]{1,64}$``) maps its ids back with them, after a restart too. Others need nothing."""
        return None

    @abstractmethod
    def parse_result(self, line: bytes) -> tuple[Key, GenerationResult | None] | None:
        """A result line's sample and result (None: never run), or None for a line that is not one of
        ours (torn, foreign, no custom id): its sample is sent again."""

    @abstractmethod
    async def cancel(self, batch_id: str) -> None:
        """Ask the provider to stop a batch (what it finished stays readable)."""
