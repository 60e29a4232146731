"""The HTML report of a results file: ``render_report(results.jsonl) -> report.html``.

The report reads results (``profiler.results``: the records and the ``suite.json`` the runner
writes beside them) and nothing else. Its data side (``cells_frame``, ``breakdown_frame``,
``max_batch_frame``, ``summary_frame``, ``checks_frame``, and ``profiler.fits.fits_frame``) is plain pandas; the figures are drawn from those frames by
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
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from profiler.fits import MARGIN_NOTE, MAX_EXTRAPOLATION, budget_label, fits_frame, max_batch_size, usable_bytes
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
from profiler.units import GiB, byte_unit, format_bytes, format_count, format_seconds, in_unit

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
    facet label: model and every varying grid parameter but batch size and method, world size included),
    ``scale_panel`` (the same without the world size), ``cell_id``,
    ``key``, ``peak_phase`` (forward / backward / optimizer, where recorded), and the step time
    (``step_time``): ``step_time_s``, ``step_time_kind`` (measured / estimated), ``step_time_target``,
    ``estimate_over_measured``, ``time_ratio`` (this cell's step time over full's at the same grid
    point, for the same target) and ``time_ratio_estimated`` (either side estimated).
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
            peak_phase=(record.get("memory") or {}).get("peak_phase"),
            key=grid_key(grid_point(record)),
        )
        row.update(step_time(record))
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
        row.update(time_ratio(row, step_time(baseline) if baseline is not None else None))
    frame = pd.DataFrame(rows)
    order = method_order(results)
    frame["method"] = pd.Categorical(frame["method"].astype(str), categories=order, ordered=True)
    for column in ("peak_ratio", "activation_ratio", "step_time_s", "time_ratio", "estimate_over_measured"):
        frame[column] = frame[column].astype(float)
    frame["panel"] = _panel_labels(frame)
    frame["scale_panel"] = _panel_labels(frame, skip=("world_size",))  # per_gpu_peak's x axis
    # models in the order the suite ran them, the rest of the grid ascending
    models = list(dict.fromkeys(frame["model"].astype(str)))
    frame["model"] = pd.Categorical(frame["model"].astype(str), categories=models, ordered=True)
    sort = [c for c in GRID_ORDER if c in frame.columns] + ["method"]
    return frame.sort_values(sort, kind="stable").reset_index(drop=True)


def time_ratio(cell: dict[str, Any], full: dict[str, Any] | None) -> dict[str, Any]:
    """``time_ratio``: the cell's step time over full fine-tuning's (``step_time`` of each), when
    both model the same target; ``time_ratio_estimated`` when either side is an estimate."""
    if (full is None or cell["step_time_s"] is None or full["step_time_s"] is None
            or cell["step_time_target"] != full["step_time_target"]):
        return dict(time_ratio=None, time_ratio_estimated=False)
    estimated = "estimated" in (cell["step_time_kind"], full["step_time_kind"])
    return dict(time_ratio=cell["step_time_s"] / full["step_time_s"], time_ratio_estimated=estimated)


def varying_params(frame: pd.DataFrame) -> list[str]:
    """Grid parameters that take more than one value in the frame (suite order)."""
    out = []
    for column in (*GRID_ORDER, "world_size", "models_device"):
        if column in frame.columns and frame[column].astype(str).nunique(dropna=False) > 1:
            out.append(column)
    return out


def _panel_labels(frame: pd.DataFrame, skip: tuple[str, ...] = ()) -> pd.Series:
    """Facet labels: model, S (and T where it differs from S), other varying parameters (world
    size among them, not those in ``skip``), and whether the panel's figures are estimated."""
    # Only what varies within a model: d_model, layers... that follow from the preset are noise.
    # nor the modelled device: cells of one panel may be measured or estimated (marked per point)
    skip = ("model", "batch_size", "seq_len", "target_len", "models_device", *skip)
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


def _activation_slope(group: pd.DataFrame) -> float:
    """Saved-activation bytes per sample of a (panel, method) group: the least-squares slope of
    its activation bytes over batch size (0 with fewer than two batch sizes)."""
    data = group.dropna(subset=["activation_bytes"])
    if data["batch_size"].nunique() < 2:
        return 0.0
    return max(0.0, float(np.polyfit(data["batch_size"].astype(float), data["activation_bytes"].astype(float), 1)[0]))


