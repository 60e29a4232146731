"""Does a training step fit a GPU's memory? Budgets, the margin a real GPU needs, and batch limits.

A cell's peak (``memory.peak_bytes``) is what the step's tensors take: on cuda the caching
allocator's ``max_memory_allocated``, on meta its estimate. A GPU of ``budget`` bytes needs more
than that for the same step, so a cell **fits** when::

    peak_bytes * (1 + ALLOCATOR_RESERVE) + CUDA_CONTEXT_BYTES <= budget

- ``CUDA_CONTEXT_BYTES`` (0.5 GiB): the CUDA context, loaded kernels and cuBLAS workspace a
  PyTorch process holds before its first tensor; it never shows in ``max_memory_allocated``.
- ``ALLOCATOR_RESERVE`` (10% of the peak): the caching allocator reserves whole segments and
  rounds blocks, so ``max_memory_reserved`` sits above ``max_memory_allocated``, and a run that
  needs more than the reserved memory fails with OOM.

Both values are assumed, typical of published reports, not measured here (no GPU was lent yet).

Both are stated on the report page and in ``python -m profiler estimate``. Budgets are sizes in
GiB (2**30 bytes) in suites; a GPU vendor's "24 GB" may mean 24 * 10**9 bytes (22.35 GiB), so
every label gives both units, and ``parse_budget`` reads either (``24GB``, ``22.35GiB``).

The largest batch size within a budget (``max_batch_size``) is interpolated linearly in B
between grid points and extrapolated beyond them, but never past ``MAX_EXTRAPOLATION`` (2x) the
largest batch size on the grid: a longer reach rests on a line nothing measured.
"""

from __future__ import annotations

import bisect
import math
import re
from collections.abc import Sequence
from typing import TYPE_CHECKING, NamedTuple

from profiler.units import GiB, MiB

if TYPE_CHECKING:  # pandas and numpy load with the report, not with `python -m profiler --help`
    import pandas as pd

GB = 10**9  # a decimal gigabyte, as memory sizes are often sold
CUDA_CONTEXT_BYTES = 512 * MiB
ALLOCATOR_RESERVE = 0.10
MAX_EXTRAPOLATION = 2.0
MARGIN_NOTE = (f"A cell fits a budget when peak × {1 + ALLOCATOR_RESERVE:g} + {CUDA_CONTEXT_BYTES / GiB:g} GiB "
               f"≤ budget: {ALLOCATOR_RESERVE:.0%} for the caching allocator's reserve above its allocated "
               f"peak and {CUDA_CONTEXT_BYTES / GiB:g} GiB for the CUDA context and cuBLAS workspace "
               "(profiler/fits.py).")

_SIZE = re.compile(r"\s*(?P<number>[0-9]*\.?[0-9]+)\s*(?P<unit>GiB|GB|G)?\s*", re.IGNORECASE)


def parse_budget(text: str) -> int:
    """Bytes of a memory size: ``24GB`` (decimal, 24 * 10**9), ``24GiB`` or a bare ``24``
    (binary, 24 * 2**30). Raises ValueError saying what is expected."""
    match = _SIZE.fullmatch(str(text))
    value = float(match["number"]) if match else math.nan
    if not match or not 0 < value < 1e6:
        raise ValueError(f"{text!r} is not a memory size; give e.g. 24GB (10^9 bytes) or 22.35GiB (2^30 bytes)")
    unit = (match["unit"] or "GiB").lower()
    return int(value * (GiB if unit == "gib" else GB))


def budget_label(nbytes: float) -> str:
    """A budget in both units: ``24 GiB = 25.8 GB``, ``22.35 GiB = 24 GB``."""
    return f"{nbytes / GiB:.4g} GiB = {nbytes / GB:.3g} GB"


def needed_bytes(peak_bytes: float) -> float:
    """What a GPU must have for a step of ``peak_bytes``: the peak, the allocator's reserve and
    the CUDA context."""
    return peak_bytes * (1 + ALLOCATOR_RESERVE) + CUDA_CONTEXT_BYTES


def usable_bytes(budget: float) -> float:
    """The largest peak that fits ``budget`` (the inverse of ``needed_bytes``); may be <= 0."""
    return (budget - CUDA_CONTEXT_BYTES) / (1 + ALLOCATOR_RESERVE)


def fits(peak_bytes: float, budget: float) -> bool:
    return needed_bytes(peak_bytes) <= budget


