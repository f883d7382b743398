"""`sft-ray rescore`: score every stored rollout again with another verifier, calling no model.

A run folder's rollouts keep everything a verifier reads (the input fields, the reply, an agent
episode's messages), so a changed verifier needs no new generation. :func:`rescore`:

1. builds the new config: the run's (``run.json``) with its ``verifier`` (and ``resources``)
   replaced by ``--config FILE``'s and the ``verifier.*`` / ``resources.*`` overrides;
2. takes the run lock and scores, in ``rescore/``, every rollout of ``rollouts/`` (and every row
   an earlier rescore could not score) that ``rescore/`` does not hold yet, each written the
   moment its verdict is in (``rescore/rollouts/``, or ``rescore/failed/`` when the verifier
   failed). A killed rescore loses only the verdicts in flight: a rerun with the same verifier
   scores only what ``rescore/`` lacks (a rerun with another verifier starts over);
3. once every row has a verdict (or failed in ``max_sample_attempts`` rescores), swaps them in:
   ``rollouts/`` becomes ``rescore/rollouts/``, rows the verifier never scored go to ``failed/``
   as failed samples (rollout kept, ``verifier_error`` / ``judge_error``, never a reward of 0;
   a later rescore tries them again), the manifest records the verifier (its fingerprint too,
   so ``sft-ray run`` continues the folder with the new verifier and refuses the old one), and
   ``train/``, ``stats.json`` and the report are rebuilt. While rows failed with tries left, it
   stops before the swap (exit 4): the folder keeps the old rewards, all of them.

Each rescored rollout keeps the reward and metrics it had under ``previous``.

A judge with its own vLLM engine scores in the score stage's actors, on the cluster, as a run's
journal recovery does (:func:`sft_ray.driver.remote_scorer`); any other verifier scores here,
``verifier.concurrency`` rows at a time.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator

import orjson
import yaml
from pydantic import ValidationError

from sft_ray import io
from sft_ray.config import ConfigError, RunConfig, flat_dump, from_stored
from sft_ray.configload import apply_overrides, format_validation_error, override_parts
from sft_ray.cost import priced as judge_priced
from sft_ray.driver import Progress, remote_scorer
from sft_ray.job import RunError, check_plugins, finalize_run, lock_folder
from sft_ray.rows import GENERATED_FIELDS
from sft_ray.runfolder.completion import EXIT_OK, EXIT_PENDING, FailureBudget
from sft_ray.runfolder.layout import (
    FAILED,
    MANIFEST,
    REPORT_HTML,
    RESCORE,
    RESCORE_TARGET,
    ROLLOUTS,
    Key,
    iter_jsonl,
    key_of,
    recorded_sessions,
    written_by,
)
from sft_ray.runfolder.manifest import Manifest, load_manifest, save_manifest, verifier_fingerprint
from sft_ray.runfolder.parts import PartWriter
from sft_ray.scoring import Scorer, score_now, verifier_payload

# Sections a rescore may change: the verifier, and the resources its scoring actors get.
SECTIONS = ("verifier", "resources")
BATCH = 256  # rows per batch: a local verifier (or one that scores batches), and the cluster path
# Verifiers that compute a reward here, calling nothing and costing nothing: scored and written a
# batch at a time (a kill re-scores at most a batch of them, for free). Any other (a judge, code
# in a sandbox, the user's Python, a NeMo Gym server) has each verdict written the moment it is in.
LOCAL_TYPES = frozenset({"exact_match", "math", "mcq", "regex", "json_schema", "none"})


def is_local(verifier: Any) -> bool:
    """Whether a verifier section (a composite's components included) only computes locally."""
    if verifier.type == "composite":
        return all(is_local(c) for c in verifier.components)
    return verifier.type in LOCAL_TYPES and not verifier.judges()
PREFIX = "rescore"  # part files of rescore/: rescore-<session>-<n>.jsonl (never a run's part-<session>-<n>)


def rescore_config(run_dir: str, config_file: str | None, overrides: list[str]) -> tuple[Manifest, RunConfig]:
    """(the run's manifest, the config to rescore with): the run's config with ``config_file``'s
    ``verifier`` (and ``resources``) sections, then the overrides (``verifier.*``, ``resources.*``).
    An override of ``verifier.type`` to another type starts the verifier section from the defaults
    (the old verifier's keys would not fit the new one)."""
    manifest = load_manifest(run_dir)
    if manifest is None:
        raise ConfigError(f"{run_dir} is not a run folder (no {MANIFEST})")
    data = from_stored(json.loads(json.dumps(manifest.config)))  # a deep copy, validatable
    source = f"{run_dir}/{MANIFEST}"
    if config_file:
        try:
            with open(config_file) as f:
                loaded = yaml.safe_load(f) or {}
        except OSError as e:
            raise ConfigError(f"config file {config_file}: {e.strerror}") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"{config_file}: not valid YAML: {e}") from None
        if not isinstance(loaded, dict) or "verifier" not in loaded:
            raise ConfigError(f"{config_file}: no `verifier` section (rescore takes the verifier and resources "
                              "of a config file)")
        for section in SECTIONS:
            if section in loaded:
                data[section] = loaded[section]
        source = config_file
    for item in overrides:
        parts, value = override_parts(item)
        if parts[0] not in SECTIONS:
            raise ConfigError(f"override {item!r}: only verifier.* and resources.* apply to a rescore")
        if parts == ["verifier", "type"] and yaml.safe_load(value) != (data.get("verifier") or {}).get("type"):
            data["verifier"] = {}
    apply_overrides(data, overrides)
    try:
        cfg = RunConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, source + (" with overrides" if overrides else ""))) from None
    return manifest, cfg


