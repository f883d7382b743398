"""Rate limits, adaptive concurrency, cost and budgets (issue 12), against the mock server's real limits."""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest
from conftest import make_config, read_rows, write_jsonl

from sft_ray.backends.base import GenerationRequest, Secret
from sft_ray.backends.openai import OpenAIBackend
from sft_ray.config import OpenAIModelConfig
from sft_ray.devserver import MockConfig, MockServer
from sft_ray.job import EXIT_OK, EXIT_SPENT, run

# -- the mock server's limits --------------------------------------------------------------------

def _post(url: str, prompt: str) -> tuple[int, dict]:
    body = json.dumps({"model": "m", "messages": [{"role": "user", "content": prompt}], "max_tokens": 4}).encode()
    req = urllib.request.Request(url + "/chat/completions", data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, dict(r.headers)
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers)


def test_mock_server_enforces_a_token_bucket():
    # 1 per second, 10 at once (slow enough that the bucket barely refills during the burst)
    with MockServer(MockConfig(requests_per_minute=60, limit_window_s=10.0)) as server:
        with ThreadPoolExecutor(16) as pool:
            answers = list(pool.map(lambda i: _post(server.url, f"p{i}"), range(16)))
        codes = sorted(c for c, _ in answers)
        assert codes.count(200) == 10 and codes.count(429) == 6, codes
        refused = next(h for c, h in answers if c == 429)
        assert 0 < float(refused["Retry-After"]) <= 1.0
        assert refused["x-ratelimit-limit-requests"] == "60" and refused["x-ratelimit-remaining-requests"] == "0"
        time.sleep(float(refused["Retry-After"]) + 0.1)
        assert _post(server.url, "later")[0] == 200  # refilled


# -- adaptive concurrency, one actor's backend against the mock ---------------------------------

def _backend(url: str, ceiling: int) -> OpenAIBackend:
    model = OpenAIModelConfig(name="m", base_url=url, timeout_s=5, max_retries=8, base_retry_wait_s=0.01,
                        max_retry_wait_s=0.5).model_dump()
    model["api_key"] = Secret(None)
    model["limits"] = {"shared": None, "adaptive": True}
    return OpenAIBackend(model, ceiling)


def _drive(backend: OpenAIBackend, n: int, ceiling: int) -> list:
    async def main():
        await backend.start()
        sem = asyncio.Semaphore(ceiling)  # the generate stage's cap: the ceiling

        async def one(i):
            async with sem:
                return await backend.generate(GenerationRequest([{"role": "user", "content": f"q {i}"}],
                                                                {"max_output_tokens": 8}))
        try:
            return await asyncio.gather(*(one(i) for i in range(n)))
        finally:
            await backend.close()
    return asyncio.run(main())


def test_adaptive_concurrency_grows_to_the_ceiling_when_nothing_pushes_back():
    with MockServer(MockConfig(latency_ms=20)) as server:
        backend = _backend(server.url, 64)
        results = _drive(backend, 600, 64)
        assert all(r.error is None for r in results)
        assert backend.limiter.aimd.limit == 64 and server.state.max_in_flight > 32


def test_auto_without_configured_limits_settles_at_the_servers_rate():
    # 1200 requests per minute (20/s) with one second of burst; 100 ms per answer. No limits are
    # configured: the 429s (AIMD) and the x-ratelimit-* headers (pacing) are all the client knows.
    with MockServer(MockConfig(latency_ms=100, requests_per_minute=1200, limit_window_s=1.0)) as server:
        backend = _backend(server.url, 128)
        t0 = time.monotonic()
        results = _drive(backend, 300, 128)
        wall = time.monotonic() - t0
    assert all(r.error is None for r in results)
    assert 300 / wall >= 0.8 * 20, wall  # most of the allowed rate
    assert server.state.rate_limited <= 0.05 * server.state.requests, server.state.by_status


# -- across actors: the whole pipeline on the local Ray cluster ---------------------------------

