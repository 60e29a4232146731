"""The HTML report of a results file: ``render_report(results.jsonl) -> report.html``.

The report reads results (``profiler.results``: the records and the ``suite.json`` the runner
writes beside them) and nothing else. Its data side (``cells_frame``, ``breakdown_frame``,
``max_batch_frame``, ``summary_frame``) is plain pandas; the figures are drawn from those frames by
``profiler.plots``; this module turns both into one self-contained page:

- no external asset or URL: CSS is inline, PNGs are ``data:`` URIs, and a Content-Security-Policy
  forbids the page from loading anything else;
- every user string (suite, model and method names, messages, config values, host names) is
  HTML-escaped, by pandas' ``to_html(escape=True)`` or ``html.escape``;
- estimated figures (status ``estimated``, the meta device) are labelled as such in every table
  column, panel title and plot style that shows them.
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from profiler.records import MEMORY_CATEGORIES
from profiler.results import (
    BASELINE_METHOD,
    FIGURE_STATUSES,
    GRID_ORDER,
    SHORT_NAMES,
    Results,
    ResultsError,
    comparable,
    grid_key,
    grid_point,
    load_results,
    method_of,
    metric_value,
    record_kind,
    step_time,
)
from profiler.units import GiB, byte_unit, format_bytes, format_count, in_unit

DEFAULT_BUDGETS_GIB = (80.0, 40.0, 24.0)
PAGE_NAME = "report.html"


# ---------------------------------------------------------------------------------------------
# Frames


def method_order(results: Results) -> list[str]:
    """Methods in suite order (else first-seen order), ``full`` first."""
    seen: list[str] = []
    suite_methods = (results.suite or {}).get("methods")
    if isinstance(suite_methods, list):
        seen += [str(m if not isinstance(m, dict) else m.get("name", m)) for m in suite_methods]
    for record in results.records:
        if method_of(record) not in seen:
            seen.append(method_of(record))
    if BASELINE_METHOD in seen:
        seen.remove(BASELINE_METHOD)
        seen.insert(0, BASELINE_METHOD)
    return seen


def cells_frame(results: Results) -> pd.DataFrame:
    """One row per cell: the grid parameters, status, figures in bytes and ratios vs ``full``.

    Columns: every ``params`` key, ``device``, ``models_device``, ``status``, ``message``,
    ``estimated`` (bool), ``figures`` (label), ``peak_bytes``, ``activation_bytes``,
    ``tokens_per_s``, ``samples_per_s``, the step time columns of ``results.step_time``
    (``step_time_s``, ``step_time_kind``, ``step_time_target``, ``estimate_over_measured``),
    ``peak_ratio`` and ``activation_ratio``
    (full's figure over this cell's, at the same grid point, from figures of the same kind; see
    ``comparable``), ``ratio_figures`` (that ``FigureKind``, or None), ``ratio_estimated`` (bool), ``panel`` (the
    facet label: model and every varying grid parameter but batch size and method), ``cell_id``,
    ``key``.
    """
    rows = []
    for record in results.records:
        ok = record.get("status") in FIGURE_STATUSES
        throughput = record.get("throughput") or {}
        row = dict(record["params"])
        row.update(
            cell_id=record.get("cell_id"),
            device=record.get("device"),
            models_device=record.get("models_device") or record.get("device"),
            status=record.get("status"),
            message=record.get("message") or "",
            estimated=record.get("status") == "estimated",
            figures=kind.label if (kind := record_kind(record)) is not None else "—",
            peak_bytes=metric_value(record, "peak_bytes") if ok else None,
            activation_bytes=metric_value(record, "activation_bytes") if ok else None,
            tokens_per_s=throughput.get("tokens_per_s"),
            samples_per_s=throughput.get("samples_per_s"),
            **step_time(record),
            key=grid_key(grid_point(record)),
        )
        rows.append(row)
    full = {}
    for record in results.records:
        if method_of(record) == BASELINE_METHOD:
            full.setdefault(grid_key(grid_point(record)), record)
    for row, record in zip(rows, results.records):
        baseline = full.get(row["key"])
        row["ratio_figures"] = None
        for metric, column in (("peak_bytes", "peak_ratio"), ("activation_bytes", "activation_ratio")):
            pair = comparable(baseline, record, metric) if baseline is not None else None
            if pair is not None and pair.denominator > 0:
                row[column] = pair.numerator / pair.denominator
                row["ratio_figures"] = row["ratio_figures"] or pair.kind
            else:
                row[column] = None
        row["ratio_estimated"] = row["ratio_figures"] is not None and row["ratio_figures"].estimated
    frame = pd.DataFrame(rows)
    order = method_order(results)
    frame["method"] = pd.Categorical(frame["method"].astype(str), categories=order, ordered=True)
    for column in ("peak_ratio", "activation_ratio", "step_time_s", "estimate_over_measured"):
        frame[column] = frame[column].astype(float)
    frame["panel"] = _panel_labels(frame)
    # models in the order the suite ran them, the rest of the grid ascending
    models = list(dict.fromkeys(frame["model"].astype(str)))
    frame["model"] = pd.Categorical(frame["model"].astype(str), categories=models, ordered=True)
    sort = [c for c in GRID_ORDER if c in frame.columns] + ["method"]
    return frame.sort_values(sort, kind="stable").reset_index(drop=True)


def varying_params(frame: pd.DataFrame) -> list[str]:
    """Grid parameters that take more than one value in the frame (suite order)."""
    out = []
    for column in (*GRID_ORDER, "models_device"):
        if column in frame.columns and frame[column].astype(str).nunique(dropna=False) > 1:
            out.append(column)
    return out


def _panel_labels(frame: pd.DataFrame) -> pd.Series:
    """Facet labels: model, S (and T where it differs from S), other varying parameters, and
    whether the panel's figures are estimated."""
    # Only what varies within a model: d_model, layers... that follow from the preset are noise.
    # nor the modelled device: cells of one panel may be measured or estimated (marked per point)
    skip = ("model", "batch_size", "seq_len", "target_len", "models_device")
    usable = frame[frame["status"].isin(FIGURE_STATUSES)]
    varying_by_model = {
        model: [c for c in varying_params(usable[usable["model"] == model] if (usable["model"] == model).any()
                                          else group) if c not in skip]
        for model, group in frame.groupby("model", sort=False)
    }

    def base(row: pd.Series) -> str:
        varying = varying_by_model[row["model"]]
        parts = [str(row["model"])]
        if "seq_len" in row and pd.notna(row["seq_len"]):
            s = f"S={int(row['seq_len'])}"
            target = row.get("target_len")
            if target is not None and pd.notna(target) and target != row["seq_len"]:
                s += f", T={int(target)}"
            parts.append(s)
        parts += [f"{SHORT_NAMES.get(c, c)}={row[c]}" for c in varying]
        return " · ".join(parts)

    labels = frame.apply(base, axis=1)
    estimated = frame.groupby(labels)["estimated"].agg(["all", "any"])
    suffix = {
        label: " [estimated]" if row["all"] else " [partly estimated]" if row["any"] else ""
        for label, row in estimated.iterrows()
    }
    return labels + labels.map(suffix)


