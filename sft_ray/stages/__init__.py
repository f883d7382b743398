"""The Ray Data stages of phase 1, one per module: read, generate, score.

Each module declares a :class:`Stage`: what it runs (a callable class built once per
actor, or, for ``read``, the function that makes the dataset), the columns it reads and
writes, and its wiring: the Ray Data arguments (constructor arguments, actor pool,
resources) computed from the run config, the concurrency plan and whatever else the
orchestrator hands it as keyword arguments, as ``ray.data.llm``'s processor stages do. A
stage never imports the orchestrator (:mod:`sft_ray.job`), which chains
``read.STAGE``, ``generate.STAGE`` and ``score.STAGE``; adding a stage (a dedup, a second
judge) is a new module plus one line there.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    from sft_ray.config import RunConfig


@dataclass(frozen=True)
class Stage:
    name: str
    fn: Callable[..., Any]  # a callable class (built once per actor, called once per batch), or a source's function
    reads: tuple[str, ...]  # columns it needs in each batch (none: a source, which makes the dataset)
    writes: tuple[str, ...]  # columns its batches have (what the next stage reads)
    wiring: Callable[..., dict[str, Any]]  # (cfg, plan, **inputs) -> keyword arguments of map_batches (or of fn)

    @property
    def source(self) -> bool:
        return not self.reads

    def apply(self, ds: Any, cfg: "RunConfig", plan: dict[str, Any], **inputs: Any) -> Any:
        """The dataset with this stage added (a source ignores ``ds`` and makes the dataset)."""
        kwargs = self.wiring(cfg, plan, **inputs)
        return self.fn(**kwargs) if self.source else ds.map_batches(self.fn, **kwargs)


def check_chain(stages: list[Stage]) -> None:
    """Each stage must find the columns it reads among those the stage before it writes."""
    have: set[str] = set()
    for stage in stages:
        missing = set(stage.reads) - have
        if missing:
            raise ValueError(f"stage {stage.name!r} reads {sorted(missing)}, which no earlier stage writes")
        have = set(stage.writes)


def actor_range(value: int | tuple[int, int]) -> tuple[int, int]:
    """An actor pool's (min, max) size from a config value: a fixed size or a range."""
    return (value, value) if isinstance(value, int) else (int(value[0]), int(value[1]))
