"""Rejection sampling (`rejection.target_passing`, `rejection.max_samples`): real Ray, the mock
server over sockets, and a verifier whose verdict per (prompt, sample) the test decides."""

from __future__ import annotations

import json
from pathlib import Path

from sft_ray.job import EXIT_OK, run
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