def breakdown_frame(results: Results, cells: pd.DataFrame) -> pd.DataFrame:
    """The activation breakdown of every usable cell, long form.

    Columns: ``cell_id``, ``panel``, ``method``, ``batch_size``, ``estimated``, ``operator``,
    ``category``, ``bytes``. Operators are ordered by their total bytes over the suite.
    """
    by_cell = cells.set_index("cell_id")
    rows = []
    for record in results.records:
        if record.get("status") not in FIGURE_STATUSES:
            continue
        cell = by_cell.loc[record.get("cell_id")]
        for item in record.get("activations") or []:
            rows.append(dict(cell_id=record.get("cell_id"), panel=cell["panel"], method=cell["method"],
                             batch_size=cell.get("batch_size"), estimated=cell["estimated"],
                             operator=str(item["operator"]), category=str(item["category"]),
                             bytes=int(item["bytes"])))
    frame = pd.DataFrame(rows, columns=["cell_id", "panel", "method", "batch_size", "estimated",
                                        "operator", "category", "bytes"])
    if frame.empty:
        return frame
    operators = frame.groupby("operator")["bytes"].sum().sort_values(ascending=False).index
    frame["operator"] = pd.Categorical(frame["operator"], categories=list(operators), ordered=True)
    frame["method"] = pd.Categorical(frame["method"].astype(str), categories=cells["method"].cat.categories,
                                     ordered=True)
    return frame


