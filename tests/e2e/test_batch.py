"""The Batch API (model.batch.enabled) against the mock server over real sockets: the mock's files
and batches endpoints, single-turn runs in one batch and in several, a kill -9 while waiting and its
rerun (nothing submitted twice), per-line errors retried in a later batch, an expired batch's answers
kept, --no-wait, rejection sampling in rounds and the cost at the batch discount."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
from typer.testing import CliRunner

from sft_ray.backends.base import Secret
from sft_ray.backends.openai_batch import BatchClient, parse_line, request_line
from sft_ray.cli import app
from sft_ray.config import ConfigError
from sft_ray.configload import load_config
from sft_ray.devserver import MockConfig, MockServer
from sft_ray.job import EXIT_OK, EXIT_PENDING, run
from sft_ray.runfolder.batches import BatchLog
from sft_ray.runfolder.layout import batch_custom_id, parse_batch_custom_id
from tests.conftest import read_rows, write_jsonl

ROOT = Path(__file__).resolve().parents[2]


def _rows(n: int) -> list[dict]:
    return [{"id": f"r{i}", "prompt": f"answer {i}", "expected_answer": f"answer {i}"} for i in range(n)]


def _overrides(tmp_path: Path, server: MockServer, inp: Path, *extra: str) -> list[str]:
    return [f"input={inp}", f"output={tmp_path / 'run'}", "model.name=mock", f"model.base_url={server.url}",
            "model.timeout_s=5", "model.base_retry_wait_s=0.01", "model.max_retry_wait_s=0.2",
            "model.batch.enabled=true", "model.batch.poll_interval_s=0.1", "verifier.type=exact_match",
            "responses_create_params.max_output_tokens=64", *extra]


def _config(tmp_path: Path, server: MockServer, rows: list, *extra: str):
    inp = write_jsonl(tmp_path / "in.jsonl", rows)
    return load_config(None, _overrides(tmp_path, server, inp, *extra))


def _keys(run_dir: Path) -> Counter:
    return Counter((r["id"], r["sample_index"]) for r in read_rows(run_dir / "rollouts"))


def _events(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "batches.jsonl").read_text().splitlines()]


# -- the mock's endpoints -------------------------------------------------------------------


def test_mock_serves_files_and_batches_with_line_errors_and_expiry():
    async def go(server: MockServer) -> None:
        model = {"base_url": server.url, "timeout_s": 5, "connect_timeout_s": 5, "max_retries": 0,
                 "base_retry_wait_s": 0.01, "max_retry_wait_s": 0.1, "api_key": Secret("sk-test")}
        async with BatchClient(model) as client:
            prompts = ["hello", "[[batch_error:1]] flaky", "[[fail:500:1]] boom", "[[status:400]] long"]
            lines = [request_line(batch_custom_id((f"p{i}", 0)), "/v1/chat/completions",
                                  json.dumps({"model": "m", "messages": [{"role": "user", "content": p}]}).encode())
                     for i, p in enumerate(prompts)]
            fid = await client.upload(b"\n".join(lines) + b"\n", "in.jsonl")
            batch = await client.create(fid, "/v1/chat/completions", "24h", {})
            assert batch["status"] == "validating"
            assert (await client.find(fid))["id"] == batch["id"]
            assert await client.find("file-nope") is None
            while batch["status"] not in ("completed", "failed", "expired"):
                await asyncio.sleep(0.02)
                batch = await client.get(batch["id"])
            assert batch["status"] == "completed"
            assert batch["request_counts"] == {"total": 4, "completed": 1, "failed": 3}
            out = [json.loads(x) for x in (await client.content(batch["output_file_id"])).splitlines()]
            err = [json.loads(x) for x in (await client.content(batch["error_file_id"])).splitlines()]
            results = {parse_batch_custom_id(x["custom_id"]): parse_line(x, "chat") for x in out + err}
            assert results[("p0", 0)].error is None and results[("p0", 0)].text == "hello"
            assert results[("p1", 0)].error["type"] == "server_error"
            assert results[("p2", 0)].error["type"] == "server_error" and "HTTP 500" in results[("p2", 0)].error["message"]
            assert results[("p3", 0)].error["type"] == "context_length"
            # A second batch of the same file: the flaky lines now succeed; the first one expires.
            again = await client.create(fid, "/v1/chat/completions", "24h", {})
            while again["status"] not in ("completed", "failed", "expired"):
                await asyncio.sleep(0.02)
                again = await client.get(again["id"])
            assert again["request_counts"]["completed"] == 3
            # A file with a repeated custom_id fails validation.
            bad = await client.upload(lines[0] + b"\n" + lines[0] + b"\n", "dup.jsonl")
            failed = await client.create(bad, "/v1/chat/completions", "24h", {})
            assert failed["status"] == "failed" and "duplicate" in failed["errors"]["data"][0]["message"]
        assert server.state.uploads == 2 and server.state.batches_created == 3
        assert server.state.batch_lines[batch_custom_id(("p0", 0))] == 3

    with MockServer(MockConfig()) as server:
        asyncio.run(go(server))
    with MockServer(MockConfig(batch_expire=1, batch_expire_keep=0.5)) as server:
        async def expire() -> None:
            async with BatchClient({"base_url": server.url, "timeout_s": 5, "connect_timeout_s": 5}) as client:
                lines = [request_line(batch_custom_id((f"p{i}", 0)), "/v1/responses",
                                      json.dumps({"model": "m", "input": f"q{i}"}).encode()) for i in range(10)]
                batch = await client.create(await client.upload(b"\n".join(lines), "x.jsonl"), "/v1/responses",
                                            "24h", {})
                while batch["status"] not in ("completed", "failed", "expired"):
                    await asyncio.sleep(0.02)
                    batch = await client.get(batch["id"])
                assert batch["status"] == "expired" and batch["request_counts"]["completed"] == 5
                err = [json.loads(x) for x in (await client.content(batch["error_file_id"])).splitlines()]
                assert len(err) == 5 and all(parse_line(x, "responses") is None for x in err)  # never ran
        asyncio.run(expire())


# -- runs ---------------------------------------------------------------------------------


@pytest.mark.parametrize("max_requests,batches", [(50_000, 1), (2_500, 4)])
def test_ten_thousand_rows_in_batches_each_row_once_at_the_batch_price(tmp_path, max_requests, batches):
    with MockServer(MockConfig(batch_delay_s=0.05)) as server:
        cfg = _config(tmp_path, server, _rows(10_000), f"model.batch.max_requests={max_requests}",
                      "model.batch.max_in_flight=2", "pricing.input_per_mtok=2", "pricing.output_per_mtok=8")
        lines: list[str] = []
        assert run(cfg, say=lines.append) == EXIT_OK
        assert server.state.batches_created == batches and server.state.requests == 0  # nothing online
        assert max(server.state.batch_lines.values()) == 1
    run_dir = tmp_path / "run"
    keys = _keys(run_dir)
    assert len(keys) == 10_000 and set(keys.values()) == {1}
    stats = json.loads((run_dir / "stats.json").read_text())
    assert stats["complete"] and stats["metrics"]["accuracy"] == 1.0
    spend = stats["spend"]
    # 2 input and 2 output tokens per row, at half of $2 / $8 per million.
    assert spend["input_tokens"] == 20_000 and spend["output_tokens"] == 20_000
    assert spend["cost_usd"] == pytest.approx((20_000 * 1 + 20_000 * 4) / 1e6)
    assert spend["billed_usd"] == pytest.approx(spend["cost_usd"])
    assert spend["pricing"]["batch_discount"] == 0.5
    submits = [e for e in _events(run_dir) if e["event"] == "submit"]
    assert len(submits) == batches
    assert len(read_rows(run_dir / "train")) == 10_000
    assert any("through the Batch API" in line for line in lines)


def test_files_are_cut_by_bytes_too(tmp_path):
    with MockServer(MockConfig()) as server:
        cfg = _config(tmp_path, server, _rows(60), "model.batch.max_bytes=4096", "model.batch.max_in_flight=1")
        assert run(cfg, say=lambda s: None) == EXIT_OK
        uploads = [e for e in _events(tmp_path / "run") if e["event"] == "upload"]
        assert len(uploads) > 1 and all(e["bytes"] <= 4096 for e in uploads)
        assert server.state.batches_created == len(uploads) and max(server.state.batch_lines.values()) == 1
    assert len(_keys(tmp_path / "run")) == 60


def test_per_line_errors_are_retried_in_a_later_batch_and_final_after_max_attempts(tmp_path):
    rows = _rows(40)
    rows[1]["prompt"] = rows[1]["expected_answer"] = "[[batch_error:1]] one"
    rows[2]["prompt"] = rows[2]["expected_answer"] = "[[fail:500:2]] two"
    rows[3]["prompt"] = "[[status:400]] never"
    with MockServer(MockConfig()) as server:
        cfg = _config(tmp_path, server, rows, "max_error_fraction=0.1")
        assert run(cfg, say=lambda s: None) == EXIT_OK
        assert server.state.batches_created == 3  # r1 retried once, r2 twice, r3 three times then final
        counts = Counter(server.state.batch_lines.values())
        assert counts == {1: 37, 2: 1, 3: 2}
    run_dir = tmp_path / "run"
    keys = _keys(run_dir)
    assert len(keys) == 39 and set(keys.values()) == {1} and ("r3", 0) not in keys
    failed = read_rows(run_dir / "failed")
    assert [(f["id"], f["error"]["type"], f["failed_runs"]) for f in failed] == [("r3", "context_length", 3)]
    collected = [e for e in _events(run_dir) if e["event"] == "collected"]
    assert [e["request_counts"]["failed"] for e in collected] == [3, 2, 1]
    stats = json.loads((run_dir / "stats.json").read_text())
    assert stats["failed_final"] == 1 and stats["done"] == 39


def test_an_expired_batch_keeps_its_answers_and_sends_only_the_rest(tmp_path):
    with MockServer(MockConfig(batch_expire=1, batch_expire_keep=0.3)) as server:
        cfg = _config(tmp_path, server, _rows(100))
        lines: list[str] = []
        assert run(cfg, say=lines.append) == EXIT_OK
        assert server.state.batches_created == 2
        assert Counter(server.state.batch_lines.values()) == {1: 30, 2: 70}
    run_dir = tmp_path / "run"
    keys = _keys(run_dir)
    assert len(keys) == 100 and set(keys.values()) == {1}
    assert not read_rows(run_dir / "failed")  # lines it never ran are not failures
    assert [e["status"] for e in _events(run_dir) if e["event"] == "collected"] == ["expired", "completed"]
    assert any("expired: 30 answers kept, 70 sample(s) sent again" in line for line in lines)


def test_no_wait_submits_and_exits_then_reruns_collect(tmp_path):
    with MockServer(MockConfig(batch_delay_s=1.5)) as server:
        cfg = _config(tmp_path, server, _rows(50))
        lines: list[str] = []
        assert run(cfg, say=lines.append, no_wait=True) == EXIT_PENDING
        assert server.state.batches_created == 1
        assert any("1 batch(es) holding 50 samples are at the provider" in line for line in lines)
        assert not (tmp_path / "run" / "_SUCCESS").exists()
        assert run(cfg, say=lambda s: None, no_wait=True) == EXIT_PENDING  # still validating: nothing new
        assert server.state.batches_created == 1
        time.sleep(1.6)
        assert run(cfg, say=lambda s: None, no_wait=True) == EXIT_OK  # finished now: collected
        assert server.state.batches_created == 1 and max(server.state.batch_lines.values()) == 1
    keys = _keys(tmp_path / "run")
    assert len(keys) == 50 and set(keys.values()) == {1}
    assert (tmp_path / "run" / "_SUCCESS").exists()


def test_a_kill_between_upload_and_submit_submits_that_file_once(tmp_path):
    """The record holds an upload without its batch: the rerun creates the batch from that same file,
    or, when the provider made it before the kill, finds it: one batch either way."""
    with MockServer(MockConfig()) as server:
        for made_before_kill in (False, True):
            sub = tmp_path / str(made_before_kill)
            sub.mkdir()
            cfg = _config(sub, server, _rows(20))
            before = (server.state.uploads, server.state.batches_created)
            os.makedirs(cfg.output)

            async def upload(cfg=cfg, made_before_kill=made_before_kill) -> None:
                async with BatchClient({"base_url": server.url, "timeout_s": 5, "connect_timeout_s": 5}) as c:
                    lines = [request_line(batch_custom_id((f"r{i}", 0)), "/v1/chat/completions", json.dumps(
                        {"model": "mock", "messages": [{"role": "user", "content": f"answer {i}"}]}).encode())
                        for i in range(20)]
                    fid = await c.upload(b"\n".join(lines), "x.jsonl")
                    BatchLog(cfg.output).uploaded(fid, [(f"r{i}", 0) for i in range(20)], 100)
                    if made_before_kill:
                        await c.create(fid, "/v1/chat/completions", "24h", {})

            asyncio.run(upload())
            assert run(cfg, say=lambda s: None) == EXIT_OK
            assert server.state.uploads == before[0] + 1 and server.state.batches_created == before[1] + 1
            assert len(_keys(Path(cfg.output))) == 20


def _cli_config(tmp_path: Path, server: MockServer, rows: list, *extra: str) -> Path:
    inp = write_jsonl(tmp_path / "in.jsonl", rows)
    lines = []
    for o in _overrides(tmp_path, server, inp, *extra):
        key, _, value = o.partition("=")
        *parents, leaf = key.split(".")
        lines.append((parents, leaf, value))
    tree: dict = {}
    for parents, leaf, value in lines:
        node = tree
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    path = tmp_path / "config.yaml"
    path.write_text(json.dumps(tree))  # JSON is YAML
    return path


def test_kill_9_while_waiting_then_rerun_submits_nothing_twice(tmp_path):
    with MockServer(MockConfig(batch_delay_s=4.0)) as server:
        config = _cli_config(tmp_path, server, _rows(3000), "model.batch.max_requests=1000",
                             "model.batch.max_in_flight=2")
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        cmd = [sys.executable, "-m", "sft_ray.cli", "run", str(config)]
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
                                start_new_session=True)
        record = tmp_path / "run" / "batches.jsonl"
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if record.exists() and sum('"submit"' in x for x in record.read_text().splitlines()) >= 2:
                break
            time.sleep(0.05)
        else:
            proc.kill()
            pytest.fail("the run recorded no batch within 120 s")
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and anything it started
        proc.wait(30)
        assert server.state.batches_created == 2  # two in flight, the third not yet sent
        second = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
        assert second.returncode == 0, second.stderr[-2000:]
        assert "batches:" in second.stderr  # the progress line of each poll
        assert server.state.batches_created == 3 and max(server.state.batch_lines.values()) == 1
    keys = _keys(tmp_path / "run")
    assert len(keys) == 3000 and set(keys.values()) == {1}


def test_a_batch_run_counts_its_metrics_and_keeps_a_live_view(tmp_path, monkeypatch):
    """A Batch API run records the run's metrics and live view as an online run does: progress.json
    moves while the batches wait, and at the end the metric counters equal stats.json's done, failed,
    requests, tokens and cost (at the batch price), and the final progress.json agrees with it."""
    import threading

    from sft_ray import metrics

    made: list = []
    real_init = metrics.RunMetrics.__init__

    def spy(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        made.append(self)

    monkeypatch.setattr(metrics.RunMetrics, "__init__", spy)
    rows = _rows(300)
    rows[7]["prompt"] = "[[status:400]] refused"  # a failure, final at once
    with MockServer(MockConfig(batch_delay_s=2.5)) as server:
        cfg = _config(tmp_path, server, rows, "model.batch.max_requests=100", "model.batch.max_in_flight=1",
                      "report.interval_s=0.5", "pricing.input_per_mtok=2", "pricing.output_per_mtok=8",
                      "max_error_fraction=0.5", "max_sample_attempts=1")
        result: dict = {}
        t = threading.Thread(target=lambda: result.setdefault("code", run(cfg, say=lambda s: None)))
        t.start()
        progress, live = tmp_path / "run" / "progress.json", []
        while t.is_alive():
            if progress.exists():
                doc = json.loads(progress.read_text())  # written atomically: always whole JSON
                if not doc["final"]:
                    live.append(doc)
            time.sleep(0.1)
        t.join()
    assert result["code"] == EXIT_OK
    assert live and live[-1]["expected"] == 300 and live[-1]["spend"]["requests"] > 0, live[-1:]
    assert any(0 < d["done"] < 300 for d in live), [d["done"] for d in live]
    run_dir = tmp_path / "run"
    stats = json.loads((run_dir / "stats.json").read_text())
    [m] = made  # Ray's metrics too where Ray is up (metrics.export_port, or this session's test cluster)
    assert (m.counts["done"], m.counts["failed"]) == (stats["done"], stats["failed"]) == (299, 1)
    assert m.counts["requests"] == stats["spend"]["requests"] == 300
    assert (m.counts["input_tokens"], m.counts["output_tokens"]) == (stats["tokens"]["input_tokens"],
                                                                     stats["tokens"]["output_tokens"])
    assert m.counts["cost_usd"] == pytest.approx(stats["spend"]["billed_usd"]) and stats["spend"]["billed_usd"] > 0
    final = json.loads((run_dir / "progress.json").read_text())
    assert final["final"] and (final["done"], final["expected"], final["failed"]) == (
        stats["done"], stats["expected"], stats["failed"])


VERIFIER = '''
PASS = {"always": set(range(99)), "late": {3, 4}, "never": set()}

def score(row, response, rollout):
    return float(rollout["sample_index"] in PASS[response])
'''


def test_rejection_sampling_goes_in_rounds_of_what_each_prompt_still_needs(tmp_path):
    (tmp_path / "verif.py").write_text(VERIFIER)
    rows = [{"id": p, "prompt": p} for p in ("always", "late", "never")]
    with MockServer(MockConfig()) as server:
        cfg = _config(tmp_path, server, rows, "verifier.type=python", f"verifier.function={tmp_path}/verif.py:score",
                      "filter.min_reward=1.0", "rejection.target_passing=2", "rejection.max_samples=5")
        assert run(cfg, say=lambda s: None) == EXIT_OK
        # Round 1: 2 samples each; round 2: late and never 2 more; round 3: one more each.
        assert server.state.batches_created == 3
        assert max(server.state.batch_lines.values()) == 1
    uploads = [e["keys"] for e in _events(tmp_path / "run") if e["event"] == "upload"]
    assert [sorted(map(tuple, u)) for u in uploads] == [
        [("always", 0), ("always", 1), ("late", 0), ("late", 1), ("never", 0), ("never", 1)],
        [("late", 2), ("late", 3), ("never", 2), ("never", 3)],
        [("late", 4), ("never", 4)]]
    stats = json.loads((tmp_path / "run" / "stats.json").read_text())
    assert stats["rejection"]["reached_target"] == 2 and stats["rejection"]["never_passed"] == 1


def test_config_refuses_what_batches_cannot_do(tmp_path):
    with MockServer(MockConfig()) as server:
        with pytest.raises(ConfigError, match=r"model.batch: unknown key for the vllm backend \(batch applies to the "
                                              r"openai / anthropic backend\)"):
            _config(tmp_path, server, _rows(1), "model.backend=vllm")
        with pytest.raises(ConfigError, match="pace online requests"):
            _config(tmp_path, server, _rows(1), "num_samples_in_parallel=auto")
        inp = write_jsonl(tmp_path / "in.jsonl", _rows(1))
        plain = [o for o in _overrides(tmp_path, server, inp) if not o.startswith("model.batch")]
        config = tmp_path / "c.yaml"
        config.write_text("{}")
        result = CliRunner().invoke(app, ["run", str(config), *plain, "--no-wait"])
        assert result.exit_code == 1 and "--no-wait is for Batch API runs" in result.output
        agent = [*_overrides(tmp_path, server, inp), "environment.type=python",
                 f"environment.module={ROOT / 'examples' / 'tools_weather.py'}"]
        result = CliRunner().invoke(app, ["run", str(config), *agent, "--no-wait"])
        assert result.exit_code == 1 and "--no-wait cannot leave agent episodes waiting" in result.output


def test_a_spending_budget_stops_new_batches_and_a_raised_one_continues(tmp_path):
    with MockServer(MockConfig()) as server:
        cfg = _config(tmp_path, server, _rows(100), "model.batch.max_requests=20", "model.batch.max_in_flight=1",
                      "budget.max_requests=50")
        lines: list[str] = []
        assert run(cfg, say=lines.append) == 5  # EXIT_SPENT
        assert server.state.batches_created == 2 and len(_keys(tmp_path / "run")) == 40
        assert any("stopped: budget" in line for line in lines)
        cfg = _config(tmp_path, server, _rows(100), "model.batch.max_requests=20", "budget.max_requests=100")
        assert run(cfg, say=lambda s: None) == EXIT_OK
        assert server.state.batches_created == 5 and max(server.state.batch_lines.values()) == 1
    keys = _keys(tmp_path / "run")
    assert len(keys) == 100 and set(keys.values()) == {1}


def test_a_rerun_with_more_samples_continues_the_rounds_where_they_stopped(tmp_path):
    (tmp_path / "verif.py").write_text(VERIFIER)
    rows = [{"id": p, "prompt": p} for p in ("always", "late", "never")]
    with MockServer(MockConfig()) as server:
        common = ["verifier.type=python", f"verifier.function={tmp_path}/verif.py:score", "filter.min_reward=1.0",
                  "rejection.target_passing=2"]
        assert run(_config(tmp_path, server, rows, *common, "rejection.max_samples=3"), say=lambda s: None) == EXIT_OK
        assert server.state.batches_created == 2
        assert run(_config(tmp_path, server, rows, *common, "rejection.max_samples=5"), say=lambda s: None) == EXIT_OK
        assert max(server.state.batch_lines.values()) == 1
    uploads = [sorted(map(tuple, e["keys"])) for e in _events(tmp_path / "run") if e["event"] == "upload"]
    assert uploads[2:] == [[("late", 3), ("late", 4), ("never", 3), ("never", 4)]]
    samples = Counter(r["id"] for r in read_rows(tmp_path / "run" / "rollouts"))
    assert samples == {"always": 2, "late": 5, "never": 5}


def test_agent_episodes_advance_one_model_turn_per_round(tmp_path):
    weather = [json.loads(line) for line in (ROOT / "examples" / "agent-weather.jsonl").read_text().splitlines()][:4]
    two_steps = json.loads(json.dumps(weather[0]))
    two_steps["id"] = "two-steps"
    two_steps["responses_create_params"]["input"][-1]["content"] = "[[steps:2]] Weather in Oslo?"
    rows = weather + [two_steps]
    with MockServer(MockConfig()) as server:
        cfg = _config(tmp_path, server, rows, "environment.type=python",
                      f"environment.module={ROOT / 'examples' / 'tools_weather.py'}", "agent.max_steps=4",
                      "verifier.type=regex", "verifier.pattern=The weather in .+ is", "model.api=responses")
        assert run(cfg, say=lambda s: None) == EXIT_OK
        assert server.state.requests == 0  # every model call went in a batch
        # Round 1: every episode's first call; round 2: every second call (4 answer, two-steps calls a
        # tool again); round 3: two-steps' third call.
        assert server.state.batches_created == 3
    uploads = [sorted(map(tuple, e["keys"])) for e in _events(tmp_path / "run") if e["event"] == "upload"]
    everyone = sorted((r["id"], 0) for r in rows)
    assert uploads == [everyone, everyone, [("two-steps", 0)]]
    out = {r["id"]: r for r in read_rows(tmp_path / "run" / "rollouts")}
    assert len(out) == 5 and all(r["reward"] == 1.0 for r in out.values())
    assert out["two-steps"]["num_model_calls"] == 3 and out["weather-00"]["num_model_calls"] == 2
    assert [m["role"] for m in out["weather-00"]["messages"]][-3:] == ["assistant", "tool", "assistant"]


def test_a_rerun_abandons_a_killed_runs_agent_round_and_starts_those_episodes_again(tmp_path):
    rows = [json.loads(line) for line in (ROOT / "examples" / "agent-weather.jsonl").read_text().splitlines()][:3]
    with MockServer(MockConfig()) as server:
        cfg = _config(tmp_path, server, rows, "environment.type=python",
                      f"environment.module={ROOT / 'examples' / 'tools_weather.py'}", "verifier.type=none")
        os.makedirs(cfg.output)
        log = BatchLog(cfg.output)  # what a killed run left: a round submitted and never collected
        entry = log.uploaded("file-gone", [(r["id"], 0) for r in rows], 10)
        log.submitted(entry, "batch-gone")
        assert run(cfg, say=lambda s: None) == EXIT_OK
    events = _events(tmp_path / "run")
    assert events[2] == {**events[2], "event": "collected", "n": 0, "status": "abandoned"}
    assert len(_keys(tmp_path / "run")) == 3


def test_dry_run_pilots_online_and_plans_at_batch_prices(tmp_path, ray_cluster):
    from sft_ray.dryrun import dry_run

    with MockServer(MockConfig()) as server:
        cfg = _config(tmp_path, server, _rows(40), "pricing.input_per_mtok=2", "pricing.output_per_mtok=8")
        lines: list[str] = []
        plan = dry_run(cfg, 10, lines.append)
        assert server.state.batches_created == 0 and server.state.requests == 10  # the pilot went online
    # All 40 samples planned (the pilot's folder is thrown away), 2 input and 2 output tokens each, at half
    # of $2 / $8 per million; the pilot itself cost the online price.
    assert plan["samples_planned"] == 40
    assert plan["cost_usd_planned"] == pytest.approx(round(40 * (2 * 1 + 2 * 4) / 1e6, 4))
    assert plan["pilot_cost_usd"] == pytest.approx(10 * (2 * 2 + 2 * 8) / 1e6)
    assert any("at Batch API prices (0.5 x pricing)" in line for line in lines)
    assert not (tmp_path / "run").exists()


class HostileServer:
    """The mock behind a middleware that spoils what a careless or hostile provider could: output files
    get foreign, malformed and repeated lines; with ``echo_key``, uploads are refused with a 401 whose
    body repeats the request's Authorization header."""

    def __init__(self, echo_key: bool = False) -> None:
        self.echo_key = echo_key
        self.server = MockServer(MockConfig())

    def __enter__(self) -> MockServer:
        from aiohttp import web

        from sft_ray import devserver

        echo_key = self.echo_key

        @web.middleware
        async def spoil(request, handler):
            if echo_key and request.path == "/v1/files":
                return web.json_response({"error": {"message": f"bad key {request.headers.get('Authorization')}"}},
                                         status=401)
            resp = await handler(request)
            if request.path.endswith("/content") and "out" in request.path:
                lines = resp.body.splitlines()
                first = json.loads(lines[0])
                evil = [b"not json at all", json.dumps({"custom_id": "0:not-mine", "response": {
                    "status_code": 200, "body": {"choices": [{"message": {"content": "x"}}]}}}).encode(),
                    json.dumps({"custom_id": 7, "response": None}).encode(),
                    json.dumps({**first, "response": {**first["response"], "body": {"choices": []}}}).encode(),
                    b"[1, 2]"]
                return web.Response(body=b"\n".join(lines + evil) + b"\n")
            return resp

        real = devserver.make_app

        def make_app(cfg, state):
            app = real(cfg, state)
            app.middlewares.append(spoil)
            return app

        devserver.make_app = make_app
        try:
            return self.server.start()
        finally:
            devserver.make_app = real

    def __exit__(self, *exc) -> None:
        self.server.stop()


