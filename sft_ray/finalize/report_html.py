"""`sft-ray stats RUN --html`: a one-page report with plots, from stats.json's numbers.

Plots are inline SVG written here (bars only), so the page needs no JavaScript, no network
and no plotting library: it opens in any browser, offline, and is a single file to share.
"""

from __future__ import annotations

import html
import json
from typing import Any

from sft_ray.finalize.stats import format_report, unexpected_lines

# One colour per plot (a test finds each in a screenshot taken by a real browser).
COLOURS = {"reward": "#1f77b4", "sources": "#2ca02c", "lengths": "#ff7f0e", "drops": "#d62728",
           "prompts": "#9467bd", "model_calls": "#8c564b", "tool_calls": "#e377c2", "decontamination": "#7f7f7f"}
# Plots a run's report has beside stats.json's (a folder re-cut by hand has no run timing).
RUN_COLOURS = {"breakdown": "#17becf"}
LABEL_CHARS = 18  # the longest label drawn under a bar; longer ones are cut (the full one is the bar's tooltip)


def cut(label: str, n: int) -> str:
    """``label`` cut to ``n`` characters with an ellipsis."""
    return label if len(label) <= n else label[:max(1, n - 1)] + "\u2026"


def bar_chart(name: str, title: str, labels: list[str], values: list[float], value_fmt: str = "{:g}") -> str:
    """A vertical bar chart as an <svg> element."""
    w, h, pad, top = 560, 250, 50, 40
    n = max(1, len(values))
    peak = max(values, default=0) or 1
    bw = (w - 2 * pad) / n
    parts = [f'<svg class="plot" id="plot-{name}" xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h + 60}" '
             f'role="img" aria-label="{html.escape(title)}">',
             f'<text x="{w / 2}" y="16" text-anchor="middle" font-size="14">{html.escape(title)}</text>',
             f'<line x1="{pad}" y1="{h}" x2="{w - pad}" y2="{h}" stroke="#333"/>']
    for i, (label, v) in enumerate(zip(labels, values)):
        bh = (h - top) * (v / peak)
        x = pad + i * bw
        parts.append(f'<rect class="bar" x="{x + 2:.1f}" y="{h - bh:.1f}" width="{max(1.0, bw - 4):.1f}" '
                     f'height="{bh:.1f}" fill="{COLOURS.get(name) or RUN_COLOURS[name]}"><title>{html.escape(label)}: '
                     f'{value_fmt.format(v)}</title></rect>')
        parts.append(f'<text x="{x + bw / 2:.1f}" y="{h - bh - 3:.1f}" text-anchor="middle" font-size="10">'
                     f'{value_fmt.format(v)}</text>')
        # Rotated labels stack along the axis: each gets at most what its bar's width holds (rotated,
        # about 1.4 characters of 10 px text per 10 px of width) and LABEL_CHARS, so none overlaps the next.
        fit = max(2, min(LABEL_CHARS, int(bw * 1.4 / 6)))
        parts.append(f'<text class="label" x="{x + bw / 2:.1f}" y="{h + 14}" text-anchor="end" font-size="10" '
                     f'transform="rotate(-35 {x + bw / 2:.1f} {h + 14})">{html.escape(cut(label, fit))}</text>')
    parts.append("</svg>")
    return "".join(parts)


def _hist(name: str, title: str, hist: dict[str, list[float]]) -> str:
    edges, counts = hist.get("edges") or [], hist.get("counts") or []
    labels = [f"{lo:g}-{hi:g}" for lo, hi in zip(edges, edges[1:])]
    return bar_chart(name, title, labels, [float(c) for c in counts])


_STYLE = ("body{font-family:sans-serif;margin:24px;max-width:1200px}pre{background:#f6f6f6;padding:12px;"
          "white-space:pre-wrap;overflow-wrap:anywhere}.warning{background:#fde8e8;border-left:4px solid #d62728}"
          ".plots{display:flex;flex-wrap:wrap;gap:16px}.top{display:flex;flex-wrap:wrap;gap:24px;font-size:18px;"
          "padding:8px 0}.top div{min-width:140px}.top b{display:block;font-size:12px;color:#555}"
          "table.samples{border-collapse:collapse;table-layout:fixed;width:100%}table.samples td,table.samples th"
          "{border:1px solid #ccc;padding:4px;vertical-align:top;overflow-wrap:anywhere;white-space:pre-wrap;"
          "font-size:12px;text-align:left}details{margin:8px 0}")


def _fmt_s(seconds: float | None) -> str:
    if seconds is None:
        return "not known yet"
    s = int(seconds)
    return f"{s // 3600}h {s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m {s % 60:02d}s"