def _quiet_run(cfg):
    lines: list[str] = []
    return run(cfg, say=lines.append), "\n".join(lines)


class MockProcess:
    """`sft-ray serve-mock` in its own process: its clock and its buckets do not share a GIL with
    the Ray driver of the test (which would make the server see requests in bunches)."""

    def __init__(self, *args: str) -> None:
        self.port = free_port()
        self.args = ["--port", str(self.port), *args]

    def __enter__(self) -> "MockProcess":
        self.proc = subprocess.Popen([sys.executable, "-m", "sft_ray.cli", "serve-mock", *self.args],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while True:
            try:
                self.stats()
                return self
            except OSError:
                assert time.monotonic() < deadline and self.proc.poll() is None, "serve-mock did not start"
                time.sleep(0.2)

    def __exit__(self, *exc) -> None:
        self.proc.terminate()
        self.proc.wait(10)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def stats(self) -> dict:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/stats", timeout=5) as r:
            return json.loads(r.read())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_limit_holds_across_two_generation_actors(tmp_path, ray_cluster):
    rows = [{"prompt": f"q{i}", "expected_answer": f"q{i}"} for i in range(60)]
    inp = write_jsonl(tmp_path / "in.jsonl", rows)
    # 300 per minute = 5 per second, with a two-second bucket: two actors each pacing alone at the
    # full rate (10/s together) would draw about 20 429s over this run; held together, none.
    with MockProcess("--latency-ms", "10", "--requests-per-minute", "300", "--limit-window-s", "2") as server:
        cfg = make_config(tmp_path, server, inp, "rate_limit.requests_per_minute=300", "resources.generate_actors=2",
                          "num_samples_in_parallel=32", "verifier.type=exact_match")
        code, out = _quiet_run(cfg)
        assert code == EXIT_OK, out
        st = server.stats()
    assert st["requests"] == 60 and st["rate_limited"] == 0, st
    assert st["span_s"] >= (60 - 3.5) / 5 * 0.95, st  # paced: 5/s after a half-second burst
    stats = json.loads((tmp_path / "run" / "stats.json").read_text())
    assert stats["spend"]["requests"] == 60 and stats["spend"]["rate_limited"] == 0
    assert len({r["node_id"] for r in read_rows(tmp_path / "run" / "rollouts")}) == 1  # one node here


def test_budget_stops_cleanly_and_a_raised_budget_resumes(tmp_path, ray_cluster):
    rows = [{"prompt": f"word {i}", "expected_answer": f"word {i}"} for i in range(40)]
    inp = write_jsonl(tmp_path / "in.jsonl", rows)
    with MockServer(MockConfig(latency_ms=20)) as server:
        args = ["num_samples_in_parallel=4", "verifier.type=exact_match", "pricing.input_per_mtok=1000",
                "pricing.output_per_mtok=2000"]
        cfg = make_config(tmp_path, server, inp, *args, "budget.max_requests=15")
        code, out = _quiet_run(cfg)
        assert code == EXIT_SPENT, out
        assert "stopped: budget" in out
        done = read_rows(tmp_path / "run" / "rollouts")
        assert 0 < len(done) <= 15 and server.state.requests == len(done)
        assert not (tmp_path / "run" / "failed").exists() or not read_rows(tmp_path / "run" / "failed")
        stats = json.loads((tmp_path / "run" / "stats.json").read_text())
        assert stats["samples"] == len(done) and stats["spend"]["requests"] == len(done)
        # mock tokens: 2 words in, 2 out, at $1000 and $2000 per million
        assert stats["spend"]["cost_usd"] == pytest.approx(len(done) * (2 * 1000 + 2 * 2000) / 1e6)
        assert len(json.loads((tmp_path / "run" / "train").joinpath(
            sorted(p.name for p in (tmp_path / "run" / "train").iterdir())[0]).read_text().splitlines()[0]))
        # The same budget again: nothing more may be spent.
        code, out = _quiet_run(cfg)
        assert code == EXIT_SPENT and server.state.requests == len(done), out
        # A raised budget continues where it stopped; no sample is asked twice.
        cfg = make_config(tmp_path, server, inp, *args, "budget.max_requests=100")
        code, out = _quiet_run(cfg)
        assert code == EXIT_OK, out
        assert server.state.requests == 40
    assert len(read_rows(tmp_path / "run" / "rollouts")) == 40


def test_dry_run_plans_from_a_pilot_without_touching_the_run_folder(tmp_path, ray_cluster):
    from sft_ray.dryrun import dry_run

    rows = [{"prompt": f"word {i}", "expected_answer": f"word {i}"} for i in range(40)]
    inp = write_jsonl(tmp_path / "in.jsonl", rows)
    with MockServer(MockConfig()) as server:
        cfg = make_config(tmp_path, server, inp, "num_repeats=2", "verifier.type=exact_match",
                          "pricing.input_per_mtok=1000", "pricing.output_per_mtok=2000", "budget.max_cost_usd=0.1",
                          "rate_limit.requests_per_minute=60")
        lines: list[str] = []
        plan = dry_run(cfg, 10, lines.append)
        assert server.state.requests == 10  # the pilot only
    assert not (tmp_path / "run").exists()
    assert plan["samples_planned"] == 80 and plan["pilot_samples"] == 10 and plan["requests_planned"] == 80
    assert plan["cost_usd_planned"] == pytest.approx(80 * (2 * 1000 + 2 * 2000) / 1e6)  # 2 words in, 2 out
    assert plan["minutes_at_rate_limits"] == pytest.approx(80 / 60, abs=0.1)
    text = "\n".join(lines)
    assert "planned: 80 requests" in text and "about $0.48" in text and "budget.max_cost_usd=0.1 stops" in text


def test_dry_run_leaves_every_byte_of_an_existing_run_folder(tmp_path, ray_cluster):
    """A folder whose rollout file ends in a torn line (a killed run's, or one a live run is
    writing): --dry-run counts what is done and changes nothing, not even that line."""
    import hashlib

    from sft_ray.dryrun import dry_run

    inp = write_jsonl(tmp_path / "in.jsonl", [{"prompt": f"word {i}", "expected_answer": f"word {i}"}
                                              for i in range(6)])
    run_dir = tmp_path / "run"
    (run_dir / "rollouts").mkdir(parents=True)
    (run_dir / "failed").mkdir()
    from sft_ray.rows import row_id

    done = [{"id": row_id(json.loads(line)), "sample_index": 0, "reward": 1.0}
            for line in inp.read_text().splitlines()[:2]]
    (run_dir / "rollouts" / "part-000-00000.jsonl").write_bytes(
        b"".join(json.dumps(r).encode() + b"\n" for r in done) + b'{"id": "torn", "sample_in')
    (run_dir / "failed" / "part-000-00000.jsonl").write_bytes(b'{"id": "x", "sample_index": 0, "err')
    (run_dir / "run.json").write_text("{}")

    def hashes() -> dict[str, str]:
        return {str(p.relative_to(run_dir)): hashlib.sha256(p.read_bytes()).hexdigest()
                for p in sorted(run_dir.rglob("*")) if p.is_file()}

    before = hashes()
    with MockServer(MockConfig()) as server:
        lines: list[str] = []
        plan = dry_run(make_config(tmp_path, server, inp), 2, lines.append)
    assert plan["samples_done"] == 2 and plan["samples_planned"] == 4
    assert hashes() == before
    assert "nothing was written to the run folder" in lines[-1]
    # A real run (which holds the lock when it reads the folder) does cut the torn line off.
    from sft_ray.runfolder.state import FolderState

    assert len(FolderState(str(run_dir), 3).done) == 2
    assert (run_dir / "rollouts" / "part-000-00000.jsonl").read_bytes().endswith(b"}\n")
