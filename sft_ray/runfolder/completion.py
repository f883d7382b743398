"""Completion: every expected sample (or, with rejection sampling, every prompt) counted by
its state in the run folder, and the verdict on it.

One count (:meth:`Completion.of`) decides the exit code, ``complete`` in stats.json and the
``_SUCCESS`` marker; one rule (:meth:`FailureBudget.exceeded`) decides both a session's early stop (on the counts of a
:class:`FailureTally`) and the exit code. :func:`prompt_draws` says where each prompt of a rejection-sampling run
stands, from the folder alone, so a rerun continues every prompt where it stopped and
draws no sample twice.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Iterable

import orjson

from sft_ray.runfolder.layout import Key
from sft_ray.runfolder.state import FolderState

EXIT_OK, EXIT_USAGE, EXIT_INPUT, EXIT_BUDGET, EXIT_PENDING = 0, 1, 2, 3, 4
EXIT_SPENT = 5  # a spending budget (budget.*) stopped the run; resumable with a raised budget


def sample_keys(ids: Iterable[str], num_repeats: int) -> Iterable[Key]:
    for rid in ids:
        for k in range(num_repeats):
            yield (rid, k)


def unexpected_keys(ids: set[str], done: Iterable[Key], per_prompt: int) -> set[Key]:
    """The done samples that are none of the run's: an id not in the input, or a sample index
    outside ``[0, per_prompt)`` (num_repeats, or rejection sampling's max_samples). No session
    writes one; a line some other process appended to a part file does (finalize never trains
    on it)."""
    return {(rid, k) for rid, k in done if rid not in ids or not 0 <= k < per_prompt}


@dataclass
class Completion:
    """Every expected sample counted by its state in the run folder (never by subtraction).

    ``pending``: samples without a result (neither a rollout nor a failure record): work
    a stopped or killed run left undone. A failed sample has a result; ``failed_final``
    of them failed in ``max_sample_attempts`` runs, the others a rerun tries again.
    """

    expected: int = 0
    done: int = 0
    failed: int = 0
    failed_final: int = 0
    pending: int = 0
    bad_lines: int = 0

    @classmethod
    def of(cls, ids: set[str], state: FolderState, num_repeats: int, rejection: tuple[int, int] | None = None,
           bad_lines: int = 0, draws: dict[str, "PromptDraws"] | None = None) -> "Completion":
        """Count the folder: per sample, or, with ``rejection`` = (target passing, max samples), per
        prompt (:func:`count_prompts`; ``draws``: :func:`prompt_draws` of ``state`` when the caller
        has it already)."""
        if rejection is not None:
            return count_prompts(ids, draws if draws is not None else prompt_draws(ids, state), *rejection,
                                 bad_lines=bad_lines)
        c = cls(bad_lines=bad_lines)
        for key in sample_keys(ids, num_repeats):
            c.expected += 1
            if key in state.done:
                c.done += 1
            elif key in state.failed_sessions:
                c.failed += 1
                c.failed_final += state.failed_sessions[key] >= state.max_attempts
            else:
                c.pending += 1
        return c

    def verdict(self, budget: "FailureBudget") -> tuple[int, str | None]:
        """(exit code, reason when not 0): the one rule for the exit code, ``complete`` and ``_SUCCESS``."""
        if self.pending:
            return EXIT_PENDING, (f"INCOMPLETE: {self.pending}/{self.expected} samples pending (not generated yet); "
                                  "rerun the same command to finish")
        if budget.exceeded(self.done, self.failed, final=True):
            return EXIT_BUDGET, (f"FAILED: {self.failed}/{self.expected} samples failed, over the budget "
                                 f"max_error_fraction={budget.max_fraction}; rerun the same command to retry them")
        return EXIT_OK, None

    @property
    def todo(self) -> int:
        """What a session sends: samples without a result, and failures with attempts left."""
        return self.pending + self.failed - self.failed_final

    def as_stats(self, budget: "FailureBudget") -> dict[str, Any]:
        return {**asdict(self), "complete": self.verdict(budget)[0] == EXIT_OK}


@dataclass
class FailureBudget:
    """The failure budget: the share of failed samples among those with a result, over the
    whole run folder. The same rule stops a session early (once ``min_rows`` samples have a
    result) and sets the exit code at the end."""

    max_fraction: float
    min_rows: int

    def exceeded(self, done: int, failed: int, final: bool = False) -> bool:
        n = done + failed
        if not n or (not final and n < self.min_rows):
            return False
        return failed / n > self.max_fraction


class FailureTally:
    """The counts a session's early stop reads, kept as the session writes (:meth:`add`), the one
    rule for the online stream and the Batch API's loop (:meth:`exceeded`).

    ``done``: samples with a rollout; ``final``: failed samples this session never writes again;
    ``failed``: failed samples it may (a sample that fails again counts once, one that succeeds
    later leaves them). The online stream starts from the folder's final failures (the others are
    sent again, and count once their new result is written); the Batch API's loop, which sends a
    failure again within the session, starts from every failure record's key."""

    def __init__(self, budget: FailureBudget, done: int, final: int = 0, failed: Iterable[Key] = ()) -> None:
        self.budget, self.done, self.final = budget, done, final
        self.failed: set[Key] = set(failed)

    def add(self, keys: list[Key], failed: list[bool]) -> None:
        for key, f in zip(keys, failed):
            if f:
                self.failed.add(key)
            else:
                self.failed.discard(key)
                self.done += 1

    def exceeded(self) -> bool:
        return self.budget.exceeded(self.done, self.final + len(self.failed))


