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
CATEGORY_HATCHES = {"sampled": "////", "lossless": "..", "uncompressed": ""}
FIGURE_STYLES = {"measured": ("o", ""), "estimated": ("X", (4, 2))}  # marker, dashes
_RC = {"text.parse_math": False, "hatch.linewidth": 0.6, "axes.titlesize": 10.5, "legend.fontsize": 9}


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


def method_palette(methods: Sequence[str]) -> dict[str, tuple[float, float, float]]:
    """One colour per method, stable across every figure of a report.

    Methods of one family (the name before ``@``: ``wtacrs@0.3`` and ``wtacrs@0.1``) share a hue,
    darkest first, so a reader sees at once which lines are the same method at another ratio.
    """
    families = list(dict.fromkeys(m.split("@")[0] for m in methods))
    # tab10's first five hues are far apart (blue, orange, green, red, purple); colorblind's
    # orange and vermillion are not, and lora next to wtacrs is the comparison people read
    hues = sns.color_palette("tab10", max(len(families), 1))
    if len(families) > len(hues):
        hues = sns.color_palette("husl", len(families))
    palette = {}
    for family, hue in zip(families, hues):
        members = [m for m in methods if m.split("@")[0] == family]
        for i, method in enumerate(members):
            # toward white: 0% for the first member, up to 55% for the last
            mix = 0.55 * i / (len(members) - 1) if len(members) > 1 else 0.0
            palette[method] = tuple(c + (1.0 - c) * mix for c in hue)
    return palette


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
                 log_when_spread: bool = False) -> sns.FacetGrid:
    data = data.assign(method=data["method"].astype(str),
                       figures=np.where(data["estimated"], "estimated", "measured"))
    methods = [m for m in all_methods if m in set(data["method"])]
    styles = [s for s in FIGURE_STYLES if s in set(data["figures"])]
    panels = _present(data["panel"])
    grid = sns.relplot(
        data=data, x="batch_size", y=y, kind="line", col="panel", col_order=panels, col_wrap=_col_wrap(panels),
        hue="method", hue_order=methods, palette=method_palette(list(all_methods)),
        style="figures", style_order=styles, markers={s: FIGURE_STYLES[s][0] for s in styles},
        dashes={s: FIGURE_STYLES[s][1] for s in styles}, markersize=7, linewidth=1.8,
        height=PANEL_HEIGHT * (1.3 if len(panels) == 1 else 1), aspect=PANEL_ASPECT,
        facet_kws={"sharey": False, "sharex": False},
    )
    grid.set_titles("{col_name}")
    grid.set_axis_labels("batch size B", ylabel)
    for panel, ax in grid.axes_dict.items():
        in_panel = data[data["panel"] == panel]
        ax.set_xticks(sorted(in_panel["batch_size"].unique()))
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


@_styled
def throughput(cells: pd.DataFrame) -> Figure | None:
    """Training tokens/s against batch size, for the cells where it was measured."""
    data = cells.dropna(subset=["tokens_per_s"])
    if data.empty:
        return None
    grid = _line_facets(data, "tokens_per_s", "throughput (tokens/s)", _present(cells["method"]))
    for ax in grid.axes.flat:
        ax.yaxis.set_major_formatter(matplotlib.ticker.StrMethodFormatter("{x:,.0f}"))
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
    handles += [Patch(facecolor="white", edgecolor="0.3", hatch=CATEGORY_HATCHES.get(c, "xx"), label=c)
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
                       hatch=CATEGORY_HATCHES.get(category, "xx"), edgecolor="0.3", linewidth=0.4)
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
    """The largest batch size that fits each memory budget: bars per method, one per budget."""
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
                       hue_order=budgets, palette=palette, edgecolor="0.3", linewidth=0.4)
    # hatch estimates only where they sit next to measured bars (titles say "[estimated]")
    mixed = bool(data["estimated"].any() and not data["estimated"].all())
    for panel, ax in grid.axes_dict.items():
        in_panel = data[data["panel"] == panel]
        estimated = set(in_panel.loc[in_panel["estimated"], "method"]) if mixed else set()
        for container in ax.containers:
            for method, bar in zip(methods, container):
                if method in estimated:
                    bar.set_hatch("////")
            ax.bar_label(container, labels=[_count(bar.get_height()) for bar in container], fontsize=7, padding=1)
        for x, method in enumerate(methods):
            if method not in set(in_panel["method"]):  # no usable cells: say so rather than leave a gap
                ax.annotate("no data", (x, 0), xytext=(0, 3), textcoords="offset points", ha="center",
                            fontsize=8, color="0.4")
        ax.set_xticks(range(len(methods)))
        ax.set_xticklabels(methods, rotation=30, ha="right")
        ax.margins(y=0.12)
    grid.set_titles("{col_name}")
    grid.set_axis_labels("", "largest batch size B")
    grid.tight_layout()
    handles = [Patch(facecolor=palette[b], edgecolor="0.3", label=b) for b in budgets]
    if mixed:
        handles.append(Patch(facecolor="white", edgecolor="0.3", hatch="////", label="estimated (meta)"))
    grid.figure.legend(handles=handles, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False,
                       title="memory budget")
    grid.figure.suptitle("Largest batch size within a memory budget", y=1.02, fontsize=13)
    return grid.figure