# -- what there is to score -------------------------------------------------------------------


def stored_rows(run_dir: str) -> Iterator[dict[str, Any]]:
    """Every rollout to rescore, each key once: ``rollouts/``, then the rows of ``failed/`` that an
    earlier rescore could not score (they carry ``rescore_attempts``; generation failures have no
    rollout to score and stay as they are)."""
    seen: set[Key] = set()
    sessions = recorded_sessions(load_manifest(run_dir))
    for folder, only_rescored in ((ROLLOUTS, False), (FAILED, True)):
        # A file no recorded session wrote is none of the run's: never scored (nor swapped back in).
        for uri in written_by(io.list_files(io.join(run_dir, folder), ".jsonl"), sessions)[0]:
            for row, _ in iter_jsonl(uri):
                if row is None or (only_rescored and "rescore_attempts" not in row):
                    continue
                key = key_of(row)
                if key not in seen:
                    seen.add(key)
                    yield row


def fresh(row: dict[str, Any]) -> dict[str, Any]:
    """The rollout without its verdict, ready for the new verifier; what it had goes under
    ``previous`` (a row an earlier rescore failed on keeps the ``previous`` it already has)."""
    metrics = row.get("metrics") or {}
    if row.get("rescore_attempts") is not None and row.get("previous") is not None:
        previous = row["previous"]
    else:
        previous = {"reward": row.get("reward"), "metrics": metrics}
    out = {k: v for k, v in row.items()
           if k not in ("reward", "metrics", "error", "previous", "failed_runs", "rescore_attempts")}
    for k, v in metrics.items():  # the old metrics' copies at the top level (scoring.apply_result puts them there)
        if k not in GENERATED_FIELDS and k in out and out[k] == v:
            del out[k]
    out["previous"] = previous
    return out


@dataclass
class RescoreJournal:
    """rescore/: what an unfinished rescore with this verifier has done. ``done``: rows scored;
    ``tries``: rows the verifier failed on, with the rescores they failed in."""

    run_dir: str
    target: dict[str, Any]
    done: set[Key] = field(default_factory=set)
    tries: dict[Key, int] = field(default_factory=dict)

    @property
    def folder(self) -> str:
        return io.join(self.run_dir, RESCORE)

    def save_target(self) -> None:
        io.write_bytes(io.join(self.folder, RESCORE_TARGET), json.dumps(self.target, indent=2).encode())


