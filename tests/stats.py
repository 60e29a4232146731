"""The pooled unbiasedness statistic of the tests that average sampled gradients."""

from __future__ import annotations

import math

import torch
from torch import Tensor


def pooled_bias_statistic(draws: Tensor, exact: Tensor, z: float = 6.0) -> tuple[float, float]:
    """``(statistic, bound)`` for ``D`` draws ``[D, m]`` of an estimator of ``exact`` ``[m]``.

    Over the entries ``j`` that vary between draws, with errors ``e = draws - exact``: the
    statistic is ``sum_j mean(e_j)^2 / sum_j (var(e_j) / D)``, about 1 for an unbiased estimator
    and growing like ``D`` with a bias. Its spread comes from the estimated covariance of the
    errors (entries of one weight share a row sample, so they are far from independent): the
    mean errors hold ``nu = tr(S)^2 / tr(S^2)`` effective independent entries (``S`` the sample
    covariance, through the ``[D, D]`` Gram matrix; at most ``D - 1``, so the bound errs wide),
    the statistic is about ``chi^2_nu / nu``, and ``bound = 1 + z * sqrt(2 / nu * D / (D - 1))``
    (the last factor for the estimated denominator). The entries that never vary must be exact
    (to float noise); that is asserted here.
    """
    draws, exact = draws.double(), exact.double()
    err = draws - exact
    count = err.shape[0]
    live = err.var(0) > 0
    still = err[:, ~live].mean(0).abs()
    assert bool((still <= 1e-5 + 1e-4 * exact.abs().max()).all()), float(still.max())
    centred = err[:, live] - err[:, live].mean(0)
    gram = centred @ centred.T / (count - 1)
    nu = float(torch.trace(gram) ** 2 / gram.pow(2).sum())
    statistic = float(err[:, live].mean(0).pow(2).sum() / (torch.trace(gram) / count))
    return statistic, 1 + z * math.sqrt(2 / nu * count / (count - 1))
