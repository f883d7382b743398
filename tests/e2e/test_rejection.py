"""Rejection sampling (`rejection.target_passing`, `rejection.max_samples`): real Ray, the mock
server over sockets, and a verifier whose verdict per (prompt, sample) the test decides."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from sft_ray.config import ConfigError
from sft_ray.configload import load_config
from sft_ray.job import EXIT_OK, run
from sft_ray.rejection import PromptDraws, draw_prompt
from tests.conftest import make_config, read_rows, write_jsonl

# Which sample indices pass, per prompt text (the mock echoes the prompt).
VERIFIER = '''
PASS = {"always": set(range(99)), "always-2": set(range(99)), "late": {3, 4, 5, 6}, "never": set(), "flaky [[fail:500:1]]": set(range(99))}

def score(row, response, rollout):
    return float(rollout["sample_index"] in PASS[response])
'''


def _setup(tmp_path: Path, server, prompts: list[str], *overrides: str):
    (tmp_path / "verif.py").write_text(VERIFIER)
    inp = write_jsonl(tmp_path / "in.jsonl", [{"id": p.split()[0], "prompt": p} for p in prompts])
    return make_config(tmp_path, server, inp, "verifier.type=python", f"verifier.function={tmp_path}/verif.py:score",
                       "filter.min_reward=1.0", *overrides)


def _samples(run_dir: Path) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    for r in read_rows(run_dir / "rollouts"):
        out.setdefault(r["id"], []).append(r["sample_index"])
    return {k: sorted(v) for k, v in out.items()}


def test_samples_until_enough_pass_and_reports_what_it_saved(tmp_path, ray_cluster, mock_server):
    cfg = _setup(tmp_path, mock_server, ["always", "late", "never"],
                 "rejection.target_passing=2", "rejection.max_samples=5")
    lines: list[str] = []
    assert run(cfg, say=lines.append) == EXIT_OK
    run_dir = tmp_path / "run"
    samples = _samples(run_dir)
    # always: 2 drawn together, both pass. late: 0,1 fail, then 2,3 (3 passes), then 4 passes.
    # never: all 5 and nothing passes.
    assert samples == {"always": [0, 1], "late": [0, 1, 2, 3, 4], "never": [0, 1, 2, 3, 4]}
    assert mock_server.state.requests == 12  # nothing drawn beyond what was needed
    stats = json.loads((run_dir / "stats.json").read_text())
    rej = stats["rejection"]
    assert rej["reached_target"] == 2 and rej["never_passed"] == 1 and rej["unfinished"] == 0
    assert rej["samples_drawn"] == 12 and rej["samples_at_max"] == 15 and rej["samples_saved"] == 3
    never = [json.loads(line) for line in (run_dir / "never_passed.jsonl").read_text().splitlines()]
    assert [n["id"] for n in never] == ["never"] and never[0]["samples"] == 5 and never[0]["best_reward"] == 0.0
    assert never[0]["source"].endswith("in.jsonl:3")
    assert stats["complete"] and stats["pending"] == 0
    train = read_rows(run_dir / "train")
    assert len(train) == 4  # the passing samples of always and late
    report = "\n".join(lines)
    assert "rejection sampling: 2/3 prompts reached 2 passing" in report and "3 saved" in report


def test_a_rerun_with_more_samples_continues_each_prompt_where_it_stopped(tmp_path, ray_cluster, mock_server):
    cfg = _setup(tmp_path, mock_server, ["always", "late", "never"],
                 "rejection.target_passing=1", "rejection.max_samples=3")
    assert run(cfg, say=lambda s: None) == EXIT_OK
    assert _samples(tmp_path / "run") == {"always": [0], "late": [0, 1, 2], "never": [0, 1, 2]}
    first = mock_server.state.requests
    # A raised max_samples continues the prompts that used all theirs without passing; no sample twice.
    cfg = _setup(tmp_path, mock_server, ["always", "late", "never"],
                 "rejection.target_passing=1", "rejection.max_samples=6")
    lines: list[str] = []
    assert run(cfg, say=lines.append) == EXIT_OK
    assert "2 prompt(s) to sample" in "\n".join(lines)
    samples = _samples(tmp_path / "run")
    assert samples == {"always": [0], "late": [0, 1, 2, 3], "never": [0, 1, 2, 3, 4, 5]}
    assert mock_server.state.requests - first == 1 + 3
    rows = read_rows(tmp_path / "run" / "rollouts")
    assert len(rows) == len({(r["id"], r["sample_index"]) for r in rows})


def test_a_failed_sample_stops_its_prompt_and_the_rerun_retries_it_first(tmp_path, ray_cluster, mock_server):
    # max_retries=0: the mock's first answer to the flaky prompt (a 500) fails the sample.
    cfg = _setup(tmp_path, mock_server, ["always", "flaky [[fail:500:1]]"], "model.max_retries=0",
                 "rejection.target_passing=2", "rejection.max_samples=4", "max_error_fraction=1.0")
    code = run(cfg, say=lambda s: None)
    assert code == EXIT_OK  # within the failure budget; the flaky prompt waits on its retry
    failed = read_rows(tmp_path / "run" / "failed")
    assert [(r["id"], r["sample_index"]) for r in failed if r["id"] == "flaky"] and \
        all(r["reward"] is None for r in failed)
    before = _samples(tmp_path / "run").get("flaky", [])
    assert len(before) < 2  # the prompt stopped at its failure
    assert run(cfg, say=lambda s: None) == EXIT_OK
    samples = _samples(tmp_path / "run")
    assert len(samples["flaky"]) == 2 and samples["always"] == [0, 1]
    assert not read_rows(tmp_path / "run" / "failed")  # the retried sample is done now


def test_config_rules(tmp_path):
    base = [f"input={tmp_path}/in.jsonl", f"output={tmp_path}/run", "model.name=m"]
    with pytest.raises(ConfigError, match="go together"):
        load_config(None, base + ["rejection.target_passing=2"])
    with pytest.raises(ConfigError, match="at least rejection.target_passing"):
        load_config(None, base + ["rejection.target_passing=4", "rejection.max_samples=2", "filter.min_reward=1"])
    with pytest.raises(ConfigError, match="set filter.min_reward"):
        load_config(None, base + ["rejection.target_passing=1", "rejection.max_samples=2"])
    with pytest.raises(ConfigError, match="leave num_repeats at 1"):
        load_config(None, base + ["rejection.target_passing=1", "rejection.max_samples=2", "filter.min_reward=1",
                                  "num_repeats=4"])
    with pytest.raises(ConfigError, match="needs a verifier"):
        load_config(None, base + ["rejection.target_passing=1", "rejection.max_samples=2", "filter.min_reward=1",
                                  "verifier.type=none"])
    with pytest.raises(ConfigError, match="use a hosted judge"):
        load_config(None, base + ["rejection.target_passing=1", "rejection.max_samples=2", "filter.min_reward=1",
                                  "verifier.type=judge", "verifier.judge.model.backend=vllm"])
    load_config(None, base + ["rejection.target_passing=1", "rejection.max_samples=2", "filter.min_reward=1"])


def _draw(passes, draws: PromptDraws, target: int, max_samples: int, fail: set[int] = frozenset()):
    in_flight, most, launched = 0, 0, []

    async def sample(k: int):
        nonlocal in_flight, most
        launched.append(k)
        in_flight += 1
        most = max(most, in_flight)
        await asyncio.sleep(0.001 * (k % 3))
        in_flight -= 1
        if k in fail:
            return {"error": {"type": "server_error"}, "reward": None}
        return {"error": None, "reward": float(passes(k))}

    got = asyncio.run(draw_prompt(sample, draws, target, max_samples, 1.0))
    assert sorted(launched) == sorted(k for k, _ in got)
    return launched, most


def test_draw_prompt_bounds():
    # Everything passes: exactly the target, all in flight together.
    ks, most = _draw(lambda k: True, PromptDraws(), 3, 10)
    assert sorted(ks) == [0, 1, 2] and most == 3
    # Nothing passes: exactly max_samples, never more in flight than still needed.
    ks, most = _draw(lambda k: False, PromptDraws(), 3, 7)
    assert sorted(ks) == list(range(7)) and most <= 3
    # A prompt that stood at 1 passing of 2 drawn, with sample 1 to retry: retried first, then new indices.
    ks, _ = _draw(lambda k: k in (1, 4), PromptDraws(passing=1, done=2, next=3, retry=[1]), 3, 10)
    assert ks[0] == 1 and sorted(ks) == [1, 3, 4]
    # A failure stops the prompt (what was in flight still comes back).
    ks, _ = _draw(lambda k: False, PromptDraws(), 2, 10, fail={0})
    assert 0 in ks and len(ks) <= 2


def test_dry_run_scales_the_samples_per_prompt_the_pilot_took(tmp_path, ray_cluster, mock_server):
    from sft_ray.dryrun import dry_run

    cfg = _setup(tmp_path, mock_server, ["always", "late", "never", "always-2"],
                 "rejection.target_passing=2", "rejection.max_samples=5")
    lines: list[str] = []
    plan = dry_run(cfg, 4, lines.append)  # a pilot of 2 prompts: always (2 samples) and late (5)
    assert plan["pilot_samples"] == 7 and plan["samples_total"] == 14
    assert "3.50 samples per prompt" in "\n".join(lines)
    assert not (tmp_path / "run").exists()


def test_answers_a_killed_run_journaled_count_as_drawn(tmp_path, ray_cluster, mock_server):
    from sft_ray.runfolder.journal import JournalSpec

    cfg = _setup(tmp_path, mock_server, ["late"], "rejection.target_passing=1", "rejection.max_samples=3")
    assert run(cfg, say=lambda s: None) == EXIT_OK
    run_dir = tmp_path / "run"
    # As if killed after sample 2's answer came back but before it was written: only in the journal.
    journal = JournalSpec(str(run_dir)).open()
    for part in (run_dir / "rollouts").glob("*.jsonl"):
        kept = []
        for line in part.read_text().splitlines():
            row = json.loads(line)
            if row["sample_index"] == 2:
                row["reward"] = None
                row.pop("metrics", None)
                journal.append(json.dumps(row).encode())
            else:
                kept.append(line)
        part.write_text("".join(k + "\n" for k in kept))
    journal.close()
    before = mock_server.state.requests
    cfg = _setup(tmp_path, mock_server, ["late"], "rejection.target_passing=1", "rejection.max_samples=5")
    assert run(cfg, say=lambda s: None) == EXIT_OK
    assert _samples(run_dir) == {"late": [0, 1, 2, 3]}
    assert mock_server.state.requests - before == 1  # sample 2 came from the journal, scored; only 3 was drawn


def test_report_gives_sequential_statistics_not_biased_pass_at_k(tmp_path):
    """Prompts stop drawing once they pass: pass@k over what was drawn is biased (here @8 is 0 while @1
    is 0.46). The report gives the samples to the first pass and the passing share per prompt instead."""
    from sft_ray.finalize.passes import finalize
    from sft_ray.finalize.stats import format_report

    verdicts = {"a": [0, 0, 1], "b": [1], "c": [0] * 8, "d": [0, 1]}  # by sample index
    rows = [{"id": rid, "sample_index": k, "messages": [{"role": "user", "content": rid},
                                                        {"role": "assistant", "content": f"{rid}{k}"}],
             "response": f"{rid}{k}", "reward": float(v), "error": None, "finish_reason": "stop",
             "usage": {"input_tokens": 1, "output_tokens": 1}}
            for rid, vs in verdicts.items() for k, v in enumerate(vs)]
    (tmp_path / "rollouts").mkdir()
    # written out of draw order (as concurrent draws and reruns write them)
    (tmp_path / "rollouts" / "part-000-00000.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[::-1]))
    stats = finalize(str(tmp_path), {"min_reward": 1.0}, 0, {}, write=False,
                     rejection={"target_passing": 1, "max_samples": 8})
    assert "pass_at_k" not in stats["prompts"] and "all_pass" not in stats["prompts"]
    rej = stats["rejection"]
    assert rej["samples_to_first_pass"] == {"prompts": 3, "mean": 2.0, "histogram": {"1": 1, "2": 1, "3": 1}}
    assert rej["passing_share_per_prompt"] == pytest.approx((1 / 3 + 1 + 0 + 1 / 2) / 4, abs=1e-4)
    report = format_report(stats)
    assert "pass@k:" not in report and "samples to the first pass: mean 2.00 over 3 prompt(s) (1: 1, 2: 1, 3: 1)" \
        in report and "passing share per prompt: mean 0.458" in report

    # The same samples drawn with a fixed num_repeats (no rejection section): pass@k is unbiased there.
    fixed = finalize(str(tmp_path), {"min_reward": 1.0}, 0, {}, write=False)
    assert "pass_at_k" in fixed["prompts"] and "rejection" not in fixed and "pass@k:" in format_report(fixed)