class BatchLimit(NamedTuple):
    """The largest batch size within a budget: ``batch_size`` (None: no line to extrapolate),
    ``extrapolated`` (outside the grid's batch sizes), ``capped`` (the line reaches beyond
    ``MAX_EXTRAPOLATION`` x the largest grid batch size: the true limit is at least this)."""

    batch_size: int | None
    extrapolated: bool = False
    capped: bool = False


def max_batch_size(batch_sizes: Sequence[float], peaks: Sequence[float], limit: float, min_slope: float = 0.0,
                   max_factor: float | None = MAX_EXTRAPOLATION) -> BatchLimit:
    """The largest integer batch size whose peak is at most ``limit`` bytes.

    Peak memory is close to affine in B, so it is interpolated linearly between grid points and
    extrapolated along the first/last segment. Above the grid the slope is at least
    ``min_slope`` (bytes per sample): a peak that falls in the optimizer step is flat in B while
    the grid is small, yet the activations (exactly linear in B) overtake it. The result is
    capped at ``max_factor`` x the largest grid batch size (None: no cap). None with fewer than
    two distinct batch sizes or a slope that is not positive; 0 when not even B=1 fits.
    """
    points = sorted({int(b): float(p) for b, p in zip(batch_sizes, peaks)}.items())
    if len(points) < 2:
        return BatchLimit(None)
    bs = [float(b) for b, _ in points]
    ps = [p for _, p in points]
    above = limit >= ps[-1]
    if limit < ps[0]:
        segment = 0
    elif above:
        segment = len(points) - 2
    else:
        segment = min(max(bisect.bisect_right(ps, limit) - 1, 0), len(points) - 2)
    slope = (ps[segment + 1] - ps[segment]) / (bs[segment + 1] - bs[segment])
    if above:  # from the last point, at least the activations' slope
        slope, segment = max(slope, min_slope), segment + 1
    if not slope > 0:
        return BatchLimit(None)
    b_max = bs[segment] + (limit - ps[segment]) / slope
    extrapolated = not (bs[0] <= b_max <= bs[-1])
    if max_factor is not None and b_max > max_factor * bs[-1]:
        return BatchLimit(math.floor(max_factor * bs[-1]), True, True)
    return BatchLimit(max(0, math.floor(b_max + 1e-9)), extrapolated)


def fits_frame(cells: pd.DataFrame, budgets: Sequence[int]) -> pd.DataFrame:
    """Per usable cell and budget: does its step fit (``fits``)?

    ``cells`` needs ``panel``, ``method``, ``batch_size``, ``peak_bytes`` and ``estimated``
    (``profiler.report.cells_frame``). Columns: those, ``budget_bytes``, ``budget`` (both units),
    ``needed_bytes`` and ``fits``; budgets largest first.
    """
    import pandas as pd

    columns = ["panel", "method", "batch_size", "estimated", "peak_bytes", "budget_bytes", "budget",
               "needed_bytes", "fits"]
    usable = cells.dropna(subset=["peak_bytes"])
    rows = [dict(panel=cell["panel"], method=cell["method"], batch_size=int(cell["batch_size"]),
                 estimated=bool(cell["estimated"]), peak_bytes=cell["peak_bytes"], budget_bytes=budget,
                 budget=budget_label(budget), needed_bytes=needed_bytes(cell["peak_bytes"]),
                 fits=fits(cell["peak_bytes"], budget))
            for budget in sorted(budgets, reverse=True) for _, cell in usable.iterrows()]
    frame = pd.DataFrame(rows, columns=columns)
    if not frame.empty and isinstance(cells["method"].dtype, pd.CategoricalDtype):
        frame["method"] = pd.Categorical(frame["method"].astype(str), categories=cells["method"].cat.categories,
                                         ordered=True)
    return frame


def smallest_fitting_budget(fit: pd.DataFrame) -> pd.DataFrame:
    """Per (panel, method, batch size) of a ``fits_frame``: the smallest budget it fits
    (``budget_bytes``, NaN where none), for the heatmap."""
    keys = ["panel", "method", "batch_size"]
    smallest = fit[fit["fits"]].groupby(keys, observed=True)["budget_bytes"].min()
    base = fit.drop_duplicates(keys)[keys + ["estimated", "peak_bytes", "needed_bytes"]]
    return base.merge(smallest.rename("smallest_budget").reset_index(), on=keys, how="left")