def open_journal(run_dir: str, fingerprint: dict[str, Any], say: Callable[[str], None],
                 write: bool = True) -> RescoreJournal:
    """The rescore journal for this verifier: continued when it was made for the same one, else
    (another verifier's, unfinished) discarded."""
    folder = io.join(run_dir, RESCORE)
    uri = io.join(folder, RESCORE_TARGET)
    target = orjson.loads(io.read_bytes(uri)) if io.exists(uri) else None
    if target is not None and target.get("verifier") != fingerprint:
        if target.get("state") == "swapping":
            raise RunError(f"{run_dir}: a rescore with another verifier was stopped while it swapped its rewards in; "
                           "rerun `sft-ray rescore` with that verifier to finish it first")
        say(f"discarding an unfinished rescore with another verifier ({len(io.list_files(folder, '.jsonl'))} "
            "file(s) in rescore/)")
        if write:
            io.delete(folder)
        target = None
    if target is None:
        target = {"id": uuid.uuid4().hex, "verifier": fingerprint, "state": "scoring", "sessions": 0,
                  "started_at": time.time()}
        return RescoreJournal(run_dir, target)
    journal = RescoreJournal(run_dir, target)
    for uri in io.list_files(io.join(folder, ROLLOUTS), ".jsonl"):
        for row, _ in iter_jsonl(uri):  # a torn last line (a kill mid-write) is scored again
            if row is not None:
                journal.done.add(key_of(row))
    for uri in io.list_files(io.join(folder, FAILED), ".jsonl"):
        for row, _ in iter_jsonl(uri):
            if row is not None:
                key = key_of(row)
                journal.tries[key] = max(journal.tries.get(key, 0), int(row.get("rescore_attempts") or 1))
    for key in journal.done:
        journal.tries.pop(key, None)
    return journal


# -- scoring ----------------------------------------------------------------------------------


class Sink:
    """Writes each verdict the moment it is in: a scored row to rescore/rollouts/, a failed one
    (with the rescores it failed in) to rescore/failed/."""

    def __init__(self, journal: RescoreJournal, session: int, progress: Progress | None) -> None:
        self.journal = journal
        self.ok = PartWriter(io.join(journal.folder, ROLLOUTS), session, prefix=PREFIX)
        self.bad = PartWriter(io.join(journal.folder, FAILED), session, prefix=PREFIX)
        self.progress = progress
        self.scored = self.failed = 0
        self.reward_sum = 0.0
        self.judge_cost = 0.0

    def __call__(self, row: dict[str, Any]) -> None:
        self.many([row])

    def many(self, rows: list[dict[str, Any]]) -> None:
        """Write rows with their verdicts (one write per folder)."""
        oks, bads = [], []
        done, tries = self.journal.done, self.journal.tries
        for row in rows:
            key = key_of(row)
            if row.get("reward") is None:
                row["rescore_attempts"] = tries.get(key, 0) + 1
                tries[key] = row["rescore_attempts"]
                bads.append(orjson.dumps(row))
            else:
                oks.append(orjson.dumps(row))
                done.add(key)
                tries.pop(key, None)
                self.reward_sum += float(row["reward"])
            cost = (row.get("metrics") or {}).get("judge_cost_usd")
            if isinstance(cost, (int, float)):
                self.judge_cost += float(cost)
        self.ok.write(oks)
        self.bad.write(bads)
        self.scored += len(oks)
        self.failed += len(bads)
        if self.progress is not None:
            n = self.scored + self.failed
            self.progress.update(len(rows), n, self.failed, self.reward_sum / self.scored if self.scored else None)

    def close(self) -> None:
        self.ok.close()
        self.bad.close()