def progress_header(doc: dict[str, Any]) -> str:
    """Progress, ETA and spend on top (a progress.json document, live or final)."""
    spend = doc.get("spend") or {}
    done, expected = doc.get("done") or 0, doc.get("expected") or 0
    pct = f" ({100 * done / expected:.1f}%)" if expected else ""
    cells = [("done", f"{done} / {expected}{pct}"), ("failed", str(doc.get("failed") or 0)),
             ("rate", f"{doc.get('rate_per_s') or 0:.2f} /s"), ("ETA", _fmt_s(doc.get("eta_s"))),
             ("spend", f"${float(spend.get('usd') or 0):.4f}"),
             ("tokens in / out", f"{spend.get('input_tokens') or 0} / {spend.get('output_tokens') or 0}")]
    state = "final" if doc.get("final") else f"live, updated {doc.get('updated_at', '')}"
    out = [f'<div class="top" id="progress" data-state="{"final" if doc.get("final") else "live"}">']
    out += [f"<div><b>{html.escape(k)}</b>{html.escape(v)}</div>" for k, v in cells]
    out.append(f"<div><b>report</b>{html.escape(state)}</div></div>")
    if doc.get("advice"):
        out.append(f'<p id="advice">{html.escape(doc["advice"])}</p>')
    if doc.get("errors"):
        out.append("<p>errors: " + html.escape(", ".join(f"{k}={v}" for k, v in doc["errors"].items())) + "</p>")
    return "".join(out)


def breakdown_chart(breakdown: dict[str, float]) -> str:
    """stats.json ``timing.breakdown`` as bars (seconds summed over concurrent calls), with the wall."""
    parts = {k: float(v) for k, v in breakdown.items() if k != "wall_s"}
    if not any(parts.values()):
        return ""
    return bar_chart("breakdown", f"Where the time goes (seconds, summed over concurrent calls; wall "
                     f"{float(breakdown.get('wall_s') or 0):.1f} s)", list(parts), list(parts.values()), "{:.1f}")


def _field(row: dict[str, Any], key: str) -> str:
    v = row.get(key)
    return v if isinstance(v, str) else json.dumps(v, ensure_ascii=False, default=str)


def _prompt_text(row: dict[str, Any]) -> str:
    msgs = [m for m in row.get("messages") or [] if isinstance(m, dict) and m.get("role") in ("system", "user")]
    return "\n".join(f"[{m.get('role')}] {m.get('content') if isinstance(m.get('content'), str) else json.dumps(m.get('content'), default=str)}" for m in msgs)


def _tool_turns(row: dict[str, Any]) -> str:
    """An episode's tool calls and results, in order."""
    out = []
    for m in row.get("messages") or []:
        if not isinstance(m, dict):
            continue
        for call in m.get("tool_calls") or []:
            fn = (call or {}).get("function") or {}
            out.append(f"call {fn.get('name')}({fn.get('arguments')})")
        if m.get("role") == "tool":
            out.append(f"result: {m.get('content')}")
    return "\n".join(out)


SAMPLE_CHARS = 2000  # of each field shown; the rest is cut


def samples_section(samples: dict[str, list[dict[str, Any]]]) -> str:
    """A few rows of each kind (kept, each drop reason): prompt, response, reward and metrics, an
    episode's tool calls and results. All of it is model or input text: escaped, never markup."""
    if not samples:
        return ""
    out = ['<h2>Samples</h2><div id="samples">']
    for kind, rows in samples.items():
        out.append(f'<details open><summary>{html.escape(kind)} ({len(rows)} shown)</summary>'
                   '<table class="samples"><tr><th style="width:30%">prompt</th><th style="width:40%">response</th>'
                   '<th>reward and metrics</th></tr>')
        for row in rows:
            metrics = {k: v for k, v in row.items() if k in ("reward", "finish_reason", "error") or
                       (isinstance(v, (int, float)) and k.startswith(("num_", "judge_", "accuracy")))}
            tools = _tool_turns(row)
            response = (row.get("response") or "") + (f"\n--- tool calls ---\n{tools}" if tools else "")
            cells = [_prompt_text(row), response, json.dumps(metrics, ensure_ascii=False, default=str)]
            out.append("<tr>" + "".join(f"<td>{html.escape(c[:SAMPLE_CHARS])}</td>" for c in cells) + "</tr>")
        out.append("</table></details>")
    out.append("</div>")
    return "".join(out)


def _page(title: str, body: str) -> str:
    return ("<!doctype html>\n<html><head><meta charset=\"utf-8\"><title>" + html.escape(title) + "</title>"
            f"<style>{_STYLE}</style></head><body><h1>{html.escape(title)}</h1>{body}</body></html>\n")


