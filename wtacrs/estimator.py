"""The WTA-CRS estimator: pure functions over tensors.

A product ``G = X^T Y = sum_i x_i^T y_i`` over n row pairs is estimated from k of the n rows.
Every function works on a batch of independent problems: the row dimension is the last one of
``p`` (``[..., n]``) and the second-to-last one of ``x`` (``[..., n, d]``). Shapes depend only on
``n`` and ``k``, never on values, so the same code runs on the meta device and under
FakeTensorMode.

Winner-take-all column-row sampling: sort the probabilities, keep the ``m`` largest rows
deterministically (weight 1) when that lowers ``(1 - q_C) / (k - m)`` below the plain-CRS value
``1/k``, and spend the other ``k - m`` slots on i.i.d. draws from the residual distribution with
weight ``(1 - q_C) / ((k - m) p_j)``. The estimate is unbiased in every path.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

INDEX_DTYPE_LIMIT = 2**31

# On the meta device there are no values to sample from: emit the static-shape outputs directly
# instead of running the ~40 elementwise ops of the winner-set search through meta kernels, which
# would dominate a meta estimate's time. Set False to run the full code path on meta.
META_SHAPES_ONLY = True


def shapes_only(t: Tensor) -> bool:
    """Whether ops given ``t`` emit their static-shape outputs without sampling: ``t`` is on the
    meta device and :data:`META_SHAPES_ONLY` is on (read at each call)."""
    return t.device.type == "meta" and META_SHAPES_ONLY


class RowSample(NamedTuple):
    """Which rows to keep and how to weight them.

    ``indices``: int64 ``[..., k]`` row indices into ``[..., n]``.
    ``weights``: fp32 ``[..., k]``; ``sum_t weights[t] * x[indices[t]]^T y[indices[t]]`` is an
    unbiased estimate of ``X^T Y``. Slots with weight 0 are padding (no residual mass).
    """

    indices: Tensor
    weights: Tensor


def budget(n: int, ratio: float, min_k: int = 1) -> int:
    """Rows kept out of ``n``: ``min(n, max(min_k, ceil(ratio * n)))``."""
    if not 0.0 < ratio <= 1.0:
        raise ValueError(f"ratio must be in (0, 1], got {ratio}")
    if min_k < 1:
        raise ValueError(f"min_k must be >= 1, got {min_k}")
    # round first so that 0.3 * 10 is 3, not ceil(3.0000000000000004) = 4
    return min(n, max(min_k, math.ceil(round(ratio * n, 9))))


def index_dtype(n: int) -> torch.dtype:
    return torch.int32 if n < INDEX_DTYPE_LIMIT else torch.int64


def row_norms(x: Tensor) -> Tensor:
    """fp32 ``[..., n]`` Euclidean norms of the rows of ``x`` ``[..., n, d]``, without an fp32 copy."""
    return torch.linalg.vector_norm(x, dim=-1, dtype=torch.float32)


def row_probabilities(x: Tensor, grad_norm: Tensor | None = None, *, norms: Tensor | None = None) -> Tensor:
    """``p_i ∝ ||x_i|| * g_i`` in fp32, normalised over the last dimension.

    ``x``: ``[..., n, d]`` any float dtype (or pass precomputed ``norms``). ``grad_norm``:
    ``[..., n]`` (or broadcastable), an estimate of ``||y_i||``; None means 1. Rows whose norm is
    not finite (NaN/Inf inputs) get probability 0 here; ``sample_rows`` keeps them
    deterministically instead. When every score is 0 (all-zero rows, pad-only batches) ``p`` is
    all zeros and the estimate is exactly 0.
    """
    score = row_norms(x) if norms is None else norms
    if grad_norm is not None:
        score = score * grad_norm.float()
    score = torch.where(torch.isfinite(score), score, torch.zeros_like(score))
    total = score.sum(dim=-1, keepdim=True)
    return torch.where(total > 0, score / torch.where(total > 0, total, torch.ones_like(total)), torch.zeros_like(score))


def _residual_draws(p_residual: Tensor, k: int, generator: torch.Generator | None) -> Tensor:
    """k i.i.d. draws per row of ``p_residual`` ``[..., n]`` (rows with no mass draw uniformly)."""
    flat = p_residual.reshape(-1, p_residual.shape[-1])
    has_mass = flat.sum(dim=-1, keepdim=True) > 0
    flat = torch.where(has_mass, flat, torch.ones_like(flat))
    if flat.device.type == "meta":
        generator = None
    draws = torch.multinomial(flat, k, replacement=True, generator=generator)
    return draws.reshape(*p_residual.shape[:-1], k)


def wtacrs_sample(
    p: Tensor, k: int, generator: torch.Generator | None = None, *, forced: Tensor | None = None
) -> RowSample:
    """Winner-take-all column-row sampling of ``k`` of the ``n`` rows of ``p`` ``[..., n]``.

    ``forced`` (bool ``[..., n]``) marks rows that must be kept exactly (weight 1), e.g. rows
    holding NaN/Inf; they count towards the winner set. Returns static-shape ``[..., k]`` tensors.
    """
    n = p.shape[-1]
    if k >= n:
        indices = torch.arange(n, device=p.device).expand(*p.shape[:-1], n)
        return RowSample(indices, torch.ones(p.shape, dtype=torch.float32, device=p.device))
    if shapes_only(p):
        return _meta_sample(p, k)
    p = p.float()
    if forced is None:
        forced = torch.zeros_like(p, dtype=torch.bool)
    # forced rows sort first; inside each group rows sort by probability
    key = torch.where(forced, torch.full_like(p, 2.0), p)
    top_key, top_idx = torch.topk(key, k, dim=-1)
    top_p = torch.gather(p, -1, top_idx)
    n_forced = forced.sum(dim=-1, keepdim=True)

    # q(m) = probability mass of the m largest rows, for m = 0..k-1
    zero = torch.zeros_like(top_p[..., :1])
    q = torch.cat([zero, torch.cumsum(top_p[..., :-1], dim=-1)], dim=-1)
    m_range = torch.arange(k, device=p.device)
    total = p.sum(dim=-1, keepdim=True)
    score = (total - q).clamp_min(0) / (k - m_range).to(p.dtype)
    allowed = m_range >= n_forced
    score = torch.where(allowed, score, torch.full_like(score, math.inf))
    best_score, best_m = score.min(dim=-1, keepdim=True)
    # winner set only if it beats the smallest allowed set (plain CRS when nothing is forced)
    base_m = n_forced.clamp_max(k - 1)
    base_score = torch.gather(score, -1, base_m)
    m = torch.where(best_score < base_score, best_m, base_m)

    is_winner = m_range < m  # [..., k]
    q_c = torch.gather(q, -1, m)
    residual_mass = (total - q_c).clamp_min(0)

    # residual distribution: p with the winners removed
    winner_rows = torch.zeros_like(p, dtype=torch.bool).scatter(-1, top_idx, is_winner)
    p_residual = torch.where(winner_rows | forced, torch.zeros_like(p), p)
    draws = _residual_draws(p_residual, k, generator)
    p_draw = torch.gather(p, -1, draws)
    s = (k - m).to(p.dtype)
    valid = (residual_mass > 0) & (p_draw > 0)
    draw_weight = torch.where(valid, residual_mass / (s * torch.where(valid, p_draw, torch.ones_like(p_draw))), 0.0)

    indices = torch.where(is_winner, top_idx, draws)
    weights = torch.where(is_winner, torch.ones_like(draw_weight), draw_weight)
    return RowSample(indices, weights)


def _meta_sample(p: Tensor, k: int) -> RowSample:
    shape = (*p.shape[:-1], k)
    return RowSample(torch.empty(shape, dtype=torch.int64, device="meta"), torch.empty(shape, dtype=torch.float32, device="meta"))


def crs_sample(p: Tensor, k: int, generator: torch.Generator | None = None) -> RowSample:
    """Plain column-row sampling: k i.i.d. draws from ``p`` with weight ``1 / (k p_j)``."""
    n = p.shape[-1]
    if k >= n:
        return wtacrs_sample(p, k, generator)
    if shapes_only(p):
        return _meta_sample(p, k)
    p = p.float()
    draws = _residual_draws(p, k, generator)
    p_draw = torch.gather(p, -1, draws)
    valid = p_draw > 0
    weights = torch.where(valid, 1.0 / (k * torch.where(valid, p_draw, torch.ones_like(p_draw))), 0.0)
    return RowSample(draws, weights)


def topk_sample(p: Tensor, k: int, generator: torch.Generator | None = None) -> RowSample:
    """Deterministic top-k with weight 1. Biased: a comparison baseline only."""
    n = p.shape[-1]
    indices = torch.topk(p.float(), min(k, n), dim=-1).indices
    return RowSample(indices, torch.ones(indices.shape, dtype=torch.float32, device=p.device))


SAMPLERS = {"wtacrs": wtacrs_sample, "crs": crs_sample, "topk": topk_sample}


def gather_rows(x: Tensor, indices: Tensor) -> Tensor:
    """``x[..., indices, :]`` for ``x`` ``[..., n, d]`` and ``indices`` ``[..., k]``."""
    idx = indices.long().unsqueeze(-1).expand(*indices.shape, x.shape[-1])
    return torch.gather(x, -2, idx)


def sample_rows(
    x: Tensor,
    k: int,
    *,
    grad_norm: Tensor | None = None,
    generator: torch.Generator | None = None,
    method: str = "wtacrs",
    support: Tensor | None = None,
    support_share: float = 0.0,
) -> tuple[Tensor, Tensor, Tensor]:
    """Sample ``k`` rows of ``x`` ``[..., n, d]``: what a sampled op stores.

    Returns ``(rows, weights, indices)``: ``rows`` ``[..., k, d]`` in ``x.dtype``, as they are
    (no weight folded in, so half-precision rows cannot overflow); ``weights`` ``[..., k]`` fp32;
    ``indices`` ``[..., k]`` int32 (int64 when n >= 2^31). :func:`weighted_product` applies the
    weights in backward.

    With ``support_share`` ``s > 0`` ("defensive" importance sampling) the probabilities are
    ``(1 - s) p(grad_norm) + s p(support)`` (each :func:`row_probabilities`; ``support`` None
    means 1). A ``support`` that is nonzero wherever a gradient row can be keeps the estimate
    unbiased where ``grad_norm`` underflows to 0.
    """
    n = x.shape[-2]
    if shapes_only(x):
        lead = x.shape[:-2]
        return (
            x.new_empty(*lead, k, x.shape[-1]),
            torch.empty(*lead, k, dtype=torch.float32, device="meta"),
            torch.empty(*lead, k, dtype=index_dtype(n), device="meta"),
        )
    norms = row_norms(x)
    p = row_probabilities(x, grad_norm, norms=norms)
    if support_share > 0:
        p = p.mul_(1 - support_share).add_(row_probabilities(x, support, norms=norms), alpha=support_share)
    if method == "wtacrs":
        # a non-finite norm means a NaN/Inf in the row (or an overflow): keep the row exactly
        sample = wtacrs_sample(p, k, generator, forced=~torch.isfinite(norms))
    else:
        sample = SAMPLERS[method](p, k, generator)
    if x.dim() == 2:  # index_select is much faster than gather on CPU
        rows = x.index_select(0, sample.indices)
    else:
        rows = gather_rows(x, sample.indices)
    return rows, sample.weights, sample.indices.to(index_dtype(n))


def weighted_product(lhs: Tensor, rhs: Tensor, weights: Tensor, dtype: torch.dtype) -> Tensor:
    """``sum_t weights[t] lhs[t]^T rhs[t]`` in ``dtype``: ``[..., k, a]``, ``[..., k, b]`` -> ``[..., a, b]``.

    ``weights`` ``[..., k]`` fp32 (about ``n / k``, more for rarely drawn rows). In fp32 and fp64
    the weights scale ``rhs`` and one matmul follows, as folding them into stored rows would. In a
    half type the weighted rows can overflow where the product does not (rows of 2.5e4 times
    weight 3 are inf in fp16; the gradient is not), so ``rhs * weights`` is formed in fp32 and
    divided by a power of two (exact) that brings each problem's largest entry within the
    dtype's range, the half-precision matmul runs (it accumulates in fp32), and the product is
    multiplied back in fp32. The result is finite wherever the estimate fits ``dtype``.
    """
    w = weights.unsqueeze(-1)
    lhs_t = lhs.to(dtype).transpose(-1, -2)
    if torch.finfo(dtype).bits >= 32:
        return lhs_t @ (rhs.to(dtype) * w.to(dtype))
    peak = rhs.abs().amax(dim=-1, keepdim=True).float() * w  # [..., k, 1]: largest entry of each weighted row
    peak = torch.where(torch.isfinite(peak), peak, torch.zeros_like(peak)).amax(dim=-2, keepdim=True)  # NaN/Inf rows propagate as they are
    limit = 2.0 ** math.floor(math.log2(torch.finfo(dtype).max))
    scale = torch.exp2(torch.log2(peak / limit).ceil_().clamp_min_(0))  # [..., 1, 1], 1 unless it would overflow
    product = lhs_t @ (rhs.float() * (w / scale)).to(dtype)
    return (product.float() * scale).to(dtype)


def estimate_product(
    x: Tensor,
    y: Tensor,
    k: int,
    *,
    method: str = "wtacrs",
    grad_norm: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Estimate ``x^T y`` (``[..., n, a]`` and ``[..., n, b]`` -> ``[..., a, b]``) from k rows."""
    rows, weights, indices = sample_rows(x, k, grad_norm=grad_norm, generator=generator, method=method)
    y_rows = gather_rows(y, indices)
    return weighted_product(rows, y_rows, weights, torch.promote_types(x.dtype, y.dtype))
