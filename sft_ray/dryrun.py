"""`sft-ray run --dry-run`: the planned requests and their cost, from a small pilot.

The pilot is a real run of the first few samples into a temporary folder (the run
folder is not touched); its tokens per sample, requests per sample (retries
included) and throughput are scaled to the samples the real run would generate.
With ``model.batch.enabled`` the pilot's requests go online (a batch could take up to
its completion window) and the planned cost is at Batch API prices (``pricing.batch_discount``).
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
from pathlib import Path
from typing import Callable

from sft_ray.config import RunConfig
from sft_ray.cost import batch_prices, cost_usd


def dry_run(cfg: RunConfig, pilot_samples: int, say: Callable[[str], None] = print) -> dict:
    """Run the pilot, print the plan, return it (as the numbers printed)."""
    from sft_ray import io
    from sft_ray.job import run, scan_input
    from sft_ray.runfolder.layout import STATS, recorded_sessions
    from sft_ray.runfolder.manifest import load_manifest
    from sft_ray.runfolder.state import done_keys

    inputs = scan_input(cfg)
    rej = cfg.rejection
    # Samples per prompt: fixed, or with rejection sampling as many as the pilot's prompts took.
    per_prompt = float(cfg.num_repeats)
    done = len(done_keys(cfg.output, sessions=recorded_sessions(load_manifest(cfg.output)))) \
        if io.exists(cfg.output) else 0
    pilot_rows = max(1, math.ceil(pilot_samples / (rej.target_passing if rej.active else cfg.num_repeats)))
    tmp = tempfile.mkdtemp(prefix="sft-ray-pilot-")
    try:
        pilot = cfg.model_copy(deep=True)
        pilot.output = str(Path(tmp) / "run")
        pilot.read.limit = min(pilot_rows, cfg.read.limit or pilot_rows)
        pilot.budget = type(cfg.budget)()  # the pilot is small; the real run's budget stays for the real run
        pilot.model.batch.enabled = False  # online: a pilot batch could wait up to its completion window
        run(pilot, say=lambda s: None)
        stats = json.loads((Path(tmp) / "run" / STATS).read_text())
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    n = max(1, stats["samples"])
    if rej.active:
        per_prompt = stats["samples"] / max(1, (stats.get("rejection") or {}).get("prompts") or 1)
    total = math.ceil(inputs.rows * per_prompt)
    todo = max(0, total - done)
    tok = stats.get("tokens") or {}
    spend = stats.get("spend") or {}
    per_in, per_out = tok.get("input_tokens", 0) / n, tok.get("output_tokens", 0) / n
    per_req = spend.get("requests", n) / n  # without a shared limiter the pilot does not count retries
    pricing = cfg.pricing.model_dump()
    planned_pricing = batch_prices(pricing) if cfg.model.batch.enabled else pricing
    plan = {
        "samples_total": total, "samples_done": done, "samples_planned": todo, "pilot_samples": stats["samples"],
        "pilot_failed": stats["failed"], "pilot_cost_usd": round(cost_usd(tok.get("input_tokens", 0),
                                                                        tok.get("output_tokens", 0), pricing), 6),
        "requests_planned": math.ceil(todo * per_req),
        "input_tokens_planned": round(todo * per_in), "output_tokens_planned": round(todo * per_out),
        "cost_usd_planned": round(cost_usd(todo * per_in, todo * per_out, planned_pricing), 4),
    }
    limits = cfg.rate_limit.per_minute()
    needs = {"requests": plan["requests_planned"], "input_tokens": plan["input_tokens_planned"],
             "output_tokens": plan["output_tokens_planned"],
             "tokens": plan["input_tokens_planned"] + plan["output_tokens_planned"]}
    if limits:
        plan["minutes_at_rate_limits"] = round(max(needs[k] / v for k, v in limits.items()), 1)
    if rej.active:
        say(f"dry run: rejection sampling took {per_prompt:.2f} samples per prompt in the pilot (at most "
            f"{rej.max_samples}): about {total} samples for {inputs.rows} prompts, {done} already done, "
            f"{todo} to generate")
    else:
        say(f"dry run: {total} samples in the input, {done} already done, {todo} to generate")
    say(f"pilot: {stats['samples']} samples ({stats['failed']} failed), {per_in:.0f} input and {per_out:.0f} output "
        f"tokens per sample, {per_req:.2f} requests per sample; it cost ${plan['pilot_cost_usd']:.4f}")
    say(f"planned: {plan['requests_planned']} requests, {plan['input_tokens_planned']} input and "
        f"{plan['output_tokens_planned']} output tokens"
        + (f", about ${plan['cost_usd_planned']:.2f}"
           + (f" at Batch API prices ({pricing['batch_discount']:g} x pricing)" if cfg.model.batch.enabled else "")
           if pricing["input_per_mtok"] or pricing["output_per_mtok"]
           else " (set pricing.* for a cost estimate)"))
    if limits:
        say(f"at the configured rate limits: at least {plan['minutes_at_rate_limits']} minutes")
    b = cfg.budget
    if b.max_cost_usd is not None and plan["cost_usd_planned"] > b.max_cost_usd:
        say(f"note: budget.max_cost_usd={b.max_cost_usd} stops the run before it is done")
    say("nothing was written to the run folder; run without --dry-run to generate")
    return plan