async def score_here(verifier: dict[str, Any], rows: Iterable[dict[str, Any]], sink: Sink,
                     batched: bool = False) -> None:
    """Score rows in this process, ``verifier.concurrency`` at a time, each handed to ``sink`` as
    soon as its verdict is in (so a kill loses only the verdicts in flight); ``batched`` (a
    verifier that costs nothing, or one that scores batches): a batch at a time."""
    scorer = Scorer(verifier)
    try:
        if batched or hasattr(scorer.verifier, "score_batch"):
            batch: list[dict[str, Any]] = []
            for row in rows:
                batch.append(row)
                if len(batch) == BATCH:
                    await _score_batch(scorer, batch, batched)
                    sink.many(batch)
                    batch = []
            await _score_batch(scorer, batch, batched)
            sink.many(batch)
            return
        window = asyncio.Semaphore(2 * scorer.concurrency)  # rows read ahead: bounded, whatever the folder holds
        tasks: set[asyncio.Task] = set()

        async def one(row: dict[str, Any]) -> None:
            try:
                await scorer.score([row])
                sink(row)
            finally:
                window.release()

        for row in rows:
            await window.acquire()
            task = asyncio.create_task(one(row))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        if tasks:
            await asyncio.gather(*tasks)
    finally:
        await scorer.close()


async def _score_batch(scorer: Scorer, batch: list[dict[str, Any]], local: bool) -> None:
    if local and not hasattr(scorer.verifier, "score_batch"):
        score_now(scorer.verifier, batch)  # a local verifier: no coroutine per row
    else:
        await scorer.score(batch)


def score_remote(score: Callable[[list[dict[str, Any]]], Iterable[dict[str, Any]]],
                 rows: Iterable[dict[str, Any]], sink: Sink) -> None:
    """Score rows in the score stage's actors (a judge with a vLLM engine), each block written as it returns."""
    batches, chunk = [], []

    def batch(rs: list[dict[str, Any]]) -> dict[str, list[Any]]:
        return {"id": [r["id"] for r in rs], "sample_index": [r["sample_index"] for r in rs],
                "rollout": [orjson.dumps(r).decode() for r in rs], "failed": [False] * len(rs),
                "ready_at": [0.0] * len(rs)}

    for row in rows:
        chunk.append(row)
        if len(chunk) == BATCH:
            batches.append(batch(chunk))
            chunk = []
    if chunk:
        batches.append(batch(chunk))
    if not batches:
        return
    for out in score(batches):
        sink.many([orjson.loads(text) for text in out["rollout"]])


# -- the swap ----------------------------------------------------------------------------------


def swap_in(run_dir: str, journal: RescoreJournal, manifest: Manifest, cfg: RunConfig,
            record: dict[str, Any]) -> int:
    """Put the rescored rows in place of the old ones (see the module doc); returns the rows that
    the verifier never scored (now failed samples). Safe to run again after a kill: each step
    checks whether it is done."""
    folder = journal.folder
    new_failed = io.join(run_dir, FAILED + ".new")
    final = 0
    if journal.target.get("state") != "swapping":
        # failed/ as it will be: generation failures as they were, plus rows no verifier scored.
        rescored_failures = {}
        for uri in io.list_files(io.join(folder, FAILED), ".jsonl"):
            for row, _ in iter_jsonl(uri):
                if row is not None and key_of(row) not in journal.done:
                    rescored_failures[key_of(row)] = row  # a later record (more tries) wins
        io.delete(new_failed)
        io.makedirs(new_failed)
        lines = []
        for uri in io.list_files(io.join(run_dir, FAILED), ".jsonl"):
            for row, line in iter_jsonl(uri):
                if row is None or "rescore_attempts" in row:
                    continue  # an earlier rescore's failure: scored now, or in rescored_failures
                if key_of(row) not in journal.done and key_of(row) not in rescored_failures:
                    lines.append(line)
        for row in rescored_failures.values():
            row["failed_runs"] = cfg.max_sample_attempts  # final for `sft-ray run`; `sft-ray rescore` tries it again
            lines.append(orjson.dumps(row))
        final = len(rescored_failures)
        if lines:
            io.write_bytes(io.join(new_failed, "part-000-compact.jsonl"), b"".join(ln + b"\n" for ln in lines))
        journal.target.update(state="swapping", final_failures=final)
        journal.save_target()
    final = int(journal.target.get("final_failures") or 0)
    new_rollouts = io.join(folder, ROLLOUTS)
    if io.exists(new_rollouts):
        io.replace_dir(new_rollouts, io.join(run_dir, ROLLOUTS))
    if io.exists(new_failed):
        io.replace_dir(new_failed, io.join(run_dir, FAILED))
    manifest.record_rescore(journal.target, flat_dump(cfg.verifier, "json"), record, final,
                            FailureBudget(cfg.max_error_fraction, cfg.min_rows_for_budget))
    save_manifest(run_dir, manifest)
    io.delete(folder)
    return final


