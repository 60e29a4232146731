"""The HTML report: plots render headless, the page is self-contained, user strings are escaped,
estimates and failures are labelled, and the numbers in it are the records' numbers."""

from __future__ import annotations

import base64
import html
import io
import json
import math
import re
import shutil
from html.parser import HTMLParser
from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd
import pytest
from PIL import Image

matplotlib.use("Agg")

from profiler.fits import fits_frame  # noqa: E402
from profiler.records import read_records  # noqa: E402
from profiler.report import (  # noqa: E402
    cell_table,
    cells_frame,
    max_batch_frame,
    max_batch_size,
    memory_budgets,
    render_report,
    summary_frame,
)
from profiler.results import FigureKind, ResultsError, load_results, metric_value  # noqa: E402
from profiler.units import GiB, MiB  # noqa: E402

FIXTURES = Path(__file__).parent / "fixtures"
PLOTS = ("peak_memory", "activation_breakdown", "memory_ratio", "memory_time", "max_batch", "fits", "throughput")
FAILED_MESSAGE = "RuntimeError: checkpoint recomputation saw <2> tensors & expected 3"


def copy_fixture(tmp_path: Path) -> Path:
    for name in ("results.jsonl", "suite.json"):
        shutil.copy(FIXTURES / name, tmp_path / name)
    return tmp_path / "results.jsonl"


HOSTILE_SUITE = "<script>alert(1)</script>"
HOSTILE_METHOD = '<img src=x onerror=alert(2)> $\\alpha$'


def make_hostile(results: Path) -> Path:
    """The suite named, and the lora cells' method renamed, with markup (and mathtext for the plots)."""
    suite = json.loads((results.parent / "suite.json").read_text())
    suite["name"] = HOSTILE_SUITE
    (results.parent / "suite.json").write_text(json.dumps(suite))
    records = read_records(results)
    for record in records:
        if record["params"]["method"] == "lora":
            record["params"]["method"] = HOSTILE_METHOD
            record["cell_id"] = record["cell_id"].replace("lora|", "hostile|")
    results.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    return results


@pytest.fixture(scope="module")
def rendered(tmp_path_factory) -> tuple[Path, str]:
    """One page for the module (plots take seconds): the fixture with the step-time estimates
    records carry (``with_estimated_step_times``) and hostile names (``make_hostile``)."""
    results = make_hostile(with_estimated_step_times(tmp_path_factory.mktemp("results")))
    page = render_report(results, tmp_path_factory.mktemp("report"))
    return page, page.read_text(encoding="utf-8")