def max_batch_frame(cells: pd.DataFrame, budgets: Sequence[int]) -> pd.DataFrame:
    """Per (panel, method, budget): the largest batch size that fits (``profiler.fits``: with
    the CUDA context and allocator margin, extrapolated at most ``MAX_EXTRAPOLATION`` x the
    grid's largest B), from the usable cells.

    Columns: ``panel``, ``method``, ``budget_bytes``, ``budget`` (label, GiB and GB),
    ``max_batch_size``, ``extrapolated``, ``capped`` (the limit is at least this), ``estimated``.
    """
    usable = cells.dropna(subset=["peak_bytes"])
    rows = []
    if "batch_size" not in usable.columns:
        return pd.DataFrame(rows)
    for (panel, method), group in usable.groupby(["panel", "method"], observed=True, sort=False):
        for budget in budgets:
            limit = max_batch_size(group["batch_size"].tolist(), group["peak_bytes"].tolist(), usable_bytes(budget),
                                   min_slope=_activation_slope(group))
            if limit.batch_size is None:
                continue
            rows.append(dict(panel=panel, method=method, budget_bytes=budget, budget=budget_label(budget),
                             max_batch_size=limit.batch_size, extrapolated=limit.extrapolated, capped=limit.capped,
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


def _time_ratio_range(group: pd.DataFrame) -> str:
    """The range of a group's step-time ratios to full, ``(estimated)`` where any is."""
    text = _ratio_range(group["time_ratio"])
    has = group["time_ratio"].notna()
    return text + (" (estimated)" if text != "—" and group.loc[has, "time_ratio_estimated"].any() else "")


def _per_target(group: pd.DataFrame, column: str, text: Callable[[pd.Series], str]) -> str:
    """``text`` of ``column`` for each (kind, target) of the group's step times, labelled:
    times on different devices do not make one range (``0.25 – 1.4 s (estimated, a100-80gb);
    84 s (measured, cpu)``)."""
    timed = group.dropna(subset=[column])
    if timed.empty:
        return "—"
    parts = [f"{text(rows[column])} ({kind}, {target})"
             for (kind, target), rows in timed.groupby(["step_time_kind", "step_time_target"], sort=True, dropna=False)]
    return "; ".join(parts)


def _seconds_range(values: pd.Series) -> str:
    low, high = format_seconds(values.min()), format_seconds(values.max())
    return low if low == high else f"{low} – {high}"


def summary_frame(cells: pd.DataFrame) -> pd.DataFrame:
    """Per model and method: cells by status, the peak range and the memory ratios vs full
    (ranges over the grid), the step time and its ratio to full's (method ÷ full: above 1 is
    slower; ``(estimated)`` where either side is), the best throughput, and how the figures were
    obtained."""
    unit = byte_unit(cells["peak_bytes"].max())[1]
    rows = []
    for (model, method), group in cells.groupby(["model", "method"], observed=True, sort=True):
        counts = group["status"].value_counts()
        status = ", ".join(f"{counts[s]} {s}" for s in ("ok", "estimated", "oom", "error", "skipped") if s in counts)
        rows.append({
            "model": model,
            "method": method,
            "cells": status,
            "peak": _bytes_range(group["peak_bytes"], unit),
            "peak: full ÷ method": _ratio_range(group["peak_ratio"]),
            "activations: full ÷ method": _ratio_range(group["activation_ratio"]),
            "step time": _per_target(group, "step_time_s", _seconds_range),
            "step time: method ÷ full": _time_ratio_range(group),
            "best tokens/s": _per_target(group, "tokens_per_s", lambda values: format_count(values.max())),
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
    table["peak in"] = cells["peak_phase"].fillna("—")
    table["step time"] = [_step_time_text(*row) for row in
                          cells[["step_time_s", "step_time_kind", "step_time_target"]].itertuples(index=False)]
    table["step time: method ÷ full"] = [
        "—" if pd.isna(v) else f"{v:.2f}×" + (" (estimated)" if est else "")
        for v, est in zip(cells["time_ratio"], cells["time_ratio_estimated"])]
    table["tokens/s"] = cells["tokens_per_s"].map(format_count)
    table["message"] = cells["message"]
    return table


def _step_time_text(seconds: Any, kind: Any, target: Any) -> str:
    """``0.412 s (estimated, a100-80gb)``: a step time says how it was obtained, like a memory figure."""
    if seconds is None or pd.isna(seconds):
        return "—"
    return f"{format_seconds(seconds)} ({kind}, {target})"


def _html_table(frame: pd.DataFrame, classes: str = "", row_classes: Sequence[str] | None = None) -> str:
    """``frame`` as an HTML table, every value escaped; ``row_classes`` (one CSS class per row,
    "" for none) marks rows, e.g. failed cells or regressed checks."""
    # escape=True is pandas' default; spelled out because the page's safety depends on it.
    table = frame.to_html(index=False, escape=True, border=0, classes=classes or None, na_rep="—")
    if row_classes is not None:
        head, _, body = table.partition("<tbody>")
        rows = body.split("<tr>")
        body = rows[0] + "".join(f'<tr class="{c}">' + row if c else "<tr>" + row
                                 for c, row in zip(row_classes, rows[1:]))
        table = head + "<tbody>" + body
    return f'<div class="scroll">{table}</div>'


def fits_tables(fit: pd.DataFrame) -> list[tuple[str, pd.DataFrame]]:
    """Per budget of a ``fits_frame`` (largest first): its label and a table of (panel, method)
    x batch size saying ``fits`` / ``does not fit`` (``(est.)`` for estimated cells in a panel
    that mixes kinds; NaN where the grid point has no figure)."""
    out = []
    mixed = set(fit.groupby("panel", observed=True)["estimated"].nunique().loc[lambda n: n > 1].index)
    for budget, group in fit.groupby("budget_bytes", sort=False):
        group = group.assign(text=[("fits" if ok else "does not fit") + (" (est.)" if est and panel in mixed else "")
                                   for ok, est, panel in zip(group["fits"], group["estimated"], group["panel"])])
        text = group.pivot_table(index=["panel", "method"], columns="batch_size", values="text", aggfunc="first",
                                 observed=True, sort=False)
        text.columns = [f"B={b}" for b in text.columns]
        out.append((str(group["budget"].iloc[0]), text.reset_index()))
    return out


def checks_frame(results: Results) -> tuple[pd.DataFrame, list[str]]:
    """The suite's bounds (suite.json ``checks``) evaluated on the results as ``profiler check``
    evaluates them: one row per check (metric, ratio, where, bound, measured, result, detail)
    and the result of each (``held`` / ``regressed``). Empty for a suite without checks."""
    from profiler.check import METRIC_LABELS, check_bound, parse_checks

    rows, verdicts = [], []
    for check in parse_checks(results):
        outcome = check_bound(check, results)
        where = ", ".join(f"{SHORT_NAMES.get(k, k)}={v}" for k, v in check.where.items()) or "every grid point"
        rows.append({"metric": METRIC_LABELS[check.metric], "ratio": f"{check.numerator} ÷ {check.denominator}",
                     "where": where, "bound": outcome.expected, "measured": outcome.measured,
                     "result": outcome.result.value, "detail": outcome.detail})
        verdicts.append(outcome.result.value)
    return pd.DataFrame(rows), verdicts


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
                            color: #5f6b76; }
table.cells tr.failed td:last-child { color: #a12a1f; }
table.checks td { white-space: normal; }
table.checks tr.held td, table.checks tr.improved td { background: #edf7ee; }
table.checks tr.regressed td { background: #fdecea; color: #8e1c12; }
table.fits td { text-align: center; }
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

SHARED_STORAGE_NOTE = (
    "A storage that several operators save is counted once, under the operator whose autograd node comes "
    "first in the graph (profiler/breakdown.py, SavedActivationBreakdown.attribute): the one input of "
    "Linear-Q, -K and -V shows as Linear-Q, and P, which Softmax and TensorMul-2 may share, under the "
    "first of them.")

_FIGURES = (
    ("peak_memory", "Peak memory per method",
     "Peak memory of one training step (forward, backward, optimizer step) against batch size."),
    ("activation_breakdown", "Saved activations by operator and category",
     "Bytes saved for backward at the largest batch size of each panel, stacked by operator (colour) "
     "and category (hatching); deduplicated by storage, parameters excluded. " + SHARED_STORAGE_NOTE),
    ("per_gpu_peak", "Per-GPU peak against world size",
     "Peak memory of one training step on one GPU (the largest rank's peak of a DDP/FSDP cell) against "
     "the number of GPUs the cell is split over, log2 axis; batch sizes are per GPU."),
    ("memory_ratio", "Memory saved against full fine-tuning",
     "Peak memory of full fine-tuning divided by each method's peak at the same grid point "
     "(higher is better; 1× is full fine-tuning)."),
    ("memory_time", "Memory against step time",
     "Peak memory against step time, one point per method and batch size (lines join a method's batch "
     "sizes, labelled B); down and left is better. Step times of one panel are of one target device; "
     "estimated points (memory or time) are drawn with X markers and dashed lines."),
    ("max_batch", "Largest batch size within a memory budget",
     "Peak memory interpolated linearly in B between grid points and extrapolated beyond them "
     "(peak is close to affine in B; above the grid it grows at least as fast as the saved "
     f"activations), at most {MAX_EXTRAPOLATION:g}× the largest batch size of the grid (≥: the line "
     "reaches further); cross-hatched bars are extrapolated. 0 means not even B=1 fits. "
     "Budgets: the suite's budgets.memory_gib. " + MARGIN_NOTE),
    ("fits", "Fits per memory budget",
     "Each cell of the grid coloured by the smallest budget its step fits (darker: a smaller card), "
     "annotated with the memory it needs (peak with the margin). " + MARGIN_NOTE),
    ("throughput", "Throughput", "Training tokens per second: the median timed step where the cell ran, else the "
     "step-time estimate for the suite's target; one target per panel."),
)
_MISSING = {
    "throughput": "No throughput: no cell has a step time.",
    "memory_ratio": f"No ratio: the suite has no usable '{BASELINE_METHOD}' cells.",
    "memory_time": "No trade-off: no cell has both a peak and a step time.",
    "max_batch": "No batch-size limit: it needs at least two batch sizes with figures.",
    "fits": "No cell has a peak figure.",
    "activation_breakdown": "No activation breakdown in the records.",
    "peak_memory": "No cell has a peak figure.",
}


def render_report(results_path: Path, out_dir: Path | None = None) -> Path:
    """Write ``report.html`` (self-contained) and the PNG plots into ``out_dir``; return the page.

    ``out_dir`` defaults to the results file's folder. Raises ResultsError for bad input
    (see ``load_results``; a malformed check of suite.json too), before anything is written.
    """
    results = load_results(results_path)
    cells = cells_frame(results)
    breakdown = breakdown_frame(results, cells)
    budgets = memory_budgets(results.suite)
    frames = {"max_batch": max_batch_frame(cells, budgets), "fits": fits_frame(cells, budgets),
              "checks": checks_frame(results),
              "parallel": "world_size" in cells.columns and bool(cells["world_size"].notna().any())}

    from profiler import plots  # matplotlib is loaded only to draw

    out = Path(out_dir) if out_dir is not None else Path(results_path).parent
    out.mkdir(parents=True, exist_ok=True)
    figures = {
        "peak_memory": plots.peak_memory(cells),
        "activation_breakdown": plots.activation_breakdown(breakdown),
        "per_gpu_peak": plots.per_gpu_peak(cells),  # None unless two or more world sizes
        "memory_ratio": plots.memory_ratio(cells),
        "memory_time": plots.memory_time(cells),
        "max_batch": plots.max_batch(frames["max_batch"]),
        "fits": plots.fits_matrix(frames["fits"]),
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
    page.write_text(_page(results, cells, breakdown, frames, images), encoding="utf-8")
    return page


def _page(results: Results, cells: pd.DataFrame, breakdown: pd.DataFrame, frames: dict[str, Any],
          images: dict[str, bytes]) -> str:
    parts = _head(results, cells, frames["checks"])
    parts.append('<h2 id="summary">Summary</h2>')
    parts.append("<p>Per model and method, ranges over the grid. Memory ratios are full fine-tuning's figure over "
                 "the method's at the same grid point: higher means less memory. The step-time ratio is the "
                 "method's step time over full's (same model, grid point and target device): higher means "
                 "slower; <i>(estimated)</i> where either step time is an estimate.</p>")
    parts.append(_html_table(summary_frame(cells)))
    parts += _checks_section(*frames["checks"])
    parts.append('<h2 id="plots">Plots</h2>')
    for key, title, caption in _FIGURES:
        if key in images or key != "per_gpu_peak":  # one world size: no section
            parts += _figure_section(key, title, caption, images, frames)
    parts += _cells_section(results, cells, breakdown)
    parts += _suite_section(results)
    parts.append("</main></body></html>")
    return "\n".join(parts)


def _head(results: Results, cells: pd.DataFrame, checks: tuple[pd.DataFrame, list[str]]) -> list[str]:
    """The page's head, title, lead line, navigation and the notes on estimates and failures."""
    e = html.escape
    name = results.name
    counts = cells["status"].value_counts()
    status_line = ", ".join(f"{counts[s]} {s}" for s in ("ok", "estimated", "oom", "error", "skipped") if s in counts)
    generated = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    nav = [("summary", "Summary")] + ([("checks", "Checks")] if checks[1] else []) + [
        ("plots", "Plots"), ("fits", "Fits"), ("cells", "Cells"), ("suite", "Suite"), ("environment", "Environment")]
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
        "<nav>" + "".join(f'<a href="#{anchor}">{label}</a>' for anchor, label in nav) + "</nav>",
    ]
    if cells["estimated"].any() or (cells["step_time_kind"] == "estimated").any():
        models = sorted({str(m) for m in cells.loc[cells["estimated"], "models_device"].dropna()})
        targets = sorted({str(t) for t in cells.loc[cells["step_time_kind"] == "estimated", "step_time_target"]
                          .dropna()})
        parts.append(
            '<p class="note"><b>Estimated figures.</b> '
            + (f"Cells with status <i>estimated</i> were traced on the meta device and model the kernels of "
               f"{e(', '.join(models))}. " if models else "")
            + (f"Estimated step times model {e(', '.join(targets))}. " if targets else "")
            + "Estimates are marked <i>estimated</i> in the tables, <i>[estimated]</i> in plot titles and drawn "
            "with dashed lines and X markers (and hatched or labelled <i>est.</i> bars where they sit next to "
            "measured ones).</p>"
        )
    if results.outside:
        parts.append(f'<p class="note">{e(results.outside_note())} (cells of an earlier version of the suite; '
                     f"a <code>--resume</code> of the current one sets them aside).</p>")
    failed = cells[~cells["status"].isin(FIGURE_STATUSES)]
    if not failed.empty:
        parts.append(f'<p class="bad"><b>{len(failed)} cell(s) have no figures</b> (error, oom or skipped); '
                     'see <a href="#failed">failed cells</a>.</p>')
    return parts


def _checks_section(table: pd.DataFrame, verdicts: list[str]) -> list[str]:
    """The suite's checks and whether each held on these results (``profiler check``'s bounds)."""
    if not verdicts:
        return []
    regressed = verdicts.count("regressed")
    line = f"{len(verdicts) - regressed} held, {regressed} regressed"
    return ['<h2 id="checks">Checks</h2>',
            f'<p class="{"bad" if regressed else "lead"}"><b>{html.escape(line)}</b> — the suite\'s ratio bounds, '
            "evaluated on these results as <code>python -m profiler check</code> evaluates them.</p>",
            _html_table(table, classes="checks", row_classes=verdicts)]


def _figure_section(key: str, title: str, caption: str, images: dict[str, bytes], frames: dict[str, Any]) -> list[str]:
    e = html.escape
    parts = [f'<h3 id="{key if key == "fits" else "plot-" + key}">{e(title)}</h3>']
    if key not in images:
        return parts + [f"<p>{e(_MISSING[key])}</p>"]
    data = base64.b64encode(images[key]).decode("ascii")
    parts.append(f'<figure><img src="data:image/png;base64,{data}" alt="{e(title)}">'
                 f"<figcaption>{e(caption)} Also written as {e(key)}.png.</figcaption></figure>")
    if key == "max_batch" and not frames["max_batch"].empty:
        parts.append(_max_batch_table(frames["max_batch"]))
    if key == "fits" and frames.get("parallel"):
        parts.append("<p>Cells split over GPUs (DDP/FSDP) are fitted on their per-GPU memory: the largest "
                     "rank's peak, each GPU holding its batch of the given size.</p>")
    if key == "fits" and not frames["fits"].empty:
        parts.append("<p>A GPU sold as “24 GB” may have 24 × 10<sup>9</sup> bytes (22.35 GiB) or 24 GiB "
                     "(nvidia-smi's total in MiB says which): every budget is given in both units.</p>")
        for label, table in fits_tables(frames["fits"]):
            parts.append(f"<details><summary>Fits within {e(label)} (table)</summary>"
                         f"{_html_table(table, classes='fits')}</details>")
    return parts


def _max_batch_table(max_batch: pd.DataFrame) -> str:
    table = max_batch.copy()
    table["max batch size"] = [f"{'≥' if c else ''}{b}{' (extrapolated)' if x else ''}{' (estimated)' if est else ''}"
                               for b, x, c, est in zip(table["max_batch_size"], table["extrapolated"],
                                                       table["capped"], table["estimated"])]
    wide = table.pivot_table(index=["panel", "method"], columns="budget", values="max batch size",
                             aggfunc="first", observed=True, sort=False)
    wide = wide[[c for c in table["budget"].drop_duplicates()]]
    return ("<details><summary>Largest batch size per budget (table)</summary>"
            f"{_html_table(wide.reset_index())}</details>")


def _cells_section(results: Results, cells: pd.DataFrame, breakdown: pd.DataFrame) -> list[str]:
    parts = ['<h2 id="cells">Cells</h2>']
    for model, group in cells.groupby("model", sort=False):
        parts.append(f"<h3>{html.escape(str(model))}</h3>")
        failed_rows = ["failed" if s in ("error", "oom") else "" for s in group["status"]]
        parts.append(_html_table(cell_table(group), classes="cells", row_classes=failed_rows))
    failed = cells[~cells["status"].isin(FIGURE_STATUSES)]
    if not failed.empty:
        parts.append('<h3 id="failed">Failed cells</h3>')
        parts.append(_html_table(failed[["cell_id", "status", "message"]]))
    parts.append("<h3>Cell details</h3><p>Memory categories and the activation breakdown of each cell. "
                 f"{html.escape(SHARED_STORAGE_NOTE)}</p>")
    return parts + _cell_details(results, cells, breakdown)


def _suite_section(results: Results) -> list[str]:
    parts = ['<h2 id="suite">Suite</h2>']
    if results.suite:
        # the expanded cell list is long and the cell tables above already show it; the checks
        # have their own table
        def shown(key: str, value: Any) -> Any:
            if key in ("cells", "cell_keys") and isinstance(value, (list, dict)):
                return f"{len(value)} cells"
            if key == "checks" and isinstance(value, list):
                return f"{len(value)} checks (see Checks)" if value else "none"
            return value

        kv = pd.DataFrame([(k, json.dumps(v, ensure_ascii=False, default=str) if not isinstance(v, str) else v)
                           for k, v in ((k, shown(k, v)) for k, v in results.suite.items())],
                          columns=["key", "value"])
        parts.append(_html_table(kv, classes="kv"))
    else:
        parts.append("<p>No suite.json beside the results file.</p>")
    parts.append('<h2 id="environment">Environment</h2>')
    env = pd.DataFrame([{"device": r.get("device"), "models": r.get("models_device"), **(r.get("env") or {})}
                        for r in results.records])
    env = env.astype(str).value_counts(sort=False).rename("cells").reset_index()
    parts.append(_html_table(env))
    return parts


def _cell_details(results: Results, cells: pd.DataFrame, breakdown: pd.DataFrame) -> list[str]:
    e = html.escape
    records = {r.get("cell_id"): r for r in results.records}
    out = []
    for _, cell in cells.iterrows():
        record = records[cell["cell_id"]]
        title = f"{cell['panel']} · B={cell.get('batch_size')} · {cell['method']} — {cell['status']}"
        if pd.notna(cell["peak_bytes"]):
            title += f", peak {format_bytes(cell['peak_bytes'])}"
            if isinstance(cell.get("peak_phase"), str):
                title += f" (in the {cell['peak_phase']})"
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
