"""sft_ray/finalize/report_html.py in process: the report's sample rows are escaped, long bar labels
are cut (the browser test of the whole page is e2e/test_report_html.py)."""

from __future__ import annotations

import re


def test_report_shows_sample_rows_escaped_and_cuts_long_labels():
    from sft_ray.finalize.report_html import LABEL_CHARS, bar_chart, samples_section

    hostile = '<script>alert(1)</script><img src=x onerror="alert(2)">'
    row = {"id": "p1", "sample_index": 0, "reward": 0.0, "response": hostile, "num_tool_calls": 1,
           "messages": [{"role": "user", "content": hostile},
                        {"role": "assistant", "content": "", "tool_calls": [
                            {"function": {"name": "run</td>", "arguments": hostile}}]},
                        {"role": "tool", "content": hostile}, {"role": "assistant", "content": hostile}]}
    page = samples_section({"kept": [], "below_min_reward": [row]})
    assert "<script>" not in page and "<img" not in page and "run</td>" not in page
    assert "&lt;script&gt;" in page and "call run&lt;/td&gt;" in page and "below_min_reward" in page
    labels = [f"a very long source file name number {i}.jsonl" for i in range(30)]
    svg = bar_chart("drops", "t", labels, [1.0] * 30)
    drawn = re.findall(r'<text class="label"[^>]*>([^<]*)</text>', svg)
    assert len(drawn) == 30 and all(len(d) <= LABEL_CHARS for d in drawn)
    # 30 bars over 460 px: ~15 px each, so each rotated label is cut to what its width holds
    assert max(len(d) for d in drawn) <= 4, drawn[:3]
    assert all(f"<title>{label}: 1</title>" in svg for label in labels)  # the full label is the tooltip
