"""Seaborn figures of the report, one function per figure; each takes a frame that
``profiler.report`` builds (this module imports nothing of the report) and returns a matplotlib
Figure, or None when the frame has nothing to draw.

Panels are faceted per model and sequence length (``panel``); memory axes are in GiB or MiB
(powers of two) and throughput in tokens/s. Estimated cells are drawn dashed with ``X`` markers
(lines) and their panel titles say ``[estimated]``; bars are hatched or labelled ``est.`` where a
figure mixes estimated and measured ones. Methods of one family share a hue; operators have
fixed colours by group (``OPERATOR_COLOURS``).
Matplotlib's math parser is off, so a ``$`` in a method name is printed, not interpreted.
"""

from __future__ import annotations

import functools
import io
import sys
from collections.abc import Callable, Sequence

import matplotlib

if "matplotlib.pyplot" not in sys.modules:  # no display; a notebook that already chose a backend keeps it
    matplotlib.use("Agg")

import matplotlib.colors  # noqa: E402
import matplotlib.lines  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402

from profiler.results import BASELINE_METHOD  # noqa: E402
from profiler.units import byte_unit  # noqa: E402

DPI = 110
PANEL_HEIGHT = 3.4
PANEL_ASPECT = 1.4
# hatching that survives the page scaling a PNG down to ~60%: sparse patterns, thick lines, drawn
# in a colour that contrasts with the bar (``_hatch_colour``)
CATEGORY_HATCHES = {"sampled": "//", "lossless": "..", "uncompressed": ""}
EXTRAPOLATED_HATCH = "xx"
ESTIMATED_HATCH = "\\\\"
FIGURE_STYLES = {"measured": ("o", ""), "estimated": ("X", (4, 2))}  # marker, dashes
_RC = {"text.parse_math": False, "hatch.linewidth": 1.3, "axes.titlesize": 10.5, "legend.fontsize": 9}


def _styled(draw: Callable[..., Figure | None]) -> Callable[..., Figure | None]:
    @functools.wraps(draw)
    def wrapper(*args, **kwargs):
        with sns.axes_style("whitegrid"), sns.plotting_context("notebook", font_scale=0.9), plt.rc_context(_RC):
            return draw(*args, **kwargs)

    return wrapper


def to_png(figure: Figure) -> bytes:
    """The figure as PNG bytes; closes the figure.

    Quantized to a 256-colour palette (a third of the bytes of the RGBA rendering, no visible
    change for flat-coloured plots), so reports stay small enough to commit; no metadata, so the
    bytes hold no URL.
    """
    from PIL import Image  # matplotlib's own PNG backend

    buffer = io.BytesIO()
    with plt.rc_context(_RC):
        figure.savefig(buffer, format="png", dpi=DPI, bbox_inches="tight", facecolor="white",
                       metadata={"Software": None})
    plt.close(figure)
    image = Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")
    out = io.BytesIO()
    image.quantize(colors=256, method=Image.Quantize.MEDIANCUT).save(out, format="PNG", optimize=True)
    return out.getvalue()


# One hue per method kind (the name before ``@``), the same in every suite and figure: a reader
# who learnt that wtacrs is red in one report finds it red in the next. tab10's hues, in the order
# the comparisons are read (lora next to wtacrs far apart). Kinds not listed take FALLBACK_HUES in
# turn, in the order they first appear in a figure's method list.
METHOD_HUES = {
    "full": "#1f77b4", "lora": "#ff7f0e", "checkpointing": "#2ca02c", "wtacrs": "#d62728",
    "wtacrs-linear": "#9467bd", "lora+wtacrs": "#8c564b", "checkpointing+wtacrs": "#e377c2",
    "checkpointing+lora": "#bcbd22", "checkpointing+lora+wtacrs": "#17becf",
}
FALLBACK_HUES = ("#7f7f7f", "#393b79", "#637939", "#8c6d31", "#843c39")
REFERENCE_RATIO = 0.3  # the ratio drawn in the kind's own hue; lower ratios lighter, higher darker