def memory_budgets(suite: dict[str, Any] | None) -> list[int]:
    """Memory budgets in bytes, largest first, for the "largest batch size" plot.

    Read from the suite's ``budgets.memory_gib`` (what ``profiler.suite`` validates and writes to
    suite.json: a list of GiB); without it, 80, 40 and 24 GiB.
    """
    budgets = (suite or {}).get("budgets")
    raw = budgets.get("memory_gib") if isinstance(budgets, dict) else None
    if raw is None:
        return [int(b * GiB) for b in DEFAULT_BUDGETS_GIB]
    items = raw if isinstance(raw, list) else [raw]
    for item in items:
        if not (isinstance(item, (int, float)) and not isinstance(item, bool) and 0 < item < math.inf):
            raise ResultsError(f"suite.json: memory budget {item!r} is not a memory size in GiB (e.g. 80)")
    return sorted({int(item * GiB) for item in items}, reverse=True)


def max_batch_size(batch_sizes: Sequence[float], peaks: Sequence[float], budget: float,
                   min_slope: float = 0.0) -> tuple[int | None, bool]:
    """The largest integer batch size whose peak fits ``budget``, and whether it is extrapolated.

    Peak memory is close to affine in B, so it is interpolated linearly between grid points and
    extrapolated beyond them along the first/last segment. Above the grid the slope is at least
    ``min_slope`` (bytes per sample): a peak that falls in the optimizer step is flat in B while
    the grid is small, yet the activations (exactly linear in B) overtake it at some batch size,
    so a flat last segment alone would extrapolate to absurd batch sizes. None with fewer than
    two distinct batch sizes or a slope that is not positive; 0 when not even B=1 fits.
    """
    points = sorted({int(b): float(p) for b, p in zip(batch_sizes, peaks)}.items())
    if len(points) < 2:
        return None, False
    bs = np.array([b for b, _ in points], dtype=float)
    ps = np.array([p for _, p in points], dtype=float)
    if budget < ps[0]:
        segment = 0
    elif budget >= ps[-1]:
        segment = len(points) - 2
    else:
        segment = int(np.searchsorted(ps, budget, side="right")) - 1
        segment = min(max(segment, 0), len(points) - 2)
    slope = (ps[segment + 1] - ps[segment]) / (bs[segment + 1] - bs[segment])
    if budget >= ps[-1]:  # above the grid: from the last point, at least the activations' slope
        slope = max(slope, min_slope)
        segment += 1
    if not slope > 0:
        return None, False
    b_max = bs[segment] + (budget - ps[segment]) / slope
    extrapolated = not (bs[0] <= b_max <= bs[-1])
    return max(0, math.floor(b_max + 1e-9)), extrapolated


def _activation_slope(group: pd.DataFrame) -> float:
    """Saved-activation bytes per sample of a (panel, method) group: the least-squares slope of
    its activation bytes over batch size (0 with fewer than two batch sizes)."""
    data = group.dropna(subset=["activation_bytes"])
    if data["batch_size"].nunique() < 2:
        return 0.0
    return max(0.0, float(np.polyfit(data["batch_size"].astype(float), data["activation_bytes"].astype(float), 1)[0]))


