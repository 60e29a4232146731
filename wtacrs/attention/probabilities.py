"""Which rows the sampled attention keeps: the probabilities of TensorMul-1's rows of Q and K
and of TensorMul-2's head-dim columns of V, and the TensorMul-1 sampler."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from wtacrs import estimator
from wtacrs.attention.settings import AttentionSettings
from wtacrs.estimator import budget, index_dtype, row_norms, sample_rows
from wtacrs.gradnorm import token_grad_norm

# Share of the sampling mass spread over every row whose gradient can be nonzero ("defensive"
# importance sampling): the P-aware scores are products of squares and can underflow to 0 for a
# row whose gradient is tiny but not 0, which would make the estimate biased.
DEFENSIVE_SHARE = 0.01

Sample = tuple[Tensor | None, Tensor | None, Tensor | None]  # (rows, fp32 weights, int32 indices)


def query_grad_norms(stream: str | None, query: Tensor) -> Tensor | None:
    """``[B, 1, q]`` fp32 proxies of the queries' output-gradient norms from the token mask of
    ``stream``: 1 for real tokens, :data:`~wtacrs.gradnorm.GRAD_NORM_FLOOR` for pads (a pooler
    or a user loss can read a pad query's output, so its rows must stay drawable)."""
    if stream is None:
        return None
    b, _, q, _ = query.shape
    g, _ = token_grad_norm(stream, b * q, query.device)
    return None if g is None else g.reshape(b, 1, q)


def score_gradient_proxies(
    probs: Tensor, value_sq_norms: Tensor | None = None, query_weights: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Expected norms of the rows and columns of the score gradient ``dS``, from ``P`` alone.

    ``dS_i = J_i dP_i`` with the softmax Jacobian ``J_i = diag(P_i) - P_i P_i^T``. If ``dP_ij =
    dO_i . v_j`` is noise of variance ``||dO_i||^2 a_j`` (``a_j = ||v_j||^2``), then
    ``E dS_ij^2 = ||dO_i||^2 P_ij^2 ((1 - 2 P_ij) a_j + sum_l P_il^2 a_l)``. ``probs``
    ``[..., q, kv]``; ``value_sq_norms`` ``[..., kv]`` (None: ``a = 1``); ``query_weights``
    ``[..., q]`` estimates of ``||dO_i||`` (small for pad queries; None: 1). Returns fp32
    ``(rows [..., q], columns [..., kv])``: square roots of the row and column sums. A key no query
    attends to gets exactly 0, as its gradient.
    """
    p = probs.float()
    p2 = p * p
    a = value_sq_norms.float().unsqueeze(-2) if value_sq_norms is not None else torch.ones((), device=p.device)
    spread = (p2 * a).sum(dim=-1, keepdim=True)
    w = p2.mul_(((1 - 2 * p) * a).add_(spread)).clamp_min_(0)  # (1-P)^2 a_j + sum_{l != j} P^2 a >= 0
    if query_weights is not None:
        w.mul_(query_weights.float().square().unsqueeze(-1))
    return w.sum(dim=-1).sqrt(), w.sum(dim=-2).sqrt()


def value_column_scores(probs: Tensor, value: Tensor, query_weights: Tensor | None = None) -> Tensor:
    """How much an error in head-dim column ``c`` of ``dP = dO V^T`` moves ``dS``: fp32 ``[..., d]``.

    An error ``dO_ic V[:, c]`` in row ``i`` of ``dP`` reaches ``dS`` as ``dO_ic J_i V[:, c]``; with
    unit ``dO`` (times ``query_weights`` ``[..., q]``) the score is
    ``sqrt(sum_i w_i^2 ||J_i V[:, c]||^2)``, where ``||J_i v||^2 = P_i^2.v^2 - 2 (P_i.v)(P_i^2.v) +
    (P_i.v)^2 ||P_i||^2``. A column constant over the keys scores 0: the softmax ignores it.
    Costs two ``[q, kv] @ [kv, d]`` products. ``probs`` ``[..., q, kv]``, ``value`` ``[..., kv, d]``.
    """
    p = probs.float()
    v = value.float()
    p2 = p * p
    w2 = None if query_weights is None else query_weights.float().square().unsqueeze(-1)  # [..., q, 1]
    pv, p2v = torch.matmul(p, v), torch.matmul(p2, v)
    row_sq = p2.sum(dim=-1, keepdim=True)
    per_query = pv * p2v * -2 + pv * pv * row_sq  # [..., q, d]
    col = p2 if w2 is None else p2 * w2
    total = torch.matmul(col.sum(dim=-2, keepdim=True), v * v).squeeze(-2)  # sum_i w_i^2 P_i^2 . v^2
    total = total + (per_query if w2 is None else per_query * w2).sum(dim=-2)
    return total.clamp_min_(0).sqrt()


def _weighted_mean(x: Tensor, weight: Tensor) -> Tensor:
    """``sum_i w_i x_i / sum_i w_i`` over rows of ``x`` ``[..., n, d]`` (0 where all ``w`` are 0), ``[..., 1, d]``."""
    w = weight.float()
    total = w.sum(dim=-1, keepdim=True)
    w = w / torch.where(total > 0, total, torch.ones_like(total))
    mean = torch.matmul(w.unsqueeze(-2), x.float())
    return torch.where(torch.isfinite(mean), mean, torch.zeros_like(mean)).to(x.dtype)


def query_sample_shapes(n: int, k: int) -> tuple[int, int]:
    """(stored query rows, indices) per (batch, head) for ``k = budget(n)``: with ``2 <= k < n``,
    ``k - 1`` sampled centered rows plus their mean (same bytes as k rows, 4 fewer index bytes)."""
    if k >= n:
        return n, 0
    return (k, k - 1) if k >= 2 else (1, 1)


def empty_sample(x: Tensor, lead: torch.Size, rows: int, idx: int, n: int) -> Sample:
    """The static-shape outputs of a draw of ``rows`` rows of ``x`` (``idx`` indices out of
    ``n``), without drawing: what the meta device needs (``estimator.shapes_only``)."""
    return (
        x.new_empty(*lead, rows, x.shape[-1]),
        torch.empty(*lead, idx, dtype=torch.float32, device=x.device),
        torch.empty(*lead, idx, dtype=index_dtype(n), device=x.device),
    )


@dataclass
class TensorMul1Sampler:
    """Draws TensorMul-1's stored rows once ``P`` is known (called inside the forward).

    Returns ``(q_rows, q_weights, q_idx, k_rows, k_weights, k_idx)``: rows in the input dtype,
    fp32 weights, int32 indices; ``(Q or K, None, None)`` where kept whole, all None where not
    needed. Query rows are drawn before key rows (one generator stream).
    """

    settings: AttentionSettings
    generator: torch.Generator | None
    need_query_rows: bool  # K requires grad: dK = dS^T Q needs rows of Q
    need_key_rows: bool  # Q requires grad: dQ = dS K needs rows of K
    value_states: Tensor | None  # [B, H, kv, d]: ||v_j||^2 scales dP's column j (P-aware probabilities)
    query_weights: Tensor | None  # [B, 1|H, q] token-mask proxies of the queries' gradient norms
    key_visibility: Tensor | None  # [B|1, 1|H, kv] (activation probabilities)
    center_keys: bool = True  # rows of dS sum to 0 -- not after a softcap: (1 - t^2) dS

    def __call__(self, probs: Tensor, query: Tensor, key: Tensor):
        cfg = self.settings.config
        n_q, n_k = query.shape[-2], key.shape[-2]
        kq, kk = budget(n_q, cfg.ratio, cfg.min_k), budget(n_k, cfg.ratio, cfg.min_k)
        lead = probs.shape[:-2]
        if estimator.shapes_only(query):
            return self._shapes_only(query, key, lead, kq, kk)
        g_query, query_support, g_key, key_support = self._proxies(probs, lead, n_q, n_k)
        q_sample = k_sample = (None, None, None)
        if self.need_query_rows:
            q_sample = self._query_rows(query, lead, kq, g_query, query_support)
        if self.need_key_rows:
            k_sample = self._key_rows(key, lead, kk, g_key, key_support)
        return *q_sample, *k_sample

    def _shapes_only(self, query, key, lead, kq, kk):
        n_q, n_k = query.shape[-2], key.shape[-2]
        q_sample = k_sample = (None, None, None)
        if self.need_query_rows:
            rows, idx = query_sample_shapes(n_q, kq) if self.settings.p_aware else (kq, kq)
            q_sample = (query, None, None) if kq >= n_q else empty_sample(query, lead, rows, idx, n_q)
        if self.need_key_rows:
            k_sample = (key, None, None) if kk >= n_k else empty_sample(key, lead, kk, kk, n_k)
        return *q_sample, *k_sample

    def _proxies(self, probs, lead, n_q, n_k):
        """``(query score, query support, key score, key support)`` for :func:`sample_rows`."""
        if not self.settings.p_aware:
            visibility = None if self.key_visibility is None else self.key_visibility.expand(*lead, n_k)
            return None, None, visibility, visibility
        a = None if self.value_states is None else row_norms(self.value_states).square()
        query_weights = None if self.query_weights is None else self.query_weights.expand(*lead, n_q)
        g_query, g_key = score_gradient_proxies(probs, a, query_weights)
        # a key column of P that is exactly 0 (masked for every query) has dS[:, j] == 0 exactly
        key_support = (probs.float().sum(dim=-2) > 0).float()
        return g_query, query_weights, g_key, key_support

    def _query_rows(self, query, lead, kq, score, support) -> Sample:
        if kq >= query.shape[-2]:
            return query, None, None
        if kq >= 2 and self.settings.p_aware:
            # dK = dS^T (Q - 1 qbar) + colsum(dS)^T qbar: the mean row is stored with the samples
            qbar = _weighted_mean(query, score)
            rows, weights, idx = self._draw(query - qbar, score, support, kq - 1)
            return torch.cat([rows, qbar], dim=-2), weights, idx
        return self._draw(query.expand(*lead, *query.shape[-2:]), score, support, kq)

    def _key_rows(self, key, lead, kk, score, support) -> Sample:
        if kk >= key.shape[-2]:
            return key, None, None
        # rows of dS sum to 0, so dQ = dS (K - 1 kbar) exactly for any kbar: nothing extra stored
        if self.settings.p_aware and self.center_keys:
            return self._draw(key - _weighted_mean(key, score), score, support, kk)
        return self._draw(key.expand(*lead, *key.shape[-2:]), score, support, kk)

    def _draw(self, x, score, support, k) -> Sample:
        # P-aware scores can underflow where the gradient does not: mix in the support
        share = DEFENSIVE_SHARE if self.settings.p_aware else 0.0
        return sample_rows(x, k, grad_norm=score, generator=self.generator, support=support, support_share=share)