@dataclass
class PromptDraws:
    """Where one prompt stands: its passing and drawn samples, the next unused sample index,
    and the failed samples a rerun tries again."""

    passing: int = 0
    done: int = 0  # samples with a rollout
    failed_final: int = 0  # samples whose failure is final
    next: int = 0  # first sample index never used
    retry: list[int] = field(default_factory=list)

    @property
    def drawn(self) -> int:
        return self.done + self.failed_final

    def finished(self, target: int, max_samples: int) -> bool:
        return self.passing >= target or self.drawn >= max_samples

    def to_json(self) -> str:
        return orjson.dumps({"passing": self.passing, "done": self.done, "failed_final": self.failed_final,
                             "next": self.next, "retry": self.retry}).decode()

    @classmethod
    def from_json(cls, text: str | None) -> "PromptDraws":
        return cls(**orjson.loads(text)) if text else cls()


def prompt_draws(ids: set[str], state: FolderState) -> dict[str, PromptDraws]:
    """Each prompt of ``ids`` that has a sample in the run folder, and where it stands."""
    out: dict[str, PromptDraws] = {}

    def get(rid: str) -> PromptDraws | None:
        if rid not in ids:
            return None
        d = out.get(rid)
        if d is None:
            d = out[rid] = PromptDraws(passing=state.passing.get(rid, 0))
        return d

    for rid, k in state.done:
        d = get(rid)
        if d is not None:
            d.done += 1
            d.next = max(d.next, k + 1)
    for (rid, k), runs in state.failed_sessions.items():
        d = get(rid)
        if d is not None:
            d.next = max(d.next, k + 1)
            if runs >= state.max_attempts:
                d.failed_final += 1
            else:
                d.retry.append(k)
    for d in out.values():
        d.retry.sort()
    return out


@dataclass
class DrawPlan:
    """What the read stage needs: which prompts to send, and where each started one stands."""

    started: dict[str, str]  # id -> PromptDraws JSON, for unfinished prompts that have samples
    finished: frozenset[str]

    @classmethod
    def make(cls, draws: dict[str, PromptDraws], target: int, max_samples: int) -> "DrawPlan":
        """From :func:`prompt_draws`."""
        finished = frozenset(r for r, d in draws.items() if d.finished(target, max_samples))
        started = {r: d.to_json() for r, d in draws.items() if r not in finished}
        return cls(started, finished)

    def open_prompts(self, ids: Iterable[str]) -> int:
        return sum(1 for r in ids if r not in self.finished)


def count_prompts(ids: Iterable[str], draws: dict[str, PromptDraws], target: int, max_samples: int,
                  bad_lines: int = 0) -> Completion:
    """The run's completion counted by prompt: ``pending`` is the prompts neither finished nor
    waiting on a failed sample's retry (work a stopped run left undone); ``failed`` the failed
    samples of unfinished prompts plus every final failure. A failure of a prompt that finished
    anyway is not needed and not counted. ``draws``: from :func:`prompt_draws`."""
    c = Completion(bad_lines=bad_lines)
    for rid in ids:
        d = draws.get(rid) or PromptDraws()
        c.done += d.done
        c.failed += d.failed_final
        c.failed_final += d.failed_final
        if not d.finished(target, max_samples):
            c.failed += len(d.retry)
            c.pending += not d.retry
    c.expected = c.done + c.failed + c.pending
    return c