def max_batch_frame(cells: pd.DataFrame, budgets: Sequence[int]) -> pd.DataFrame:
    """Per (panel, method, budget): the largest batch size that fits, from the usable cells.

    Columns: ``panel``, ``method``, ``budget_bytes``, ``budget`` (label), ``max_batch_size``,
    ``extrapolated``, ``estimated``.
    """
    usable = cells.dropna(subset=["peak_bytes"])
    rows = []
    if "batch_size" not in usable.columns:
        return pd.DataFrame(rows)
    for (panel, method), group in usable.groupby(["panel", "method"], observed=True, sort=False):
        for budget in budgets:
            b_max, extrapolated = max_batch_size(group["batch_size"].tolist(), group["peak_bytes"].tolist(), budget,
                                                 min_slope=_activation_slope(group))
            if b_max is None:
                continue
            rows.append(dict(panel=panel, method=method, budget_bytes=budget, budget=format_bytes(budget, GiB, 0),
                             max_batch_size=b_max, extrapolated=extrapolated,
                             estimated=bool(group["estimated"].any())))
    frame = pd.DataFrame(rows)
    if not frame.empty:
        frame["method"] = pd.Categorical(frame["method"].astype(str), categories=cells["method"].cat.categories,
                                         ordered=True)
    return frame


# ---------------------------------------------------------------------------------------------
# Formatting


def _ratio_range(values: pd.Series) -> str:
    values = values.dropna()
    if values.empty:
        return "—"
    low, high = values.min(), values.max()
    return f"{low:.2f}×" if math.isclose(low, high, rel_tol=5e-3) else f"{low:.2f}–{high:.2f}×"


def _bytes_range(values: pd.Series, unit: int) -> str:
    values = values.dropna()
    if values.empty:
        return "—"
    low, high = format_bytes(values.min(), unit), format_bytes(values.max(), unit)
    return low if low == high else f"{low} – {high}"


def summary_frame(cells: pd.DataFrame) -> pd.DataFrame:
    """Per model and method: cells by status, the peak range and the ratios vs full (ranges over
    the grid), the best throughput, and how the figures were obtained."""
    unit = byte_unit(cells["peak_bytes"].max())[1]
    rows = []
    for (model, method), group in cells.groupby(["model", "method"], observed=True, sort=True):
        counts = group["status"].value_counts()
        status = ", ".join(f"{counts[s]} {s}" for s in ("ok", "estimated", "oom", "error", "skipped") if s in counts)
        tokens = group["tokens_per_s"].dropna()
        rows.append({
            "model": model,
            "method": method,
            "cells": status,
            "peak": _bytes_range(group["peak_bytes"], unit),
            "peak: full ÷ method": _ratio_range(group["peak_ratio"]),
            "activations: full ÷ method": _ratio_range(group["activation_ratio"]),
            "best tokens/s": format_count(tokens.max()) if not tokens.empty else "—",
            "CPU step: estimate ÷ measured": _ratio_range(group["estimate_over_measured"]),
            "figures": ", ".join(sorted(set(group["figures"]) - {"—"})) or "—",
        })
    return pd.DataFrame(rows)


def cell_table(cells: pd.DataFrame) -> pd.DataFrame:
    """The display table of a set of cells: varying grid parameters, then figures in GiB/MiB."""
    unit_name, unit = byte_unit(cells["peak_bytes"].max())
    act_name, act_unit = byte_unit(cells["activation_bytes"].max())
    shown = [c for c in varying_params(cells) if c not in ("model", "models_device")]
    if "target_len" in shown and (cells["target_len"] == cells["seq_len"]).all():
        shown.remove("target_len")  # T follows S: one column says it
    table = cells[shown].rename(columns=SHORT_NAMES).copy()
    table.insert(len(table.columns), "method", cells["method"].astype(str))
    table["status"] = cells["status"]
    table["figures"] = cells["figures"]
    table[f"peak ({unit_name})"] = cells["peak_bytes"].map(lambda v: in_unit(v, unit))
    table[f"activations ({act_name})"] = cells["activation_bytes"].map(lambda v: in_unit(v, act_unit))
    # a measured cell whose ratio had to come from the estimates (full was not measured) says so
    from_estimates = cells["ratio_estimated"] & ~cells["estimated"]

    def ratio(values: pd.Series) -> list[str]:
        return ["—" if pd.isna(v) else f"{v:.2f}×" + (" (estimates)" if est else "")
                for v, est in zip(values, from_estimates)]

    table["peak: full ÷ method"] = ratio(cells["peak_ratio"])
    table["activations: full ÷ method"] = ratio(cells["activation_ratio"])
    table["step time"] = [_step_time_text(*row) for row in
                          cells[["step_time_s", "step_time_kind", "step_time_target"]].itertuples(index=False)]
    table["tokens/s"] = cells["tokens_per_s"].map(format_count)
    table["message"] = cells["message"]
    return table


