import math

import pytest
import torch

from wtacrs.estimator import (
    budget,
    crs_sample,
    estimate_product,
    row_probabilities,
    sample_rows,
    topk_sample,
    wtacrs_sample,
)

TRIALS = 4000


def _heavy_tailed(n=64, a=6, b=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, a, generator=g)
    # a few rows carry most of the norm: the regime where winners pay off
    x = x * (torch.rand(n, 1, generator=g) ** -2.0)
    y = torch.randn(n, b, generator=g)
    return x, y


def _many_estimates(x, y, k, method, trials=TRIALS, seed=1, grad_norm=None):
    g = torch.Generator().manual_seed(seed)
    xs = x.expand(trials, *x.shape)
    ys = y.expand(trials, *y.shape)
    gn = None if grad_norm is None else grad_norm.expand(trials, *grad_norm.shape)
    return estimate_product(xs, ys, k, method=method, generator=g, grad_norm=gn)


@pytest.mark.parametrize(
    "n,ratio,min_k,expected",
    [(10, 0.3, 1, 3), (100, 0.1, 1, 10), (7, 0.3, 1, 3), (4, 0.1, 1, 1), (4, 0.1, 3, 3), (5, 1.0, 1, 5), (1, 0.3, 8, 1)],
)
def test_budget(n, ratio, min_k, expected):
    assert budget(n, ratio, min_k) == expected


def test_budget_rejects_bad_ratio():
    with pytest.raises(ValueError, match="ratio"):
        budget(10, 0.0)
    with pytest.raises(ValueError, match="ratio"):
        budget(10, 1.5)


def test_probabilities_are_fp32_and_proportional_to_norm_times_grad_norm():
    x = torch.tensor([[3.0, 4.0], [0.0, 1.0], [0.0, 0.0]], dtype=torch.float16)
    g = torch.tensor([1.0, 5.0, 7.0])
    p = row_probabilities(x, g)
    assert p.dtype == torch.float32
    torch.testing.assert_close(p, torch.tensor([0.5, 0.5, 0.0]))


@pytest.mark.parametrize("method", ["wtacrs", "crs"])
def test_estimate_is_unbiased(method):
    x, y = _heavy_tailed()
    exact = x.T @ y
    est = _many_estimates(x, y, k=16, method=method)
    mean, sd = est.mean(0), est.std(0)
    # z-bound from the measured spread of the estimates: 5 standard errors per entry
    bound = 5 * sd / math.sqrt(TRIALS) + 1e-4 * exact.abs().max()
    assert ((mean - exact).abs() <= bound).all(), ((mean - exact).abs() / bound).max()


def test_estimate_is_unbiased_with_gradient_norms():
    x, y = _heavy_tailed(seed=3)
    g = torch.linalg.vector_norm(y, dim=-1) * (torch.rand(y.shape[0], generator=torch.Generator().manual_seed(4)) + 0.5)
    exact = x.T @ y
    est = _many_estimates(x, y, k=12, method="wtacrs", grad_norm=g)
    bound = 5 * est.std(0) / math.sqrt(TRIALS) + 1e-4 * exact.abs().max()
    assert ((est.mean(0) - exact).abs() <= bound).all()


def test_winner_take_all_lowers_variance_on_heavy_tailed_rows():
    x, y = _heavy_tailed()
    exact = x.T @ y
    g = torch.linalg.vector_norm(y, dim=-1)
    err = {m: ((_many_estimates(x, y, 16, m, grad_norm=g) - exact) ** 2).sum((1, 2)).mean() for m in ("wtacrs", "crs")}
    p = row_probabilities(x, g)
    assert wtacrs_sample(p, 16).weights.eq(1).sum() > 0  # a winner set exists here
    assert err["wtacrs"] < 0.7 * err["crs"], err