def test_foreign_malformed_and_repeated_output_lines_change_nothing(tmp_path):
    with HostileServer() as server:
        cfg = _config(tmp_path, server, _rows(30))
        assert run(cfg, say=lambda s: None) == EXIT_OK
        assert server.state.batches_created == 1
    rows = read_rows(tmp_path / "run" / "rollouts")
    assert Counter((r["id"], r["sample_index"]) for r in rows) == {(f"r{i}", 0): 1 for i in range(30)}
    assert all(r["response"] == r["expected_answer"] for r in rows)  # the first answer of a custom_id is kept


def test_an_api_error_names_the_call_and_never_the_key(tmp_path, monkeypatch):
    from sft_ray.job import RunError

    monkeypatch.setenv("BATCH_TEST_KEY", "sk-secret-123456")
    with HostileServer(echo_key=True) as server:
        cfg = _config(tmp_path, server, _rows(5), "model.api_key_env=BATCH_TEST_KEY", "model.max_retries=0")
        with pytest.raises(RunError) as err:
            run(cfg, say=lambda s: None)
    message = str(err.value)
    assert "uploading sft-ray-batch-00000.jsonl: HTTP 401" in message and "sk-secret-123456" not in message
    assert "Bearer ***" in message
    assert "sk-secret" not in (tmp_path / "run" / "run.json").read_text()


def test_an_agent_rounds_expired_calls_go_again_in_the_same_round(tmp_path):
    rows = [json.loads(line) for line in (ROOT / "examples" / "agent-weather.jsonl").read_text().splitlines()][:4]
    with MockServer(MockConfig(batch_expire=1, batch_expire_keep=0.5)) as server:
        cfg = _config(tmp_path, server, rows, "environment.type=python",
                      f"environment.module={ROOT / 'examples' / 'tools_weather.py'}",
                      "verifier.type=regex", "verifier.pattern=The weather in .+ is")
        assert run(cfg, say=lambda s: None) == EXIT_OK
        assert server.state.batches_created == 3  # round 1 (expired: half ran), its other half, round 2
    uploads = [len(e["keys"]) for e in _events(tmp_path / "run") if e["event"] == "upload"]
    assert uploads == [4, 2, 4]
    out = read_rows(tmp_path / "run" / "rollouts")
    assert len(out) == 4 and all(r["reward"] == 1.0 and r["num_model_calls"] == 2 for r in out)
    assert not read_rows(tmp_path / "run" / "failed")