def method_colour(method: str, fallback: tuple[float, float, float] | str = "#7f7f7f") -> tuple[float, float, float]:
    """The colour of a method: its kind's hue (``METHOD_HUES``), shaded by its ratio ``@R`` (a
    fixed function of R: 0.3 is the hue itself, 0.1 lighter, 0.05 lightest, 1.0 darkest)."""
    kind, _, ratio_text = method.partition("@")
    hue = matplotlib.colors.to_rgb(METHOD_HUES.get(kind, fallback))
    try:
        ratio = float(ratio_text) if ratio_text else None
    except ValueError:
        ratio = None
    if ratio is None or not 0 < ratio <= 1:
        return hue
    if ratio < REFERENCE_RATIO:  # toward white, up to 60% at R = 0.05
        mix = 0.6 * min(1.0, np.log(REFERENCE_RATIO / ratio) / np.log(REFERENCE_RATIO / 0.05))
        return tuple(c + (1.0 - c) * mix for c in hue)
    mix = 0.45 * np.log(ratio / REFERENCE_RATIO) / np.log(1 / REFERENCE_RATIO)  # toward black, 45% at 1
    return tuple(c * (1.0 - mix) for c in hue)


def method_palette(methods: Sequence[str]) -> dict[str, tuple[float, float, float]]:
    """One colour per method (``method_colour``): fixed by its kind and ratio, so the same
    method has the same colour in every figure and every suite."""
    unknown = list(dict.fromkeys(m.partition("@")[0] for m in methods if m.partition("@")[0] not in METHOD_HUES))
    fallback = dict(zip(unknown, FALLBACK_HUES * (len(unknown) // len(FALLBACK_HUES) + 1)))
    return {m: method_colour(m, fallback.get(m.partition("@")[0], "#7f7f7f")) for m in methods}


# Operators in the order of the block (bottom of a stack first), coloured by group: the linears
# in blues and purples, attention in oranges, dropout and the activation in greens, the norm in
# gold, the rest in greys. Unknown operators get the next colour of tab10.
OPERATOR_COLOURS = {
    "Linear-Q": "#08519c", "Linear-K": "#3182bd", "Linear-V": "#6baed6", "Linear-QKV": "#2171b5",
    "Linear-O": "#9ecae1", "Linear-U": "#54278f", "Linear-D": "#9e9ac8",
    "TensorMul-1": "#a63603", "TensorMul-2": "#e6550d", "Softmax": "#fdae6b",
    "Dropout": "#238b45", "Activation": "#a1d99b", "LayerNorm": "#e7ba52",
    "Embedding": "#bdbdbd", "Head/Loss": "#737373", "Other": "#d9d9d9",
}


def _hatch_colour(face: object) -> str:
    """A hatch (and edge) colour that reads on ``face``: near-white on dark bars, dark grey on
    light ones (matplotlib draws a bar's hatch in its edge colour)."""
    red, green, blue = matplotlib.colors.to_rgb(face)
    return "0.93" if 0.299 * red + 0.587 * green + 0.114 * blue < 0.5 else "0.25"


def operator_colours(operators: Sequence[str]) -> dict[str, object]:
    extra = iter(sns.color_palette("tab10", 10))
    return {op: OPERATOR_COLOURS.get(op) or next(extra, "0.5") for op in operators}


def _present(column: pd.Series) -> list[str]:
    """Category levels that occur, in category order (plain order of appearance otherwise)."""
    if isinstance(column.dtype, pd.CategoricalDtype):
        return [str(c) for c in column.cat.categories if (column == c).any()]
    return list(dict.fromkeys(column.astype(str)))


def _col_wrap(panels: Sequence[str]) -> int:
    per_model: dict[str, int] = {}
    for panel in panels:
        model = panel.split(" · ")[0]
        per_model[model] = per_model.get(model, 0) + 1
    wrap = max(per_model.values())
    if wrap == 1:
        wrap = len(panels)
    return 2 if wrap == 4 else max(1, min(wrap, 3))  # 4 panels read best as 2x2


def _line_facets(data: pd.DataFrame, y: str, ylabel: str, all_methods: Sequence[str],
                 log_when_spread: bool = False, x: str = "batch_size", xlabel: str = "batch size B") -> sns.FacetGrid:
    data = data.assign(method=data["method"].astype(str),
                       figures=np.where(data["estimated"], "estimated", "measured"))
    methods = [m for m in all_methods if m in set(data["method"])]
    styles = [s for s in FIGURE_STYLES if s in set(data["figures"])]
    panels = _present(data["panel"])
    grid = sns.relplot(
        data=data, x=x, y=y, kind="line", col="panel", col_order=panels, col_wrap=_col_wrap(panels),
        hue="method", hue_order=methods, palette=method_palette(list(all_methods)),
        style="figures", style_order=styles, markers={s: FIGURE_STYLES[s][0] for s in styles},
        dashes={s: FIGURE_STYLES[s][1] for s in styles}, markersize=7, linewidth=1.8,
        height=PANEL_HEIGHT * (1.3 if len(panels) == 1 else 1), aspect=PANEL_ASPECT,
        facet_kws={"sharey": False, "sharex": False},
    )
    grid.set_titles("{col_name}")
    grid.set_axis_labels(xlabel, ylabel)
    for panel, ax in grid.axes_dict.items():
        in_panel = data[data["panel"] == panel]
        ax.set_xticks(sorted(in_panel[x].unique()))
        values = in_panel[y][in_panel[y] > 0]
        if log_when_spread and len(values) and values.max() / values.min() > 20:
            # one method 20x above the rest would flatten every other line into the axis
            ax.set_yscale("log")
            # plain numbers: the default 10^k labels are mathtext, which is switched off
            ax.yaxis.set_major_locator(matplotlib.ticker.LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
            ax.yaxis.set_major_formatter(matplotlib.ticker.StrMethodFormatter("{x:g}"))
            ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
            ax.set_ylabel(f"{ylabel}, log scale" if ax.get_ylabel() else "")
        else:
            ax.set_ylim(bottom=0)
    return grid


@_styled
def peak_memory(cells: pd.DataFrame) -> Figure | None:
    """Peak memory (GiB/MiB) against batch size, one line per method."""
    data = cells.dropna(subset=["peak_bytes"])
    if data.empty:
        return None
    unit_name, unit = byte_unit(data["peak_bytes"].max())
    data = data.assign(peak=data["peak_bytes"] / unit)
    grid = _line_facets(data, "peak", f"peak memory ({unit_name})", _present(cells["method"]), log_when_spread=True)
    grid.figure.suptitle("Peak memory per method", y=1.02, fontsize=13)
    return grid.figure


@_styled
def per_gpu_peak(cells: pd.DataFrame) -> Figure | None:
    """Per-GPU peak (a DDP/FSDP cell's largest rank peak) against world size on a log2 axis, one
    line per method; a facet per panel and batch size. None unless the cells span two or more world sizes."""
    if "world_size" not in cells.columns:
        return None
    data = cells.dropna(subset=["peak_bytes", "world_size"])
    if data["world_size"].nunique() < 2:
        return None
    unit_name, unit = byte_unit(data["peak_bytes"].max())
    panel = data["scale_panel"].astype(str)  # the panel label without the world size
    if data["batch_size"].nunique() > 1:  # a panel holds every batch size; one line needs one
        panel = panel + " · B=" + data["batch_size"].astype(str)
    data = data.assign(peak=data["peak_bytes"] / unit, world_size=data["world_size"].astype(int), panel=panel)
    grid = _line_facets(data, "peak", f"per-GPU peak ({unit_name})", _present(cells["method"]),
                        x="world_size", xlabel="world size (GPUs)")
    for ax in grid.axes.flat:
        ticks = ax.get_xticks()
        ax.set_xscale("log", base=2)
        ax.set_xticks(ticks)
        ax.xaxis.set_major_formatter(matplotlib.ticker.StrMethodFormatter("{x:g}"))
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    grid.figure.suptitle("Per-GPU peak memory against world size", y=1.02, fontsize=13)
    return grid.figure


@_styled
def memory_ratio(cells: pd.DataFrame) -> Figure | None:
    """Full fine-tuning's peak over each method's peak, against batch size; a line at 1x."""
    data = cells[(cells["method"] != BASELINE_METHOD)].dropna(subset=["peak_ratio"])
    if data.empty:
        return None
    if "ratio_estimated" in data.columns:  # a ratio of estimates is drawn as one, measured cell or not
        data = data.assign(estimated=data["ratio_estimated"].astype(bool))
    grid = _line_facets(data, "peak_ratio", "peak: full ÷ method (×)", _present(cells["method"]))
    for ax in grid.axes.flat:
        ax.axhline(1.0, color="0.35", linewidth=1, linestyle=":")
        ax.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%.1f×"))
    grid.figure.suptitle("Memory saved against full fine-tuning (peak)", y=1.02, fontsize=13)
    return grid.figure


def _one_target(in_panel: pd.DataFrame) -> tuple[pd.DataFrame, str, int]:
    """The cells of a panel timed for its most common target, that target, and how many cells
    (timed elsewhere) are left out: times on different devices do not compare."""
    targets = in_panel["step_time_target"].astype(str)
    target = targets.mode().iloc[0]
    shown = in_panel[targets == target]
    return shown, target, len(in_panel) - len(shown)


def _timed_on(target: str, left_out: int) -> str:
    return f"on {target}" + (f"; {left_out} cell(s) timed elsewhere not drawn" if left_out else "")


@_styled
def throughput(cells: pd.DataFrame) -> Figure | None:
    """Training tokens/s against batch size: measured where the cell ran, else estimated for its
    target; a panel draws the cells of its most common target (``_one_target``)."""
    data = cells.dropna(subset=["tokens_per_s"])
    if data.empty:
        return None
    kept = {panel: _one_target(in_panel) for panel, in_panel in data.groupby("panel", sort=False, observed=True)}
    data = pd.concat([shown for shown, _, _ in kept.values()])
    grid = _line_facets(data, "tokens_per_s", "throughput (tokens/s)", _present(cells["method"]))
    for panel, ax in grid.axes_dict.items():
        ax.yaxis.set_major_formatter(matplotlib.ticker.StrMethodFormatter("{x:,.0f}"))
        _, target, left_out = kept[panel]
        ax.set_xlabel(f"batch size B ({_timed_on(target, left_out)})")
    grid.figure.suptitle("Training throughput", y=1.02, fontsize=13)
    return grid.figure


@_styled
def activation_breakdown(breakdown: pd.DataFrame) -> Figure | None:
    """Saved-for-backward bytes at each panel's largest batch size: one stacked bar per method,
    colour = operator, hatching = category."""
    if breakdown.empty:
        return None
    largest = breakdown.groupby("panel", observed=True)["batch_size"].transform("max")
    data = breakdown[breakdown["batch_size"] == largest].copy()
    data["panel"] = data["panel"].astype(str) + " · B=" + data["batch_size"].astype(int).astype(str)
    unit_name, unit = byte_unit(data.groupby("cell_id")["bytes"].sum().max())
    data["value"] = data["bytes"] / unit
    present = set(data["operator"].astype(str))
    operators = [op for op in OPERATOR_COLOURS if op in present] + sorted(present - set(OPERATOR_COLOURS))
    colours = operator_colours(operators)
    methods = _present(data["method"])
    panels = _present(data["panel"])
    grid = sns.FacetGrid(data, col="panel", col_order=panels, col_wrap=_col_wrap(panels),
                         height=(PANEL_HEIGHT + 0.6) * (1.25 if len(panels) == 1 else 1),
                         aspect=PANEL_ASPECT * 0.95, sharey=False, sharex=False)
    mixed = bool(data["estimated"].any() and not data["estimated"].all())
    grid.map_dataframe(_stacked_bars, methods=methods, operators=operators, colours=colours, mark_estimates=mixed)
    grid.set_titles("{col_name}")
    grid.set_axis_labels("", f"saved activations ({unit_name})")
    grid.tight_layout()
    # top of the legend = top of the stack
    handles = [Patch(facecolor=colours[op], edgecolor="0.3", label=op) for op in reversed(operators)]
    categories = [c for c in CATEGORY_HATCHES if c in set(data["category"])]
    categories += sorted(set(data["category"]) - set(categories))
    handles.append(Patch(visible=False, label=""))
    handles += [Patch(facecolor="white", edgecolor="0.3", hatch=CATEGORY_HATCHES.get(c, "++"), label=c)
                for c in categories]
    if mixed:
        handles.append(Patch(visible=False, label="est. = estimated (meta)"))
    grid.figure.legend(handles=handles, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False,
                       title="operator (top of stack first)\n/ category")
    grid.figure.suptitle("Saved activations by operator and category", y=1.02, fontsize=13)
    return grid.figure


def _stacked_bars(data: pd.DataFrame, *, methods: Sequence[str], operators: Sequence[str],
                  colours: dict, mark_estimates: bool = False, **_: object) -> None:
    """One stacked bar per method, its total on top (and ``est.`` where a panel mixes measured
    and estimated bars)."""
    ax = plt.gca()
    present = [m for m in methods if (data["method"].astype(str) == m).any()]
    totals = []
    for x, method in enumerate(present):
        rows = data[data["method"].astype(str) == method]
        bottom = 0.0
        for operator in operators:
            for category, part in rows[rows["operator"].astype(str) == operator].groupby("category"):
                height = part["value"].sum()
                if height <= 0:
                    continue
                ax.bar(x, height, bottom=bottom, width=0.72, color=colours[operator],
                       hatch=CATEGORY_HATCHES.get(category, "++"), edgecolor=_hatch_colour(colours[operator]),
                       linewidth=0.4)
                bottom += height
        totals.append(bottom)
        label = f"{bottom:.3g}" + (" est." if mark_estimates and rows["estimated"].any() else "")
        ax.annotate(label, (x, bottom), xytext=(0, 2), textcoords="offset points", ha="center",
                    va="bottom", fontsize=8, color="0.2")
    ax.set_xticks(range(len(present)))
    ax.set_xticklabels(present, rotation=30, ha="right")
    if totals:
        ax.set_ylim(0, max(totals) * 1.1)


def _count(value: float) -> str:
    """A batch size short enough to sit on a bar: 512, 12.3k, 209k."""
    if value >= 100_000:
        return f"{value / 1000:.0f}k"
    return f"{value / 1000:.1f}k" if value >= 10_000 else f"{value:.0f}"


@_styled
def max_batch(frame: pd.DataFrame) -> Figure | None:
    """The largest batch size that fits each memory budget: bars per method, one per budget.

    Extrapolated values (beyond the grid's batch sizes) are cross-hatched, capped ones (the
    line reaches past the extrapolation limit) labelled ``≥``; both are in the legend."""
    if frame.empty:
        return None
    data = frame.assign(method=frame["method"].astype(str))
    methods = _present(frame["method"])
    budgets = list(dict.fromkeys(data.sort_values("budget_bytes", ascending=False)["budget"]))
    panels = _present(data["panel"])
    grid = sns.FacetGrid(data, col="panel", col_order=panels, col_wrap=_col_wrap(panels),
                         height=(PANEL_HEIGHT + 0.6) * (1.25 if len(panels) == 1 else 1),
                         aspect=PANEL_ASPECT * 0.95, sharey=False, sharex=False)
    palette = dict(zip(budgets, sns.color_palette("crest", len(budgets))))
    grid.map_dataframe(sns.barplot, x="method", y="max_batch_size", hue="budget", order=methods,
                       hue_order=budgets, palette=palette, saturation=1, edgecolor="0.3", linewidth=0.4)
    # hatch estimates only where they sit next to measured bars (titles say "[estimated]")
    mixed = bool(data["estimated"].any() and not data["estimated"].all())
    for panel, ax in grid.axes_dict.items():
        _mark_batch_bars(ax, data[data["panel"] == panel], methods, budgets, palette, mixed)
    grid.set_titles("{col_name}")
    grid.set_axis_labels("", "largest batch size B")
    grid.tight_layout()
    handles = [Patch(facecolor=palette[b], edgecolor="0.3", label=b) for b in budgets]
    if data["extrapolated"].any():
        handles.append(Patch(facecolor="white", edgecolor="0.3", hatch=EXTRAPOLATED_HATCH,
                             label="extrapolated beyond the grid"))
    if data["capped"].any():
        handles.append(Patch(visible=False, label="≥ capped at the extrapolation limit"))
    if mixed:
        handles.append(Patch(facecolor="white", edgecolor="0.3", hatch=ESTIMATED_HATCH, label="estimated (meta)"))
    grid.figure.legend(handles=handles, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False,
                       title="memory budget")
    grid.figure.suptitle("Largest batch size within a memory budget", y=1.02, fontsize=13)
    return grid.figure


def _mark_batch_bars(ax, in_panel: pd.DataFrame, methods: Sequence[str], budgets: Sequence[str],
                     palette: dict, mixed: bool) -> None:
    """Hatch and label one panel's bars: seaborn draws one container per budget (hue), one bar
    per method in ``methods`` order."""
    by_key = {(r.method, r.budget): r for r in in_panel.itertuples()}
    for container in ax.containers:
        labels = []
        for bar in container:  # a bar's method by its position, its budget by its colour
            index = int(round(bar.get_x() + bar.get_width() / 2))
            budget = next((b for b in budgets if np.allclose(bar.get_facecolor()[:3], palette[b], atol=1e-3)), None)
            row = by_key.get((methods[index], budget)) if 0 <= index < len(methods) else None
            if row is None:
                labels.append("")
                continue
            hatch = (EXTRAPOLATED_HATCH if row.extrapolated else "") + (ESTIMATED_HATCH if mixed and row.estimated else "")
            if hatch:
                bar.set_hatch(hatch)
                bar.set_edgecolor(_hatch_colour(palette[budget]))
            labels.append(("≥" if row.capped else "") + _count(bar.get_height()))
        ax.bar_label(container, labels=labels, fontsize=7, padding=2, rotation=90)
    for x, method in enumerate(methods):
        if method not in set(in_panel["method"]):  # no usable cells: say so rather than leave a gap
            ax.annotate("no data", (x, 0), xytext=(0, 3), textcoords="offset points", ha="center",
                        fontsize=8, color="0.4")
    ax.set_xticks(range(len(methods)))
    ax.set_xticklabels(methods, rotation=30, ha="right")
    ax.margins(y=0.2)


@_styled
def memory_time(cells: pd.DataFrame) -> Figure | None:
    """Peak memory against step time per panel: one point per method and batch size, a line
    through each method's batch sizes (in B order, each point labelled ``B``). A point whose
    memory or step time is an estimate has an ``X`` marker, and a method's line is dashed where
    any of its points is. Times on different devices do not compare: a panel draws the cells
    timed for its most common target, and its x label counts the others left out."""
    if "step_time_s" not in cells.columns:
        return None
    data = cells.dropna(subset=["peak_bytes", "step_time_s"])
    if data.empty:
        return None
    unit_name, unit = byte_unit(data["peak_bytes"].max())
    data = data.assign(method=data["method"].astype(str), peak=data["peak_bytes"] / unit,
                       point_estimated=data["estimated"] | (data["step_time_kind"] == "estimated"))
    methods = [m for m in _present(cells["method"]) if m in set(data["method"])]
    palette = method_palette(_present(cells["method"]))
    panels = _present(data["panel"])
    grid = sns.FacetGrid(data, col="panel", col_order=panels, col_wrap=_col_wrap(panels),
                         height=PANEL_HEIGHT * (1.3 if len(panels) == 1 else 1), aspect=PANEL_ASPECT,
                         sharex=False, sharey=False)
    grid.set_titles("{col_name}")
    grid.set_axis_labels("", f"peak memory ({unit_name})")
    for panel, ax in grid.axes_dict.items():
        shown, target, left_out = _one_target(data[data["panel"] == panel])
        _trade_off_panel(ax, shown, methods, palette)
        ax.set_xlabel(f"step time (s {_timed_on(target, left_out)})")
    grid.tight_layout()
    handles = [matplotlib.lines.Line2D([], [], color=palette[m], marker="o", label=m) for m in methods]
    styles = [s for s in FIGURE_STYLES if s in set(np.where(data["point_estimated"], "estimated", "measured"))]
    if len(styles) > 1 or styles == ["estimated"]:
        handles.append(Patch(visible=False, label=""))
        handles += [matplotlib.lines.Line2D([], [], color="0.3", marker=FIGURE_STYLES[s][0],
                                            dashes=FIGURE_STYLES[s][1] or (None, None), label=s) for s in styles]
    grid.figure.legend(handles=handles, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False, title="method")
    grid.figure.suptitle("Memory against step time (down and left is better)", y=1.02, fontsize=13)
    return grid.figure


def _trade_off_panel(ax, in_panel: pd.DataFrame, methods: Sequence[str], palette: dict) -> None:
    for method in methods:
        points = in_panel[in_panel["method"] == method].sort_values("batch_size")
        if points.empty:
            continue
        estimated = bool(points["point_estimated"].any())
        ax.plot(points["step_time_s"], points["peak"], color=palette[method], linewidth=1.6,
                dashes=FIGURE_STYLES["estimated"][1] if estimated else (None, None))
        for style, marked in (("measured", ~points["point_estimated"]), ("estimated", points["point_estimated"])):
            ax.scatter(points.loc[marked, "step_time_s"], points.loc[marked, "peak"], color=palette[method],
                       marker=FIGURE_STYLES[style][0], s=42, zorder=3)
        for x, y, b in zip(points["step_time_s"], points["peak"], points["batch_size"]):
            ax.annotate(f"B={int(b)}", (x, y), xytext=(4, 3), textcoords="offset points", fontsize=7, color="0.35")
    ax.set_xlim(left=0)
    ax.set_ylim(bottom=0)


@_styled
def fits_matrix(fit: pd.DataFrame) -> Figure | None:
    """A heatmap per panel, methods x batch sizes: each cell coloured by the smallest budget its
    step fits (``profiler.fits.smallest_fitting_budget``; darker = a smaller card, red = none)
    and annotated with the memory it needs (peak with the margin)."""
    from profiler.fits import budget_label, smallest_fitting_budget

    if fit.empty:
        return None
    budgets = sorted(fit["budget_bytes"].unique())  # smallest first
    table = smallest_fitting_budget(fit)
    # level 0 = fits the smallest budget ... len(budgets) = fits none
    level = {b: i for i, b in enumerate(budgets)}
    table["level"] = [len(budgets) if pd.isna(b) else level[b] for b in table["smallest_budget"]]
    greens = sns.blend_palette(["#1b7837", "#d9f0d3"], len(budgets)) if len(budgets) > 1 else ["#1b7837"]
    colours = [*greens, "#f4b6b0"]
    cmap = matplotlib.colors.ListedColormap(colours)
    panels = _present(table["panel"])
    methods = _present(fit["method"])
    unit_name, unit = byte_unit(table["needed_bytes"].max())
    wrap = _col_wrap(panels)
    rows = -(-len(panels) // wrap)
    width = 1.2 + 0.9 * table["batch_size"].nunique()
    figure, axes = plt.subplots(rows, wrap, figsize=(wrap * width + 1.5, rows * (0.8 + 0.42 * len(methods))),
                                squeeze=False)
    for ax, panel in zip(axes.flat, panels):
        in_panel = table[table["panel"] == panel]  # "est." only where a panel mixes kinds
        _fits_panel(ax, in_panel, methods, cmap, len(budgets), unit, in_panel["estimated"].nunique() > 1)
        ax.set_title(panel)
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    labels = [f"fits {budget_label(b)}" for b in budgets] + [f"does not fit {budget_label(budgets[-1])}"]
    handles = [Patch(facecolor=c, edgecolor="0.4", label=text) for c, text in zip(colours, labels)]
    handles.append(Patch(visible=False, label=f"numbers: memory needed ({unit_name})"))
    figure.legend(handles=handles, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False,
                  title="smallest budget that fits")
    figure.suptitle("Fits per memory budget (peak + allocator reserve + CUDA context)", y=1.02, fontsize=13)
    figure.tight_layout()
    return figure


def _fits_panel(ax, in_panel: pd.DataFrame, methods: Sequence[str], cmap, n_budgets: int, unit: int,
                mixed: bool) -> None:
    sizes = sorted(in_panel["batch_size"].unique())
    grid = np.full((len(methods), len(sizes)), np.nan)
    for row in in_panel.itertuples():
        i, j = methods.index(str(row.method)), sizes.index(row.batch_size)
        grid[i, j] = row.level
        text = f"{row.needed_bytes / unit:.3g}" + (" est." if mixed and row.estimated else "")
        ax.text(j, i, text, ha="center", va="center", fontsize=8, color="white" if row.level == 0 else "0.1")
    for i, j in zip(*np.nonzero(np.isnan(grid))):
        ax.text(j, i, "no figure", ha="center", va="center", fontsize=7, color="0.45")
    ax.imshow(np.ma.masked_invalid(grid), cmap=cmap, vmin=-0.5, vmax=n_budgets + 0.5, aspect="auto")
    ax.set_xticks(range(len(sizes)), [f"B={b}" for b in sizes])
    ax.set_yticks(range(len(methods)), methods)
    ax.set_xticks(np.arange(-0.5, len(sizes)), minor=True)
    ax.set_yticks(np.arange(-0.5, len(methods)), minor=True)
    ax.grid(which="minor", color="white", linewidth=2)
    ax.grid(which="major", visible=False)
    ax.tick_params(which="minor", length=0)
