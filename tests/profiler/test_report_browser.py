"""The fixture report in headless Chromium: the page renders offline into a screenshot with
plots and tables in it (skipped where no Chromium is installed)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from profiler.report import render_report

FIXTURES = Path(__file__).parent / "fixtures"
BROWSER = next((shutil.which(b) for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)), None)
WIDTH, HEIGHT = 1400, 3000


@pytest.mark.skipif(BROWSER is None, reason="no chromium on PATH")
def test_report_screenshot_shows_plots_and_tables(tmp_path):
    page = render_report(FIXTURES / "results.jsonl", tmp_path / "report")
    shot = tmp_path / "shot.png"
    profile = tmp_path / "profile"
    command = [BROWSER, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync",
               f"--user-data-dir={profile}", f"--screenshot={shot}", f"--window-size={WIDTH},{HEIGHT}",
               page.resolve().as_uri()]
    subprocess.run(command, check=True, timeout=120, capture_output=True)

    pixels = np.asarray(Image.open(shot).convert("RGB"))
    assert pixels.shape == (HEIGHT, WIDTH, 3)
    background = np.all(pixels >= 240, axis=2)
    # the page is not blank: text, tables and plot lines cover a real share of it ...
    assert 0.03 < 1 - background.mean() < 0.6
    # ... down the whole first screen (the summary table, then the peak memory and breakdown plots)
    ink_per_band = [(1 - background[top:top + 500]).mean() for top in range(0, HEIGHT, 500)]
    assert min(ink_per_band) > 0.01, ink_per_band
    # plots bring colour: many distinct saturated pixels (the method palette, the operator stacks)
    saturated = pixels[(pixels.max(axis=2).astype(int) - pixels.min(axis=2)) > 60]
    assert len(saturated) > 20_000
    assert len(np.unique(saturated // 16, axis=0)) > 40
