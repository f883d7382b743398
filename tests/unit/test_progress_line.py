"""The progress line a log (not a terminal) gets: samples, rate, then what else is known, no empty field."""

from __future__ import annotations

import io as stdio

from sft_ray.driver import Progress


def test_a_progress_line_before_any_batch_is_written_has_no_dangling_separator():
    out = stdio.StringIO()
    progress = Progress(10, out=out)
    progress.advance(3)  # the actors finished 3 samples; nothing written yet, so nothing else is known
    line = out.getvalue().strip()
    assert line.startswith("[sft-ray] 3/10 samples (30.0%), ") and line.endswith(" samples/s"), line
    progress.update(0, 10, 1, 0.5)  # the last batch written: failures and reward join the line
    last = out.getvalue().strip().splitlines()[-1]
    assert last.startswith("[sft-ray] 10/10 samples (100.0%), ") and last.endswith("samples/s, failed 1, reward 0.500")
