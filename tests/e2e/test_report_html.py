"""`sft-ray stats RUN --html`: the page is written, and a real headless browser draws every plot."""

from __future__ import annotations

import shutil
import subprocess
import sys

from handmade import episodes, make_run_folder, prompt_samples

from sft_ray.finalize.report_html import COLOURS

BROWSER = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def _hex(colour: str) -> tuple[int, int, int]:
    return tuple(int(colour[i:i + 2], 16) for i in (1, 3, 5))


def test_html_report_renders_its_plots_in_a_browser(tmp_path):
    run = make_run_folder(tmp_path / "run", prompt_samples(n_prompts=30, n=4) + episodes())
    out = subprocess.run([sys.executable, "-m", "sft_ray.cli", "stats", str(run), "--html", "-",
                          "--min-reward", "0.5", "--dedup", "exact"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    page = run / "report.html"
    assert f"report: {page}" in out.stdout
    text = page.read_text()
    for name in COLOURS:
        assert f'id="plot-{name}"' in text, name  # every plot is on the page (this run has episodes and sources)
    assert "<script" not in text and "http" not in text.replace('xmlns="http://www.w3.org/2000/svg"', "")
    assert BROWSER is not None, "no chromium on this machine: the README's test command installs it (apt-get)"
    shot = tmp_path / "shot.png"
    subprocess.run([BROWSER, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                    "--window-size=1240,3000", f"--screenshot={shot}", page.as_uri()],
                   capture_output=True, timeout=120, check=True)
    from PIL import Image

    img = Image.open(shot).convert("RGB")
    counts = dict((rgb, n) for n, rgb in img.getcolors(maxcolors=1 << 20))
    for name, colour in COLOURS.items():
        # the bars of each plot are painted: hundreds of pixels of that plot's own colour
        assert counts.get(_hex(colour), 0) > 200, (name, counts.get(_hex(colour), 0))
