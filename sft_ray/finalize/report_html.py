"""`sft-ray stats RUN --html`: a one-page report with plots, from stats.json's numbers.

Plots are inline SVG written here (bars only), so the page needs no JavaScript, no network
and no plotting library: it opens in any browser, offline, and is a single file to share.
"""

from __future__ import annotations

import html
from typing import Any

from sft_ray.finalize.stats import format_report, unexpected_lines

# One colour per plot (a test finds each in a screenshot taken by a real browser).
COLOURS = {"reward": "#1f77b4", "sources": "#2ca02c", "lengths": "#ff7f0e", "drops": "#d62728",
           "prompts": "#9467bd", "model_calls": "#8c564b", "tool_calls": "#e377c2", "decontamination": "#7f7f7f"}


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
                     f'height="{bh:.1f}" fill="{COLOURS[name]}"><title>{html.escape(label)}: '
                     f'{value_fmt.format(v)}</title></rect>')
        parts.append(f'<text x="{x + bw / 2:.1f}" y="{h - bh - 3:.1f}" text-anchor="middle" font-size="10">'
                     f'{value_fmt.format(v)}</text>')
        parts.append(f'<text x="{x + bw / 2:.1f}" y="{h + 14}" text-anchor="end" font-size="10" '
                     f'transform="rotate(-35 {x + bw / 2:.1f} {h + 14})">{html.escape(label)}</text>')
    parts.append("</svg>")
    return "".join(parts)


def _hist(name: str, title: str, hist: dict[str, list[float]]) -> str:
    edges, counts = hist.get("edges") or [], hist.get("counts") or []
    labels = [f"{lo:g}-{hi:g}" for lo, hi in zip(edges, edges[1:])]
    return bar_chart(name, title, labels, [float(c) for c in counts])


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
    summary = html.escape(format_report(stats))
    odd = unexpected_lines(stats)  # rows none of the run's: named first, where a reader looks
    warning = f'<pre class="warning" id="unexpected-rows">{html.escape(chr(10).join(odd))}</pre>' if odd else ""
    return (
        "<!doctype html>\n<html><head><meta charset=\"utf-8\"><title>" + html.escape(title) + "</title>"
        "<style>body{font-family:sans-serif;margin:24px;max-width:1200px}pre{background:#f6f6f6;padding:12px;"
        "white-space:pre-wrap}.warning{background:#fde8e8;border-left:4px solid #d62728}.plots{display:flex;flex-wrap:wrap;gap:16px}</style></head><body>"
        f"<h1>{html.escape(title)}</h1>{warning}<pre>{summary}</pre><div class=\"plots\">{''.join(plots)}</div>"
        "</body></html>\n"
    )