def test_wtacrs_equals_crs_when_no_winner_qualifies():
    # identical row norms: p is uniform, the best winner set is empty, and the draws coincide
    x = torch.nn.functional.normalize(torch.randn(40, 6, generator=torch.Generator().manual_seed(0)), dim=-1)
    y = torch.randn(40, 3)
    wta = estimate_product(x, y, 8, method="wtacrs", generator=torch.Generator().manual_seed(5))
    crs = estimate_product(x, y, 8, method="crs", generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(wta, crs)


def test_winner_set_keeps_dominant_rows_with_weight_one():
    p = torch.tensor([0.5, 0.3] + [0.2 / 18] * 18)
    s = wtacrs_sample(p, 4, torch.Generator().manual_seed(0))
    assert s.indices[:2].tolist() == [0, 1]
    assert s.weights[:2].tolist() == [1.0, 1.0]
    # the two other slots share the residual mass 0.2 equally over 2 draws of p_j = 0.2/18
    torch.testing.assert_close(s.weights[2:], torch.full((2,), 0.2 / (2 * 0.2 / 18)))


def test_zero_residual_mass_pads_with_zero_weight():
    p = torch.tensor([0.6, 0.4, 0.0, 0.0, 0.0, 0.0])
    s = wtacrs_sample(p, 4, torch.Generator().manual_seed(0))
    assert s.indices.shape == (4,)
    x = torch.randn(6, 3)
    x[2:] = 0
    y = torch.randn(6, 2)
    torch.testing.assert_close(estimate_product(x, y, 4, generator=torch.Generator().manual_seed(0)), x.T @ y)


def test_all_zero_rows_give_an_exact_zero_estimate():
    x, y = torch.zeros(10, 4), torch.randn(10, 3)
    for method in ("wtacrs", "crs", "topk"):
        est = estimate_product(x, y, 3, method=method, generator=torch.Generator().manual_seed(0))
        assert torch.equal(est, torch.zeros(4, 3))


def test_exact_when_budget_covers_all_rows():
    x, y = torch.randn(5, 4), torch.randn(5, 3)
    torch.testing.assert_close(estimate_product(x, y, 5), x.T @ y)


def test_topk_is_deterministic_and_unweighted():
    p = torch.tensor([0.1, 0.4, 0.2, 0.3])
    s = topk_sample(p, 2)
    assert s.indices.tolist() == [1, 3] and s.weights.tolist() == [1.0, 1.0]


def test_nan_and_inf_rows_are_kept_and_propagate():
    x, y = torch.randn(20, 4), torch.randn(20, 3)
    x[3, 1] = float("nan")
    x[7, 2] = float("inf")
    est = estimate_product(x, y, 5, generator=torch.Generator().manual_seed(0))
    exact = x.T @ y
    assert torch.equal(est.isnan(), exact.isnan())
    assert torch.equal(est.isinf(), exact.isinf())


def test_batched_problems_sample_independently():
    x = torch.randn(3, 2, 30, 4)
    rows, weights, idx = sample_rows(x, 6, generator=torch.Generator().manual_seed(0))
    assert rows.shape == (3, 2, 6, 4) and idx.shape == (3, 2, 6) and idx.dtype == torch.int32
    assert weights.shape == (3, 2, 6) and weights.dtype == torch.float32
    assert not torch.equal(idx[0, 0], idx[1, 1])


def test_same_seed_same_sample():
    x = torch.randn(100, 8)
    a = sample_rows(x, 20, generator=torch.Generator().manual_seed(7))
    b = sample_rows(x, 20, generator=torch.Generator().manual_seed(7))
    assert all(torch.equal(s, t) for s, t in zip(a, b))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_inputs_sample_in_their_dtype(dtype):
    x = torch.randn(64, 8).to(dtype)
    rows, weights, idx = sample_rows(x, 10, generator=torch.Generator().manual_seed(0))
    assert rows.dtype == dtype and torch.isfinite(rows).all() and weights.dtype == torch.float32


def test_crs_sample_weights_are_inverse_probabilities():
    p = torch.tensor([0.25, 0.25, 0.5])
    s = crs_sample(p, 2, torch.Generator().manual_seed(0))
    torch.testing.assert_close(s.weights, 1 / (2 * p[s.indices]))


def test_support_share_keeps_rows_whose_score_is_zero_drawable_and_unbiased():
    # the score gives rows 1..7 probability 0; a 10% uniform support share makes every row drawable
    x = torch.ones(8, 3)
    score = torch.tensor([1.0] + [0.0] * 7)
    g = torch.Generator().manual_seed(0)
    _, w, idx = sample_rows(x, 3, grad_norm=score, generator=g)
    assert bool((w[idx != 0] == 0).all())  # without: rows 1..7 are padding, weight 0
    counts = torch.zeros(8)
    draws = 4000
    for _ in range(draws):
        _, w, idx = sample_rows(x, 3, grad_norm=score, generator=g, support_share=0.1)
        counts.index_add_(0, idx.long(), w)
    # sum_t w_t e_{idx_t} estimates the all-ones vector (each row once in X^T Y)
    torch.testing.assert_close(counts / draws, torch.ones(8), atol=0.15, rtol=0)
