"""Phase 1 through a provider's Batch API (``model.batch.enabled``): the driver uploads the samples
to generate as JSONL files, creates batches, polls them and writes what comes back.

No Ray actor takes part: the driver builds each request as an online request would, the provider's
adapter makes it a line (:class:`~sft_ray.backends.batchapi.BatchProvider`; OpenAI's:
:class:`~sft_ray.backends.openai_batch.OpenAIBatchProvider`), and the driver cuts the samples into files within
``model.batch.max_requests`` / ``max_bytes``, keeps up to ``model.batch.max_in_flight`` batches
submitted, and polls them (from a tenth of ``poll_interval_s``, backing off by half again while
nothing changes). A finished batch's answers become rollouts with the same builder, scorer
(:class:`~sft_ray.stages.score.ScoreStage`, or the score actors for a vLLM judge) and writers as
online answers, so ``rollouts/``, ``train/``, stats.json and the report have the same shape.

Durable: every upload and batch is in ``batches.jsonl`` (:mod:`sft_ray.runfolder.batches`) before
the driver submits or waits on it; a rerun of the same command polls the same batches and sends only
samples that are in no open batch. A line that ran and failed is a failure record with its error
class, sent again in a later batch while it has attempts left (``max_sample_attempts``); a line an
expired or cancelled batch never ran is sent again without counting an attempt; every answer a
batch finished is kept. ``no_wait``: submit, collect what already finished, and return.

Agent episodes (an environment is configured) go in rounds too, one model turn per round
(:class:`sft_ray.batch.rounds.Episodes`); they live in the driver's memory between rounds, so a rerun
abandons the batches a killed run left open and starts those episodes again.

With rejection sampling the batches go in rounds: each round sends, for every prompt that is not
finished and has no sample in an open batch, as many new samples as it still needs to reach
``rejection.target_passing`` (at most ``rejection.max_samples`` in all).

The parts: :mod:`~sft_ray.batch.samples` (the input rows, what to send next, a sample's request and
rollout), :mod:`~sft_ray.batch.submit` (files cut to the limits, uploaded, created, recorded; the
spending budget), :mod:`~sft_ray.batch.collect` (polling, reading an ended batch's results, writing
them), :mod:`~sft_ray.batch.rounds` (rejection sampling's rounds, agent episodes' turns) and
:mod:`~sft_ray.batch.phase` (the loop that drives them).
"""

from sft_ray.batch.phase import batch_generate

__all__ = ["batch_generate"]