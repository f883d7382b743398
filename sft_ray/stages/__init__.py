"""Pipeline stages, one per module: read, generate, score, finalize.

Each ``map_batches`` stage module declares a :class:`Stage`: the callable class, the
columns it reads and writes, and its Ray Data wiring (constructor arguments, actor
pool, resources) computed from the run config and the concurrency plan, as
``ray.data.llm``'s processor stages do. :data:`sft_ray.pipeline.STAGES` lists them in
order; adding a stage (a judge, a dedup) is a new module plus one entry there.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    from sft_ray.config import RunConfig


@dataclass(frozen=True)
class Stage:
    name: str
    fn: type  # a callable class: built once per actor, called once per batch
    reads: tuple[str, ...]  # columns it needs in each batch
    writes: tuple[str, ...]  # columns its batches have (what the next stage reads)
    wiring: Callable[["RunConfig", dict[str, Any]], dict[str, Any]]  # -> Dataset.map_batches keyword arguments

    def apply(self, ds: Any, cfg: "RunConfig", plan: dict[str, Any]) -> Any:
        return ds.map_batches(self.fn, **self.wiring(cfg, plan))


def check_chain(source_columns: tuple[str, ...], stages: list[Stage]) -> None:
    """Each stage must find the columns it reads among those the stage before it writes."""
    have = set(source_columns)
    for stage in stages:
        missing = set(stage.reads) - have
        if missing:
            raise ValueError(f"stage {stage.name!r} reads {sorted(missing)}, which no earlier stage writes")
        have = set(stage.writes)