# -- the command -------------------------------------------------------------------------------


def rescore(run_dir: str, config_file: str | None, overrides: list[str], dry_run: bool = False,
            say: Callable[[str], None] = print) -> int:
    """`sft-ray rescore`; returns the exit code (0: swapped in; 4: rows to retry, nothing swapped)."""
    manifest, cfg = rescore_config(run_dir, config_file, overrides)
    check_plugins(cfg)
    fingerprint = verifier_fingerprint(cfg)
    if dry_run:
        return plan(run_dir, cfg, fingerprint, say)
    with lock_folder(run_dir, "rescore"):
        manifest = load_manifest(run_dir) or manifest  # as it is now that this process holds the folder
        journal = open_journal(run_dir, fingerprint, say)
        record: dict[str, Any] = {"started_at": time.time()}
        if journal.target.get("state") != "swapping":
            code = score_session(run_dir, cfg, journal, record, say)
            if code != EXIT_OK:
                return code
        else:
            say("finishing the swap of a rescore that was stopped")
        final = swap_in(run_dir, journal, manifest, cfg, record)
        say("rescored: rollouts/ holds the new rewards (the old ones under `previous`)"
            + (f"; {final} row(s) the verifier could not score are failed samples in failed/" if final else ""))
        c = manifest.config
        stats = finalize_run(run_dir, c.get("filter") or {}, (c.get("shuffle") or {}).get("seed", 0),
                             c.get("train") or {}, manifest, say, preference=c.get("preference"))
        html = io.join(run_dir, REPORT_HTML)
        if io.exists(html):  # the report page of `sft-ray stats --html -` describes the new rewards too
            from sft_ray.finalize.report_html import render

            io.write_bytes(html, render(stats, f"sft-ray run {run_dir}").encode())
    return EXIT_OK