def _step_time_text(seconds: Any, kind: Any, target: Any) -> str:
    """``0.412 s (estimated, a100-80gb)``: a step time says how it was obtained, like a memory figure."""
    if seconds is None or pd.isna(seconds):
        return "—"
    return f"{seconds:.3g} s ({kind}, {target})"


def _html_table(frame: pd.DataFrame, classes: str = "") -> str:
    # escape=True is pandas' default; spelled out because the page's safety depends on it.
    table = frame.to_html(index=False, escape=True, border=0, classes=classes or None, na_rep="—")
    return f'<div class="scroll">{table}</div>'


# ---------------------------------------------------------------------------------------------
# The page

_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 0; color: #1d2329;
       background: #f6f7f9; }
main { max-width: 1320px; margin: 0 auto; padding: 24px 32px 64px; }
h1 { font-size: 1.7rem; margin: 0.2rem 0 0.3rem; }
h2 { font-size: 1.3rem; margin-top: 2.2rem; border-bottom: 2px solid #d5dae0; padding-bottom: 0.3rem; }
h3 { font-size: 1.05rem; margin-top: 1.4rem; }
p.lead { color: #4a5560; margin: 0 0 1rem; }
.note { background: #fff7e0; border-left: 4px solid #e6a700; padding: 8px 14px; margin: 12px 0; }
.bad { background: #fdecea; border-left: 4px solid #c62828; padding: 8px 14px; margin: 12px 0; }
table { border-collapse: collapse; font-size: 0.86rem; background: #fff; margin: 8px 0 16px; }
th, td { padding: 4px 10px; border-bottom: 1px solid #e3e6ea; text-align: right; white-space: nowrap; }
th { background: #eef1f4; text-align: center; white-space: normal; max-width: 130px; }
td:first-child, th:first-child { text-align: left; }
tr:nth-child(even) td { background: #fafbfc; }
table.cells td:last-child { white-space: normal; text-align: left; min-width: 200px; max-width: 360px;
                            color: #a12a1f; }
table.kv td { text-align: left; white-space: normal; font-family: ui-monospace, Menlo, monospace;
              overflow-wrap: anywhere; }
table.kv td:first-child { white-space: nowrap; overflow-wrap: normal; font-weight: 600; }
div.scroll { overflow-x: auto; max-width: 100%; }
details div.scroll { display: inline-block; vertical-align: top; margin-right: 24px; }
figure { background: #fff; border: 1px solid #e3e6ea; padding: 12px; margin: 14px 0 24px; }
figure img { max-width: 100%; height: auto; display: block; margin: 0 auto; }
figcaption { color: #4a5560; font-size: 0.9rem; margin-top: 8px; }
details { background: #fff; border: 1px solid #e3e6ea; margin: 4px 0; padding: 4px 10px; }
summary { cursor: pointer; font-size: 0.9rem; }
nav a { margin-right: 14px; }
"""

_CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"

_FIGURES = (
    ("peak_memory", "Peak memory per method",
     "Peak memory of one training step (forward, backward, optimizer step) against batch size."),
    ("activation_breakdown", "Saved activations by operator and category",
     "Bytes saved for backward at the largest batch size of each panel, stacked by operator (colour) "
     "and category (hatching); deduplicated by storage, parameters excluded."),
    ("memory_ratio", "Memory saved against full fine-tuning",
     "Peak memory of full fine-tuning divided by each method's peak at the same grid point "
     "(higher is better; 1× is full fine-tuning)."),
    ("max_batch", "Largest batch size within a memory budget",
     "Peak memory interpolated linearly in B between grid points and extrapolated beyond them "
     "(peak is close to affine in B; above the grid it grows at least as fast as the saved "
     "activations); 0 means not even B=1 fits. Budgets: the suite's budgets.memory_gib."),
    ("throughput", "Throughput", "Training tokens per second (median step time after warm-up)."),
)


def render_report(results_path: Path, out_dir: Path | None = None) -> Path:
    """Write ``report.html`` (self-contained) and the PNG plots into ``out_dir``; return the page.

    ``out_dir`` defaults to the results file's folder. Raises ResultsError for bad input
    (see ``load_results``), before anything is written.
    """
    results = load_results(results_path)
    cells = cells_frame(results)
    breakdown = breakdown_frame(results, cells)
    budgets = memory_budgets(results.suite)
    max_batch = max_batch_frame(cells, budgets)

    from profiler import plots  # matplotlib is loaded only to draw

    out = Path(out_dir) if out_dir is not None else Path(results_path).parent
    out.mkdir(parents=True, exist_ok=True)
    figures = {
        "peak_memory": plots.peak_memory(cells),
        "activation_breakdown": plots.activation_breakdown(breakdown),
        "memory_ratio": plots.memory_ratio(cells),
        "max_batch": plots.max_batch(max_batch),
        "throughput": plots.throughput(cells),
    }
    images: dict[str, bytes] = {}
    for name, figure in figures.items():
        if figure is None:
            continue
        png = plots.to_png(figure)
        (out / f"{name}.png").write_bytes(png)
        images[name] = png

    page = out / PAGE_NAME
    page.write_text(_page(results, cells, breakdown, max_batch, images), encoding="utf-8")
    return page


def _page(results: Results, cells: pd.DataFrame, breakdown: pd.DataFrame, max_batch: pd.DataFrame,
          images: dict[str, bytes]) -> str:
    e = html.escape
    name = results.name
    counts = cells["status"].value_counts()
    status_line = ", ".join(f"{counts[s]} {s}" for s in ("ok", "estimated", "oom", "error", "skipped") if s in counts)
    generated = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f'<meta http-equiv="Content-Security-Policy" content="{_CSP}">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{e(name)} — memory report</title>",
        f"<style>{_CSS}</style></head><body><main>",
        f"<h1>{e(name)}</h1>",
        f'<p class="lead">{len(cells)} cells ({e(status_line)}) · results file {e(results.path.name)} · '
        f"generated {e(generated)} · memory in GiB/MiB (2<sup>30</sup>/2<sup>20</sup> bytes)</p>",
        '<nav><a href="#summary">Summary</a><a href="#plots">Plots</a><a href="#cells">Cells</a>'
        '<a href="#suite">Suite</a><a href="#environment">Environment</a></nav>',
    ]
    if cells["estimated"].any():
        models = sorted({str(m) for m in cells.loc[cells["estimated"], "models_device"].dropna()})
        parts.append(
            '<p class="note"><b>Estimated figures.</b> Cells with status <i>estimated</i> were traced on the '
            f"meta device and model the kernels of {e(', '.join(models))}; they are marked "
            "<i>estimated</i> in the tables, <i>[estimated]</i> in plot titles and drawn with dashed lines (and "
            "hatched or labelled <i>est.</i> bars where they sit next to measured ones).</p>"
        )
    if results.outside:
        parts.append(f'<p class="note">{e(results.outside_note())} (cells of an earlier version of the suite; '
                     f"a <code>--resume</code> of the current one sets them aside).</p>")
    failed = cells[~cells["status"].isin(FIGURE_STATUSES)]
    if not failed.empty:
        parts.append(f'<p class="bad"><b>{len(failed)} cell(s) have no figures</b> (error, oom or skipped); '
                     'see <a href="#failed">failed cells</a>.</p>')

    parts.append('<h2 id="summary">Summary</h2>')
    parts.append("<p>Per model and method, ranges over the grid. Ratios are full fine-tuning's figure over the "
                 "method's at the same grid point: higher means less memory.</p>")
    parts.append(_html_table(summary_frame(cells)))

    parts.append('<h2 id="plots">Plots</h2>')
    missing = {
        "throughput": "No throughput was measured (meta estimates have none).",
        "memory_ratio": f"No ratio: the suite has no usable '{BASELINE_METHOD}' cells.",
        "max_batch": "No batch-size limit: it needs at least two batch sizes with figures.",
        "activation_breakdown": "No activation breakdown in the records.",
        "peak_memory": "No cell has a peak figure.",
    }
    for key, title, caption in _FIGURES:
        parts.append(f"<h3>{e(title)}</h3>")
        if key not in images:
            parts.append(f"<p>{e(missing[key])}</p>")
            continue
        data = base64.b64encode(images[key]).decode("ascii")
        parts.append(f'<figure><img src="data:image/png;base64,{data}" alt="{e(title)}">'
                     f"<figcaption>{e(caption)} Also written as {e(key)}.png.</figcaption></figure>")
        if key == "max_batch" and not max_batch.empty:
            table = max_batch.copy()
            table["max batch size"] = [f"{b}{' (extrapolated)' if x else ''}{' (estimated)' if est else ''}"
                                       for b, x, est in zip(table["max_batch_size"], table["extrapolated"],
                                                            table["estimated"])]
            wide = table.pivot_table(index=["panel", "method"], columns="budget", values="max batch size",
                                     aggfunc="first", observed=True, sort=False)
            wide = wide[[c for c in table["budget"].drop_duplicates()]]
            parts.append("<details><summary>Largest batch size per budget (table)</summary>"
                         f"{_html_table(wide.reset_index())}</details>")

    parts.append('<h2 id="cells">Cells</h2>')
    for model, group in cells.groupby("model", sort=False):
        parts.append(f"<h3>{e(str(model))}</h3>")
        parts.append(_html_table(cell_table(group), classes="cells"))
    if not failed.empty:
        parts.append('<h3 id="failed">Failed cells</h3>')
        parts.append(_html_table(failed[["cell_id", "status", "message"]]))
    parts.append("<h3>Cell details</h3><p>Memory categories and the activation breakdown of each cell.</p>")
    parts += _cell_details(results, cells, breakdown)

    parts.append('<h2 id="suite">Suite</h2>')
    if results.suite:
        # the expanded cell list is long and the cell tables above already show it
        shown = {k: (f"{len(v)} cells" if k in ("cells", "cell_keys") and isinstance(v, (list, dict)) else v)
                 for k, v in results.suite.items()}
        kv = pd.DataFrame([(k, json.dumps(v, ensure_ascii=False, default=str) if not isinstance(v, str) else v)
                           for k, v in shown.items()], columns=["key", "value"])
        parts.append(_html_table(kv, classes="kv"))
    else:
        parts.append("<p>No suite.json beside the results file.</p>")

    parts.append('<h2 id="environment">Environment</h2>')
    env = pd.DataFrame([{"device": r.get("device"), "models": r.get("models_device"), **(r.get("env") or {})}
                        for r in results.records])
    env = env.astype(str).value_counts(sort=False).rename("cells").reset_index()
    parts.append(_html_table(env))
    parts.append("</main></body></html>")
    return "\n".join(parts)


def _cell_details(results: Results, cells: pd.DataFrame, breakdown: pd.DataFrame) -> list[str]:
    e = html.escape
    records = {r.get("cell_id"): r for r in results.records}
    out = []
    for _, cell in cells.iterrows():
        record = records[cell["cell_id"]]
        title = f"{cell['panel']} · B={cell.get('batch_size')} · {cell['method']} — {cell['status']}"
        if pd.notna(cell["peak_bytes"]):
            title += f", peak {format_bytes(cell['peak_bytes'])}"
        categories = (record.get("memory") or {}).get("categories") or {}
        cat_table = pd.DataFrame([(k, format_bytes(categories.get(k))) for k in MEMORY_CATEGORIES],
                                 columns=["category", "bytes"])
        body = [_html_table(cat_table)]
        items = breakdown[breakdown["cell_id"] == cell["cell_id"]] if not breakdown.empty else breakdown
        if not items.empty:
            table = items.sort_values("bytes", ascending=False)[["operator", "category", "bytes"]].copy()
            table["bytes"] = table["bytes"].map(format_bytes)
            body.append(_html_table(table))
        if cell["message"]:
            body.append(f"<p>{e(str(cell['message']))}</p>")
        out.append(f"<details><summary>{e(title)}</summary>{''.join(body)}</details>")
    return out
