"""The batch loop's samples: the input rows read on the driver, the queue of samples to send, and a
sample's request and rollout, built as the online path builds them."""

from __future__ import annotations

from typing import Any

import orjson

from sft_ray import errors
from sft_ray.backends.base import GenerationRequest, GenerationResult, error_result
from sft_ray.config import RunConfig
from sft_ray.rollout import Prepared, build_rollout, prepare, stamp_source
from sft_ray.rows import InputError
from sft_ray.runfolder.layout import Key
from sft_ray.runfolder.state import FolderState
from sft_ray.stages.read import InputPlan, read_samples


class Samples:
    """The rows of the samples this session may send (id -> input line, ``file:line``) and
    ``pending``: the samples to send next, in input order."""

    def __init__(self, cfg: RunConfig, model_name: str | None) -> None:
        self.cfg, self.model_name = cfg, model_name
        self.sampling = cfg.responses_create_params.model_dump()
        self.rows: dict[str, tuple[str, str]] = {}
        self.pending: dict[Key, None] = {}

    def load(self, inputs: InputPlan, state: FolderState, everything: bool) -> None:
        """The input rows of every sample not done (their text and source), read on the driver;
        a bad line stops the run as it does online. ``everything`` (rejection sampling): every row,
        none pending (a prompt whose first sample is done may still need more)."""
        skip = state.skip() if not everything else set()
        for f in inputs.used():
            for cols in read_samples(f.path, self.cfg.num_repeats, self.cfg.read.skip_bad_lines, skip, f.rows,
                                     qualifier=f.qualifier, renamed=f.renamed, rename=self.cfg.read.rename or None):
                for rid, k, text, source, bad in zip(cols["id"], cols["sample_index"], cols["row"], cols["source"],
                                                     cols["bad"]):
                    if bad is not None:
                        src, _, reason = bad.partition(": ")
                        raise InputError(src, reason)
                    self.rows[rid] = (text, source)
                    if not everything:
                        self.pending[(rid, int(k))] = None

    def take(self, n: int) -> list[Key]:
        """Up to ``n`` pending samples, off the queue."""
        keys = list(self.pending)[:n]
        for key in keys:
            del self.pending[key]
        return keys

    def prompt(self, key: Key) -> tuple[dict[str, Any], Prepared, str]:
        """A sample's input row, its prompt, tools and sampling parameters, and its source."""
        rid, k = key
        text, source = self.rows[rid]
        row = orjson.loads(text)
        return row, prepare(row, rid, k, source, self.sampling, self.cfg.model.omit_params), source

    def request(self, key: Key) -> GenerationRequest | GenerationResult:
        """A sample's request, or the failure that stops it before any request (a row with tools)."""
        _, sample, _ = self.prompt(key)
        if sample.tools.get("tools"):
            return error_result(errors.ENVIRONMENT_ERROR, "the row offers tools but no environment runs them "
                                "(agent episodes run online: set model.batch.enabled=false)")
        return sample.request(*key)

    def rollout(self, key: Key, result: GenerationResult) -> dict[str, Any]:
        rid, k = key
        row, sample, source = self.prompt(key)
        ok = result.error is None
        out = build_rollout(row, rid, k, sample.prompt if ok else [], sample.params if ok else {}, self.model_name,
                            result)
        stamp_source(out, source)
        return out