def test_report_writes_every_plot_as_png_and_embeds_the_same_bytes(rendered):
    page, text = rendered
    embedded = [base64.b64decode(m) for m in re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', text)]
    assert len(embedded) == len(PLOTS)
    for name in PLOTS:
        png = (page.parent / f"{name}.png").read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n"
        assert png in embedded, name
        # a faceted plot, not an empty canvas: ink on a real share of it, in many colours
        pixels = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
        assert pixels.shape[0] > 300 and pixels.shape[1] > 600, name
        assert (pixels.min(axis=2) < 200).mean() > 0.03, name
        colours = np.unique(pixels.astype(np.uint32) @ np.array([1 << 16, 1 << 8, 1], dtype=np.uint32))
        assert len(colours) > 30, name


def test_report_loads_nothing_from_outside(rendered):
    _, text = rendered
    assert "http://" not in text and "https://" not in text
    targets = []  # every src / href of every tag (the parser's: escaped text holds no attribute)

    class Attributes(HTMLParser):
        def handle_starttag(self, tag, attrs):
            targets.extend(value or "" for name, value in attrs if name in ("src", "href"))

    Attributes().feed(text)
    assert targets, "the page has images and in-page links"
    assert all(t.startswith("data:image/png;base64,") or t.startswith("#") for t in targets), targets
    assert "<script" not in text.lower() and "<link" not in text.lower() and "@import" not in text
    assert "default-src 'none'" in text  # the CSP forbids any fetch


def test_memory_is_in_powers_of_two(rendered):
    _, text = rendered
    visible = re.sub(r"data:image/png;base64,[A-Za-z0-9+/=]+", "", text)
    assert "GiB" in visible
    # decimal GB only beside the same size in GiB (budgets: "24 GiB = 25.8 GB")
    assert re.search(r"\bGB\b", visible)
    assert re.search(r"\bGB\b", re.sub(r"[0-9.]+ GiB = [0-9.]+ GB", "", visible.replace("“24 GB”", ""))) is None


def test_hostile_strings_are_escaped(rendered):
    _, text = rendered
    assert "<script>" not in text and "<img src=x" not in text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in text
    assert "&lt;img src=x onerror=alert(2)&gt;" in text
    assert html.escape(FAILED_MESSAGE) in text


def test_estimated_and_failed_cells_are_labelled(rendered):
    _, text = rendered
    cells = cells_frame(load_results(FIXTURES / "results.jsonl"))
    estimated = cells[cells["model"] == "t5-base"]
    assert estimated["estimated"].all() and (estimated["figures"] == "estimated (meta → cuda)").all()
    assert estimated["panel"].str.endswith("[estimated]").all()
    assert not cells.loc[cells["model"] == "t5-small", "panel"].str.contains("estimated").any()
    # one figures cell per estimated record in the cell tables, plus the summary rows
    assert text.count("<td>estimated (meta → cuda)</td>") == len(estimated) + estimated["method"].nunique()
    failed = cells[cells["status"] == "error"]
    assert len(failed) == 1 and failed["peak_bytes"].isna().all()
    assert text.count(html.escape(FAILED_MESSAGE)) >= 2  # its row in the cell table and the failed list


def test_ratio_against_full_pairs_the_same_grid_point():
    records = read_records(FIXTURES / "results.jsonl")

    def peak(model, method, b, s):
        (r,) = [r for r in records if (r["params"]["model"], r["params"]["method"], r["params"]["batch_size"],
                                       r["params"]["seq_len"]) == (model, method, b, s)]
        return r["memory"]["peak_bytes"]

    cells = cells_frame(load_results(FIXTURES / "results.jsonl"))
    row = cells[(cells["model"] == "t5-base") & (cells["method"] == "wtacrs@0.3") & (cells["batch_size"] == 64)
                & (cells["seq_len"] == 128)].iloc[0]
    assert row["peak_ratio"] == pytest.approx(peak("t5-base", "full", 64, 128) / peak("t5-base", "wtacrs@0.3", 64, 128),
                                              rel=1e-12)
    full = cells[cells["method"] == "full"]
    assert (full["peak_ratio"] == 1.0).all()


def test_max_batch_size_is_linear_in_batch_size():
    static, per_sample = 2 * GiB, GiB // 4  # peak = 2 GiB + B/4 GiB
    sizes = [16, 64]
    peaks = [static + b * per_sample for b in sizes]
    assert max_batch_size(sizes, peaks, 10 * GiB) == (32, False, False)  # between grid points
    assert max_batch_size(sizes, peaks, 24 * GiB) == (88, True, False)  # beyond: extrapolated
    assert max_batch_size(sizes, peaks, 24 * GiB - 1) == (87, True, False)
    assert max_batch_size(sizes, peaks, GiB) == (0, True, False)  # not even B=1 fits
    assert max_batch_size([16], [peaks[0]], 10 * GiB) == (None, False, False)  # a line needs two points
    # piecewise: the segment that brackets the budget is used
    assert max_batch_size([1, 2, 4], [10 * MiB, 20 * MiB, 60 * MiB], 40 * MiB) == (3, False, False)


def test_budgets_come_from_the_suite_in_binary_units():
    default = [80 * GiB, 40 * GiB, 24 * GiB]
    assert memory_budgets(None) == default
    # the runner's budgets are time and a RAM fraction, not memory sizes
    assert memory_budgets({"budgets": {"memory_fraction": 0.6, "cell_seconds": 60, "suite_seconds": 600}}) == default
    # what a suite's budgets.memory_gib puts in suite.json (profiler.suite validates it)
    assert memory_budgets({"budgets": {"memory_fraction": 0.6, "memory_gib": [16.5, 48]}}) == [48 * GiB, int(16.5 * GiB)]
    with pytest.raises(ResultsError, match="'80 GB' is not a memory size in GiB"):
        memory_budgets({"budgets": {"memory_gib": ["80 GB"]}})


@pytest.mark.parametrize("budget", [math.inf, math.nan])
def test_a_memory_budget_must_be_a_finite_size(budget):
    with pytest.raises(ResultsError, match=f"memory budget {budget} is not a memory size"):
        memory_budgets({"budgets": {"memory_gib": [80, budget]}})


@pytest.mark.parametrize("field, value, reason", [
    ("memory", "80 GiB", "memory: expected an object or null, got str"),
    ("throughput", [1.0], "throughput: expected an object or null, got list"),
    ("activations", 12, "activations: expected a list or null, got int"),
    ("activations", [{"operator": "Softmax", "category": "uncompressed", "bytes": 1.5}],
     "activations[0].bytes: expected an integer, got float"),
    ("estimate", {"peak_bytes": "1"}, "estimate.peak_bytes: expected a number or null, got str"),
])
def test_a_record_field_of_the_wrong_type_is_bad_input_and_writes_nothing(tmp_path, field, value, reason):
    results = copy_fixture(tmp_path)
    records = read_records(results)
    records[3][field] = value
    results.write_text("".join(json.dumps(r) + "\n" for r in records))
    with pytest.raises(ResultsError) as info:
        render_report(results, tmp_path / "out")
    assert str(info.value) == f"{results}: record 4: {reason}"
    assert not (tmp_path / "out").exists()


def test_missing_results_file_is_bad_input_and_writes_nothing(tmp_path):
    with pytest.raises(ResultsError, match="no such results file"):
        render_report(tmp_path / "absent.jsonl", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_truncated_last_line_is_ignored_and_retries_replace_earlier_records(tmp_path):
    results = copy_fixture(tmp_path)
    lines = results.read_text().splitlines()
    retry = json.loads(lines[0])
    retry["memory"]["peak_bytes"] += 1
    results.write_text("\n".join([*lines, json.dumps(retry), '{"cell_id": "cut']))
    loaded = load_results(results)
    assert len(loaded.records) == len(lines)
    (first,) = [r for r in loaded.records if r["cell_id"] == retry["cell_id"]]
    assert first["memory"]["peak_bytes"] == retry["memory"]["peak_bytes"]


def _mixed_kinds(tmp_path: Path, estimate: dict | None) -> tuple[Path, dict, dict]:
    """The fixture with full at (t5-small, B=64, S=128) turned into a cuda estimate, next to a
    wtacrs@0.3 cell measured on the CPU (carrying ``estimate`` when given)."""
    results = copy_fixture(tmp_path)
    records = read_records(results)
    at = {"model": "t5-small", "batch_size": 64, "seq_len": 128}
    full, method = (next(r for r in records if r["params"]["method"] == m
                         and all(r["params"][k] == v for k, v in at.items())) for m in ("full", "wtacrs@0.3"))
    full.update(status="estimated", device="meta", models_device="cuda", throughput=None)
    full["memory"]["peak_bytes"] = 7 * GiB
    if estimate is not None:
        method["estimate"] = estimate
    results.write_text("".join(json.dumps(r) + "\n" for r in records))
    return results, full, method


def test_a_ratio_never_mixes_measured_and_estimated_figures(tmp_path):
    results, full, method = _mixed_kinds(tmp_path, None)
    cells = cells_frame(load_results(results))
    row = cells[cells["cell_id"] == method["cell_id"]].iloc[0]
    assert pd.isna(row["peak_ratio"]) and pd.isna(row["activation_ratio"])
    # with the meta estimate the cpu run was planned from, the ratio is one of two estimates
    results, full, method = _mixed_kinds(tmp_path, {"peak_bytes": 2 * GiB, "activation_bytes": GiB,
                                                    "models_device": "cuda", "flops": 1, "cpu_seconds": 1.0})
    cells = cells_frame(load_results(results))
    row = cells[cells["cell_id"] == method["cell_id"]].iloc[0]
    assert row["peak_ratio"] == 3.5 and row["ratio_estimated"] and row["ratio_figures"] is FigureKind.ESTIMATED_CUDA
    full_activations = sum(item["bytes"] for item in full["activations"])
    assert row["activation_ratio"] == pytest.approx(full_activations / GiB, rel=1e-12)
    assert "3.50× (estimates)" in set(cell_table(cells[cells["cell_id"] == method["cell_id"]])["peak: full ÷ method"])


def test_activation_bytes_are_everything_saved_for_backward_not_the_part_alive_at_the_peak():
    record = {"status": "ok", "params": {}, "memory": {"peak_bytes": 10, "categories": {"activations": 4624}},
              "activations": [{"operator": "Linear-Q", "category": "uncompressed", "bytes": 1_000_000},
                              {"operator": "Softmax", "category": "uncompressed", "bytes": 320_000}]}
    assert metric_value(record, "activation_bytes") == 1_320_000
    assert metric_value({**record, "activations": None}, "activation_bytes") == 4624


def test_a_flat_peak_extrapolates_at_the_activations_slope():
    # the peak falls in the optimizer step (flat in B) on the grid; beyond it the activations,
    # 1/64 GiB per sample here, take over: the flat segment alone would give an absurd B
    sizes, peaks = [16, 32, 64], [13 * GiB, 13 * GiB + MiB, 13 * GiB + 2 * MiB]
    b, extrapolated, capped = max_batch_size(sizes, peaks, 80 * GiB, min_slope=GiB / 64, max_factor=None)
    assert extrapolated and not capped and b == 64 + math.floor((67 * GiB - 2 * MiB) / (GiB / 64))
    assert max_batch_size(sizes, peaks, 80 * GiB, min_slope=0, max_factor=None)[0] > 10**6  # what it guards against
    assert max_batch_size(sizes, peaks, 80 * GiB, min_slope=GiB / 64) == (128, True, True)  # 2x the grid at most


# ---------------------------------------------------------------------------------------------
# Step time against full, the trade-off plot, the fits matrix, checks on the page

SLOWDOWN = {"full": 1.0, "lora": 0.75, "checkpointing": 1.33, "wtacrs@0.3": 0.8, "wtacrs-linear@0.3": 0.85,
            "lora+wtacrs@0.3": 0.6}


def with_estimated_step_times(tmp_path: Path, target: str = "a100-80gb") -> Path:
    """The fixture with estimated step times on its t5-base (meta) cells, as records carry them
    since step-time estimates: ``throughput.kind`` / ``target``; t5-small keeps its measured
    throughput without ``kind`` (records of before)."""
    results = copy_fixture(tmp_path)
    records = read_records(results)
    for record in records:
        if record["status"] == "estimated":
            p = record["params"]
            seconds = 1e-3 * p["batch_size"] * SLOWDOWN[p["method"]]
            record["throughput"] = {"step_time_s": seconds, "kind": "estimated", "target": target,
                                    "tokens_per_s": p["batch_size"] * p["seq_len"] / seconds,
                                    "samples_per_s": p["batch_size"] / seconds, "timed_steps": 0,
                                    "flops": 10**12, "bytes_moved": 10**9, "estimate_over_measured": None}
            record["memory"]["peak_phase"] = "backward"
    results.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    return results


def test_step_time_ratio_is_the_method_over_full_and_labelled_estimated(tmp_path):
    cells = cells_frame(load_results(with_estimated_step_times(tmp_path)))
    base = cells[cells["model"] == "t5-base"].set_index(["method", "batch_size", "seq_len"])
    for method, slowdown in SLOWDOWN.items():
        assert base.loc[(method, 64, 128), "time_ratio"] == pytest.approx(slowdown, rel=1e-12)
        assert base.loc[(method, 64, 128), "time_ratio_estimated"]
        assert base.loc[(method, 64, 128), "step_time_target"] == "a100-80gb"
    # the measured CPU cells (throughput without "kind") are measured, on the record's device
    small = cells[(cells["model"] == "t5-small") & cells["step_time_s"].notna()]
    assert (small["step_time_kind"] == "measured").all() and (small["step_time_target"] == "cpu").all()
    records = {(r["params"]["model"], r["params"]["method"], r["params"]["batch_size"], r["params"]["seq_len"]): r
               for r in read_records(FIXTURES / "results.jsonl")}
    row = small[(small["method"] == "lora") & (small["batch_size"] == 16) & (small["seq_len"] == 128)].iloc[0]
    expected = (records[("t5-small", "lora", 16, 128)]["throughput"]["step_time_s"]
                / records[("t5-small", "full", 16, 128)]["throughput"]["step_time_s"])
    assert row["time_ratio"] == pytest.approx(expected, rel=1e-12) and not row["time_ratio_estimated"]
    summary = summary_frame(cells).set_index(["model", "method"])
    assert summary.loc[("t5-base", "checkpointing"), "step time: method ÷ full"] == "1.33× (estimated)"
    assert "(estimated)" not in summary.loc[("t5-small", "lora"), "step time: method ÷ full"]


def test_step_times_of_different_targets_make_no_ratio(tmp_path):
    results = with_estimated_step_times(tmp_path)
    records = read_records(results)
    for record in records:
        if record["params"]["method"] == "full" and record["status"] == "estimated":
            record["throughput"]["target"] = "h100-80gb"
    results.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    cells = cells_frame(load_results(results))
    base = cells[(cells["model"] == "t5-base") & (cells["method"] != "full")]
    assert base["step_time_s"].notna().all() and base["time_ratio"].isna().all()


def test_a_record_without_throughput_has_no_step_time():
    cells = cells_frame(load_results(FIXTURES / "results.jsonl"))
    base = cells[cells["model"] == "t5-base"]
    assert base["step_time_s"].isna().all() and base["time_ratio"].isna().all()
    assert base["step_time_kind"].isna().all()


def test_trade_off_plot_has_a_point_per_method_and_batch_size(tmp_path):
    from profiler import plots

    cells = cells_frame(load_results(with_estimated_step_times(tmp_path)))
    figure = plots.memory_time(cells)
    drawn = cells.dropna(subset=["peak_bytes", "step_time_s"])
    for panel, ax in zip(plots._present(drawn["panel"]), figure.axes):
        in_panel = drawn[drawn["panel"] == panel]
        points = sum(len(c.get_offsets()) for c in ax.collections)
        assert points == len(in_panel)  # one marker per cell with both figures
        assert len(ax.lines) == in_panel["method"].nunique()  # one line per method
        unit = 2**30 if drawn["peak_bytes"].max() >= 2**30 else 2**20
        ys = sorted(y for c in ax.collections for _, y in c.get_offsets())
        assert ys == pytest.approx(sorted(in_panel["peak_bytes"] / unit))
    plots.plt.close(figure)


def test_extrapolated_and_capped_batch_limits_are_marked_in_the_png_data():
    cells = cells_frame(load_results(FIXTURES / "results.jsonl"))
    frame = max_batch_frame(cells, [80 * GiB, 24 * GiB])
    grid_max = cells["batch_size"].max()
    capped = frame[frame["capped"]]
    assert not capped.empty and (capped["max_batch_size"] == 2 * grid_max).all() and capped["extrapolated"].all()
    assert (frame["max_batch_size"] <= 2 * grid_max).all()
    from profiler import plots

    figure = plots.max_batch(frame)
    hatched = [bar for ax in figure.axes for c in ax.containers for bar in c if "x" in (bar.get_hatch() or "")]
    assert len(hatched) == int(frame["extrapolated"].sum())
    labels = [t.get_text() for ax in figure.axes for t in ax.texts]
    assert sum(label.startswith("≥") for label in labels) == len(capped)
    legend = [t.get_text() for t in figure.legends[0].get_texts()]
    assert "extrapolated beyond the grid" in legend
    plots.plt.close(figure)


def test_the_page_shows_checks_fits_step_times_and_grey_notes(rendered, tmp_path):
    from profiler.check import check_bound, parse_checks

    _, text = rendered
    results = load_results(with_estimated_step_times(tmp_path))  # the checks do not read the hostile names
    outcomes = [check_bound(c, results) for c in parse_checks(results)]
    assert '<table class="dataframe checks">' in text
    for outcome in outcomes:  # one row per check, classed by its verdict, with the measured span
        assert f'<tr class="{outcome.result.value}">' in text
        assert html.escape(outcome.measured) in text
    assert '"checks": [' not in text  # no JSON blob of the checks in the suite table
    assert "Fits within 80 GiB = 85.9 GB (table)" in text and "does not fit" in text
    assert "peak × 1.1 + 0.5 GiB" in text  # the margin, stated
    assert "1.33× (estimated)" in text and "(in the backward)" in text
    assert "counted once, under the operator whose autograd node comes first" in text
    # notes grey, the messages of failed cells red
    assert re.search(r"table\.cells td:last-child \{[^}]*color: #5f6b76", text)
    assert '<tr class="failed">' in text


def _parallel_results(tmp_path: Path, world_sizes: tuple[int, ...]) -> Path:
    """The fixture's full and lora cells of t5-small (B=16, S=128) as FSDP estimates, one per
    world size: per-GPU peak = the peak / world size, no activation list, per-rank figures."""
    records = read_records(FIXTURES / "results.jsonl")
    base = [r for r in records if r["cell_id"].startswith("t5-small/") and r["cell_id"].endswith("/B16-S128-T128-D512-H8")
            and r["params"]["method"] in ("full", "lora")]
    out = []
    for record, world_size in ((r, w) for r in base for w in world_sizes):
        peak = record["memory"]["peak_bytes"] // world_size
        out.append({**record, "cell_id": f"{record['cell_id']}-fsdp{world_size}", "status": "estimated",
                    "device": "meta", "models_device": "cuda", "activations": None,
                    "params": {**record["params"], "strategy": "fsdp", "world_size": world_size},
                    "memory": {**record["memory"], "peak_bytes": peak},
                    "parallel": {"strategy": "fsdp", "world_size": world_size,
                                 "ranks": [{"rank": 0, "peak_bytes": peak, "breakdown": {"Sharded Param": peak}}]}})
    (tmp_path / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in out))
    suite = {"name": "t5-fsdp-fixture", "budgets": {"memory_gib": [80, 1]}, "cells": [r["cell_id"] for r in out],
             "checks": [{"metric": "peak_bytes", "numerator": "full", "denominator": "lora", "min": 1.0, "max": None,
                         "where": {}}]}
    (tmp_path / "suite.json").write_text(json.dumps(suite))
    return tmp_path / "results.jsonl"


@pytest.mark.parametrize("world_sizes", [(1, 8), (8,)])
def test_per_gpu_peak_against_world_size_is_plotted_only_for_two_or_more_world_sizes(tmp_path, world_sizes):
    from profiler.check import run_check
    from rich.console import Console

    results = _parallel_results(tmp_path, world_sizes)
    text = render_report(results, tmp_path / "out").read_text(encoding="utf-8")
    png = tmp_path / "out" / "per_gpu_peak.png"
    assert ("Per-GPU peak against world size" in text) == (len(world_sizes) > 1) == png.exists()
    assert "fitted on their per-GPU memory" in text
    if png.exists():
        embedded = [base64.b64decode(m) for m in re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', text)]
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.read_bytes() in embedded
    # records with no activation list: each world size its own panel of the fits, on the per-GPU peak
    cells = cells_frame(load_results(results))
    fit = fits_frame(cells, [GiB])
    assert sorted(zip(fit["panel"], fit["method"], fit["fits"])) == sorted(
        (f"t5-small · S=128{f' · GPUs={w}' if len(world_sizes) > 1 else ''} [estimated]", m, w == 8)
        for w in world_sizes for m in ("full", "lora"))
    assert run_check(results, console=Console(file=io.StringIO(), width=200)) == 0
