"""Completion counted from the folder's state: the exit code's one rule, the failure budget, and
where each prompt of a rejection-sampling run stands."""

from __future__ import annotations

from types import SimpleNamespace

from sft_ray.runfolder.completion import (
    EXIT_BUDGET,
    EXIT_OK,
    EXIT_PENDING,
    Completion,
    DrawPlan,
    FailureBudget,
    FailureTally,
    PromptDraws,
    count_prompts,
    prompt_draws,
    unexpected_keys,
)


def _state(done=(), failed_sessions=None, passing=None, max_attempts=3):
    """A FolderState's fields, without a folder (Completion reads only these)."""
    return SimpleNamespace(done=set(done), failed_sessions=dict(failed_sessions or {}), passing=dict(passing or {}),
                           max_attempts=max_attempts)


def test_each_expected_sample_is_counted_by_its_state():
    state = _state(done={("a", 0), ("a", 1), ("b", 0)}, failed_sessions={("b", 1): 3, ("c", 0): 1})
    c = Completion.of({"a", "b", "c"}, state, num_repeats=2, bad_lines=4)
    assert (c.expected, c.done, c.failed, c.failed_final, c.pending, c.bad_lines) == (6, 3, 2, 1, 1, 4)
    assert c.todo == 2  # the pending sample and c's failure with attempts left
    assert c.verdict(FailureBudget(1.0, 0)) == (EXIT_PENDING, "INCOMPLETE: 1/6 samples pending (not generated yet); "
                                                       "rerun the same command to finish")
    assert c.as_stats(FailureBudget(1.0, 0))["complete"] is False


def test_the_failure_budget_decides_the_exit_code_and_the_early_stop():
    state = _state(done={("a", 0), ("b", 0), ("c", 0)}, failed_sessions={("d", 0): 3})
    c = Completion.of({"a", "b", "c", "d"}, state, num_repeats=1)
    assert c.verdict(FailureBudget(0.25, 100)) == (EXIT_OK, None)  # 1/4 is not over 0.25
    code, why = c.verdict(FailureBudget(0.2, 100))
    assert code == EXIT_BUDGET and why.startswith("FAILED: 1/4 samples failed, over the budget max_error_fraction=0.2")
    budget = FailureBudget(0.1, min_rows=10)
    assert not budget.exceeded(done=2, failed=3)  # early in a session: too few results to judge
    assert budget.exceeded(done=2, failed=3, final=True)  # at the end, every result counts
    assert budget.exceeded(done=5, failed=5) and not budget.exceeded(0, 0, final=True)


def test_a_failure_tally_counts_each_failed_sample_once_until_it_is_done():
    budget = FailureBudget(0.25, min_rows=4)
    # The online stream: the folder's final failures, then what the session writes.
    online = FailureTally(budget, done=3, final=1)
    assert not online.exceeded()  # 1/4 is not over 0.25
    online.add([("a", 0), ("b", 0)], [False, True])
    assert (online.done, online.final + len(online.failed)) == (4, 2) and online.exceeded()  # 2/6
    # The Batch API's loop: every failure record counts, a sample sent again that fails counts once,
    # one that succeeds leaves the failures.
    batch = FailureTally(budget, done=5, failed=[("x", 0), ("y", 0)])
    assert batch.exceeded()  # 2/7
    batch.add([("x", 0), ("x", 0)], [True, True])
    assert len(batch.failed) == 2 and batch.exceeded()
    batch.add([("x", 0)], [False])
    assert (batch.done, len(batch.failed)) == (6, 1) and not batch.exceeded()  # 1/7


def test_unexpected_keys_are_strays_of_no_prompt_or_index():
    done = [("a", 0), ("a", 2), ("z", 0), ("b", -1)]
    assert unexpected_keys({"a", "b"}, done, per_prompt=2) == {("a", 2), ("z", 0), ("b", -1)}


def test_prompt_draws_continue_each_prompt_where_it_stopped():
    state = _state(done={("p", 0), ("p", 1), ("q", 0), ("gone", 0)},
                   failed_sessions={("p", 4): 1, ("p", 2): 1, ("q", 1): 3}, passing={"p": 1, "q": 1})
    draws = prompt_draws({"p", "q", "r"}, state)
    assert set(draws) == {"p", "q"}  # r has no sample yet; "gone" is not in the input
    assert draws["p"] == PromptDraws(passing=1, done=2, failed_final=0, next=5, retry=[2, 4])
    assert draws["q"] == PromptDraws(passing=1, done=1, failed_final=1, next=2, retry=[])
    assert PromptDraws.from_json(draws["p"].to_json()) == draws["p"] and PromptDraws.from_json(None) == PromptDraws()
    # target 1 passing, at most 3 drawn: q has passed; p has passed too
    plan = DrawPlan.make(draws, target=1, max_samples=3)
    assert plan.finished == {"p", "q"} and plan.open_prompts(["p", "q", "r"]) == 1
    plan = DrawPlan.make(draws, target=2, max_samples=3)
    assert plan.finished == frozenset() and set(plan.started) == {"p", "q"}


def test_count_prompts_counts_pending_prompts_and_needed_failures():
    draws = {"p": PromptDraws(passing=0, done=1, next=3, retry=[1, 2]),  # waits on two retries
             "q": PromptDraws(passing=2, done=2, failed_final=1, next=4, retry=[3]),  # finished: retry not needed
             "s": PromptDraws(passing=0, done=1, next=1)}  # unfinished, nothing to retry: pending
    c = count_prompts(["p", "q", "r", "s"], draws, target=2, max_samples=5)
    assert (c.done, c.failed, c.failed_final, c.pending) == (4, 3, 1, 2)  # r and s are pending
    assert c.expected == c.done + c.failed + c.pending