def score_session(run_dir: str, cfg: RunConfig, journal: RescoreJournal, record: dict[str, Any],
                  say: Callable[[str], None]) -> int:
    """Score what the journal lacks; EXIT_OK when every row has a verdict or failed for good."""
    limit = cfg.max_sample_attempts
    total = todo = 0
    for row in stored_rows(run_dir):
        total += 1
        key = key_of(row)
        todo += key not in journal.done and journal.tries.get(key, 0) < limit
    say(f"rescore {run_dir}: {total} stored rollouts; {len(journal.done)} rescored before, {todo} to score with "
        f"verifier {cfg.verifier.type}" + (" (the generation model is not called)" if todo else ""))
    session = int(journal.target.get("sessions") or 0)
    journal.target["sessions"] = session + 1
    io.makedirs(io.join(journal.folder, ROLLOUTS))
    journal.save_target()
    progress = Progress(todo, unit="rows")
    sink = Sink(journal, session, progress)
    t0, cpu0 = time.monotonic(), time.process_time()

    def rows() -> Iterator[dict[str, Any]]:
        for row in stored_rows(run_dir):
            key = key_of(row)
            if key not in journal.done and journal.tries.get(key, 0) < limit:
                yield fresh(row)

    try:
        remote = remote_scorer(cfg)
        if remote is not None:
            score_remote(remote, rows(), sink)
        else:
            asyncio.run(score_here(verifier_payload(cfg.verifier), rows(), sink, batched=is_local(cfg.verifier)))
    finally:
        sink.close()
        progress.close()
    wall = time.monotonic() - t0
    record.update(rows=total, scored_now=sink.scored, failed_now=sink.failed, wall_s=round(wall, 3),
                  cpu_s=round(time.process_time() - cpu0, 3),
                  rows_per_s=round((sink.scored + sink.failed) / wall, 2) if wall > 0 else None)
    if sink.judge_cost:
        record["judge_cost_usd"] = round(sink.judge_cost, 6)
    retry = sum(1 for n in journal.tries.values() if n < limit)
    say(f"scored {sink.scored} row(s), {sink.failed} failed, in {wall:.1f} s")
    if retry:
        say(f"INCOMPLETE: the verifier failed on {retry} row(s) (verifier_error / judge_error; never a reward of 0); "
            f"rerun the same `sft-ray rescore` to retry them (each up to max_sample_attempts={limit} times). Until "
            "then the folder keeps its old rewards.")
        return EXIT_PENDING
    return EXIT_OK


def plan(run_dir: str, cfg: RunConfig, fingerprint: dict[str, Any], say: Callable[[str], None]) -> int:
    """--dry-run: how many rows would be scored and, for a priced judge, about what it costs;
    writes nothing."""
    from sft_ray.cost import cost_usd, estimate_tokens
    from sft_ray.verifiers import build_verifier
    from sft_ray.verifiers.judge import Judge

    journal = open_journal(run_dir, fingerprint, say, write=False)
    limit = cfg.max_sample_attempts
    verifier = build_verifier(verifier_payload(cfg.verifier))
    judges: list[Judge] = []
    stack = [verifier]
    while stack:
        v = stack.pop()
        if isinstance(v, Judge):
            judges.append(v)
        stack.extend(getattr(v, "subverifiers", ()) or ())
    total = todo = 0
    in_tokens = out_tokens = 0.0
    cost = 0.0
    from sft_ray.rows import input_row

    for row in stored_rows(run_dir):
        total += 1
        key = key_of(row)
        if key in journal.done or journal.tries.get(key, 0) >= limit:
            continue
        todo += 1
        for judge in judges:
            calls = 2 if judge.swap else 1
            try:
                prompt = judge.prompt(input_row(row), row.get("response") or "", row)
            except Exception:  # a row the judge cannot render is a judge_error, not a call
                continue
            i, o = (calls * n for n in estimate_tokens(len(prompt), judge.params.get("max_output_tokens")))
            in_tokens, out_tokens = in_tokens + i, out_tokens + o
            cost += cost_usd(i, o, judge.pricing)
    say(f"rescore {run_dir} with verifier {cfg.verifier.type}: {total} stored rollouts, {len(journal.done)} "
        f"rescored before with this verifier, {todo} to score; the generation model is not called")
    if judges:
        line = (f"judge calls: about {in_tokens:,.0f} input tokens (prompt characters / 4) and at most "
                f"{out_tokens:,.0f} output tokens (max_output_tokens per call)")
        priced = any(judge_priced(j.pricing) for j in judges)
        line += f"; cost at most ${cost:,.4f} at verifier.judge.pricing" if priced else \
            "; no verifier.judge.pricing: no cost estimate"
        if cfg.verifier.type == "math":
            line += " (math asks the judge only when math-verify finds no match: usually less)"
        say(line)
    say("dry run: nothing was written")
    return EXIT_OK