def render_live(doc: dict[str, Any], rewards: list[float], recent: dict[str, list[str]],
                title: str = "sft-ray run") -> str:
    """The live report: progress, ETA, spend, where the time goes, this session's rewards, recent rows."""
    plots = [breakdown_chart((doc.get("timing") or {}).get("breakdown") or {})]
    if rewards:
        edges = [i / 10 for i in range(11)]
        lo, hi = min(min(rewards), 0.0), max(max(rewards), 1.0)
        edges = [lo + (hi - lo) * i / 10 for i in range(11)]
        counts = [0] * 10
        for r in rewards:
            counts[min(9, int((r - lo) / (hi - lo) * 10))] += 1
        plots.append(_hist("reward", "Reward histogram (this session, so far)", {"edges": edges, "counts": counts}))
    import orjson

    samples = {kind: [orjson.loads(t) for t in rows] for kind, rows in recent.items()}
    return _page(title + " (live)", progress_header(doc) + f'<div class="plots">{"".join(plots)}</div>'
                 + samples_section(samples))


def render(stats: dict[str, Any], title: str = "sft-ray run") -> str:
    """The report as one HTML page."""
    plots = []
    if (stats.get("reward") or {}).get("histogram"):
        plots.append(_hist("reward", "Reward histogram", stats["reward"]["histogram"]))
    sources = stats.get("sources") or {}
    if sources:
        plots.append(bar_chart("sources", "Pass rate per source (share of successful samples kept)",
                               list(sources), [s["pass_rate"] for s in sources.values()], "{:.2f}"))
    lengths = (stats.get("lengths") or {}).get("output_tokens_histogram")
    if lengths and lengths.get("counts"):
        plots.append(_hist("lengths", "Output tokens per sample", lengths))
    drops = stats.get("drops_by_reason") or {}
    if drops:
        plots.append(bar_chart("drops", "Samples dropped, by reason", list(drops), [float(v) for v in drops.values()]))
    benchmarks = (stats.get("decontamination") or {}).get("benchmarks")
    if benchmarks:
        plots.append(bar_chart("decontamination", "Benchmark text found: prompts held back + rows dropped",
                               list(benchmarks), [float(b["prompts_matched"] + b["rows_dropped"])
                                                  for b in benchmarks.values()]))
    prompts = stats.get("prompts")
    if prompts:
        plots.append(_hist("prompts", "Mean reward per prompt", prompts["mean_reward_per_prompt"]["histogram"]))
    episodes = stats.get("episodes")
    if episodes:
        for key, label in (("model_calls", "Model calls per episode"), ("tool_calls", "Tool calls per episode")):
            hist = episodes[f"{key}_histogram"]
            plots.append(bar_chart(key, label, list(hist), [float(v) for v in hist.values()]))
    breakdown = breakdown_chart((stats.get("timing") or {}).get("breakdown") or {})
    if breakdown:
        plots.append(breakdown)
    summary = html.escape(format_report(stats))
    odd = unexpected_lines(stats)  # rows none of the run's: named first, where a reader looks
    warning = f'<pre class="warning" id="unexpected-rows">{html.escape(chr(10).join(odd))}</pre>' if odd else ""
    header = progress_header(final_progress(stats)) if stats.get("expected") is not None else ""
    return _page(title, f"{header}{warning}<pre>{summary}</pre><div class=\"plots\">{''.join(plots)}</div>"
                 + samples_section(stats.get("sample_rows") or {}))


def final_progress(stats: dict[str, Any]) -> dict[str, Any]:
    """The progress.json document of a finished run, from stats.json's numbers."""
    import datetime

    from sft_ray.metrics import advice

    spend, tokens, timing = stats.get("spend") or {}, stats.get("tokens") or {}, stats.get("timing") or {}
    return {
        "done": stats.get("done", stats.get("samples", 0)), "expected": stats.get("expected"),
        "failed": stats.get("failed", 0), "unit": "samples",
        "rate_per_s": round((stats.get("throughput") or {}).get("samples_per_s", 0.0), 3),
        "eta_s": 0.0 if stats.get("complete") else None,
        "spend": {"usd": spend.get("billed_usd", spend.get("cost_usd", 0.0)),
                  "input_tokens": int(tokens.get("input_tokens") or 0),
                  "output_tokens": int(tokens.get("output_tokens") or 0), "requests": spend.get("requests")},
        "errors": dict(stats.get("errors_by_type") or {}), "timing": timing,
        "advice": advice(timing.get("breakdown") or {}), "complete": bool(stats.get("complete")),
        "updated_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds").replace(
            "+00:00", "Z"),
        "final": True,
    }
