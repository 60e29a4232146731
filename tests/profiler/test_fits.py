"""Fits within a memory budget: budgets in GiB and GB, the CUDA margin, the capped batch limit, and
the fits matrix, on hand-computed bytes."""

from __future__ import annotations

import pandas as pd
import pytest

from profiler.fits import (
    ALLOCATOR_RESERVE,
    CUDA_CONTEXT_BYTES,
    GB,
    MAX_EXTRAPOLATION,
    budget_label,
    fits,
    fits_frame,
    max_batch_size,
    needed_bytes,
    parse_budget,
    smallest_fitting_budget,
    usable_bytes,
)
from profiler.units import GiB, MiB


@pytest.mark.parametrize("text, expected", [
    ("24GB", 24 * 10**9), ("24 gb", 24 * 10**9), ("24G", 24 * 10**9), ("22.35GiB", int(22.35 * GiB)),
    ("80", 80 * GiB), ("0.5gib", GiB // 2),
])
def test_budgets_read_decimal_gb_and_binary_gib(text, expected):
    assert parse_budget(text) == expected


@pytest.mark.parametrize("text", ["24TB", "", "GB", "-3GB", "0", "24 GB extra", "1e9"])
def test_a_budget_that_is_no_memory_size_is_refused(text):
    with pytest.raises(ValueError, match="is not a memory size; give e.g. 24GB"):
        parse_budget(text)


def test_a_24_gb_card_is_22_35_gib_and_labels_say_both():
    assert budget_label(24 * GB) == "22.35 GiB = 24 GB"
    assert budget_label(24 * GiB) == "24 GiB = 25.8 GB"


def test_the_margin_is_the_context_plus_the_allocator_reserve():
    peak = 10 * GiB
    assert needed_bytes(peak) == peak * (1 + ALLOCATOR_RESERVE) + CUDA_CONTEXT_BYTES
    assert needed_bytes(peak) == pytest.approx(11.5 * GiB)  # 10 GiB + 10% + 0.5 GiB
    budget = 24 * GB
    limit = usable_bytes(budget)
    assert fits(limit, budget) and not fits(limit + MiB, budget)
    assert not fits(budget, budget)  # a peak of the card's whole size does not fit it


def test_extrapolation_stops_at_the_stated_factor():
    sizes = [16, 64]
    peaks = [2 * GiB + b * GiB // 4 for b in sizes]  # 2 GiB + B/4 GiB: 80 GiB holds B = 312
    assert max_batch_size(sizes, peaks, 80 * GiB, max_factor=None) == (312, True, False)
    assert max_batch_size(sizes, peaks, 80 * GiB) == (int(MAX_EXTRAPOLATION * 64), True, True)
    assert max_batch_size(sizes, peaks, 34 * GiB) == (128, True, False)  # exactly 2x: reached, not capped


def _cells(peaks: dict[tuple[str, int], float | None]) -> pd.DataFrame:
    rows = [dict(panel="p", method=m, batch_size=b, peak_bytes=peak, estimated=True) for (m, b), peak in peaks.items()]
    frame = pd.DataFrame(rows)
    frame["method"] = pd.Categorical(frame["method"], categories=["full", "lora"], ordered=True)
    return frame


def test_fits_matrix_per_budget_from_the_peaks():
    # needed = 1.1 x peak + 0.5 GiB: 10 GiB -> 11.5, 20 GiB -> 22.5, 40 GiB -> 44.5
    cells = _cells({("full", 8): 10 * GiB, ("full", 16): 20 * GiB, ("lora", 8): 40 * GiB, ("lora", 16): None})
    fit = fits_frame(cells, [24 * GiB, 48 * GiB])
    assert list(fit["budget_bytes"].unique()) == [48 * GiB, 24 * GiB]  # largest first
    assert len(fit) == 6  # the cell without a peak has no row
    verdict = {(r.method, r.batch_size, r.budget_bytes): r.fits for r in fit.itertuples()}
    assert verdict == {("full", 8, 48 * GiB): True, ("full", 16, 48 * GiB): True, ("lora", 8, 48 * GiB): True,
                       ("full", 8, 24 * GiB): True, ("full", 16, 24 * GiB): True, ("lora", 8, 24 * GiB): False}
    assert fit.loc[(fit["method"] == "lora"), "needed_bytes"].iloc[0] == pytest.approx(44.5 * GiB)
    smallest = smallest_fitting_budget(fit).set_index(["method", "batch_size"])["smallest_budget"]
    assert smallest[("full", 8)] == 24 * GiB and smallest[("lora", 8)] == 48 * GiB


def test_a_cell_fitting_no_budget_has_no_smallest_budget():
    fit = fits_frame(_cells({("full", 8): 100 * GiB}), [24 * GiB, 80 * GiB])
    assert not fit["fits"].any()
    assert smallest_fitting_budget(fit)["smallest_budget"].isna().all()
