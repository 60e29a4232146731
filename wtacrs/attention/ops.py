"""The attention's autograd ops: TensorMul-1 with the softmax, and TensorMul-2.

Each declares its operator and category (``wtacrs.taxonomy``) for byte accounting.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from wtacrs import lossless
from wtacrs.attention.eager import eager_softmax, repeat_kv
from wtacrs.estimator import gather_rows, weighted_product
from wtacrs.taxonomy import Category, Operator


class SampledScoresSoftmax(torch.autograd.Function):
    """TensorMul-1 and the softmax: ``P = softmax(cap(Q K^T * scaling) + bias + mask)``, exact.

    ``cap`` is the identity, or with ``softcap`` (Gemma 2) ``tanh(s / softcap) * softcap``, as
    eager applies it (:func:`~wtacrs.attention.eager.eager_softmax`).

    The forward runs eager's ops in eager's order (so ``P`` is bitwise eager's, autocast
    included), then draws the rows TensorMul-1 keeps *after* the softmax, so their probabilities
    can follow ``P`` (see :class:`~wtacrs.attention.probabilities.TensorMul1Sampler`). Saved, in this order: ``P`` (the softmax output
    eager keeps; TensorMul-2 reuses this storage), query rows ``[..., kq, d]``, their fp32 weights
    and indices, key rows ``[..., kk, d]``, weights and indices (Q or K themselves and two None
    when not sampled; None when not needed), then, only with ``softcap``, the ``tanh`` output
    ``t`` (what eager's tanh saves). The weights are applied in backward, in fp32
    (:func:`wtacrs.estimator.weighted_product`).

    Backward: ``dS`` exactly from ``P`` and ``dP`` (eager's softmax backward), the bias and mask
    gradients ``dS`` (reduced to their shapes by autograd), through the cap exactly
    (``(1 - t^2) dS``), then ``dQ = dS K`` and ``dK = dS^T Q`` estimated from the stored rows
    (unbiased). The rows' P-aware probabilities leave out the cap's ``(1 - t^2)`` factor, which
    only costs variance.
    """

    operator = Operator.TENSORMUL_1
    category = Category.SAMPLED
    # P (the softmax's exact backward) and the softcap's tanh output are the softmax's
    saved_operators = {0: (Operator.SOFTMAX, Category.UNCOMPRESSED), 7: (Operator.SOFTMAX, Category.UNCOMPRESSED)}

    @staticmethod
    def forward(ctx, query, key, bias, mask, scaling, softmax_dtype, sampler, softcap=None):
        probs, mm_dtype, scores_dtype, capped = eager_softmax(
            query, key, scaling, softcap=softcap, bias=bias, mask=mask, softmax_dtype=softmax_dtype
        )
        ctx.save_for_backward(probs, *sampler(probs, query.detach(), key.detach()), *(() if capped is None else (capped,)))
        ctx.scaling, ctx.softcap, ctx.mm_dtype, ctx.scores_dtype = scaling, softcap, mm_dtype, scores_dtype
        return probs

    @staticmethod
    def backward(ctx, grad_probs):
        probs, q_rows, q_weights, q_idx, k_rows, k_weights, k_idx, *capped = ctx.saved_tensors
        grad_scores = torch._softmax_backward_data(grad_probs, probs, -1, probs.dtype).to(ctx.scores_dtype)
        grad_bias = grad_scores if ctx.needs_input_grad[2] else None
        grad_mask = grad_scores if ctx.needs_input_grad[3] else None
        g = grad_scores.to(ctx.mm_dtype)
        if capped:  # autograd's chain for eager's tanh(s / c) * c
            g = torch.ops.aten.tanh_backward(g * ctx.softcap, capped[0]) / ctx.softcap
        g = g * ctx.scaling
        dtype = g.dtype
        grad_q = grad_k = None
        if ctx.needs_input_grad[0]:
            if k_idx is None:  # k_rows is K itself
                grad_q = torch.matmul(g, k_rows)
            else:
                grad_cols = gather_rows(g.transpose(-1, -2), k_idx)  # [..., kk, q]
                grad_q = weighted_product(grad_cols, k_rows, k_weights, dtype)
        if ctx.needs_input_grad[1]:
            if q_idx is None:  # q_rows is Q itself
                grad_kt = torch.matmul(q_rows.transpose(-1, -2), g)
            else:
                n_s = q_idx.shape[-1]
                grad_kt = weighted_product(q_rows[..., :n_s, :], gather_rows(g, q_idx), q_weights, dtype)
                if q_rows.shape[-2] > n_s:  # the centering mean: + qbar^T colsum(dS)
                    grad_kt = grad_kt + q_rows[..., n_s:, :].transpose(-1, -2) * g.sum(dim=-2, keepdim=True)
            grad_k = grad_kt.transpose(-1, -2)
        return grad_q, grad_k, grad_bias, grad_mask, None, None, None, None


class ReusedPV(torch.autograd.Function):
    """``dropout(P) @ V`` that saves the softmax's ``P`` and the dropout's mask, not ``dropout(P)``.

    Inputs: ``pd`` (the dropped probabilities the forward multiplies, as eager does), ``v``
    (``repeat_kv``-ed V), then ``p_src`` (the softmax output, detached: the same storage the
    softmax saved), ``mask_saved`` (the dropout node's saved tensor or None), ``v_store``,
    ``v_weights`` and ``v_idx`` (V before ``repeat_kv`` and two None, or sampled head-dim columns
    of V as rows ``[..., k, kv]``, their fp32 weights and indices ``[..., k]``). ``meta`` carries
    the cast dtype, the :class:`~wtacrs.lossless.DropoutMask` and the ``repeat_kv`` factor.

    ``P`` and the mask are attributed where they were first saved; what is left here is V
    itself (uncompressed), or its sampled head-dim columns: then ``ctx.category`` is sampled.
    """

    operator = Operator.TENSORMUL_2
    category = Category.UNCOMPRESSED

    @staticmethod
    def forward(ctx, pd, v, p_src, mask_saved, v_store, v_weights, v_idx, meta):
        ctx.meta = meta
        if v_idx is not None:
            ctx.category = Category.SAMPLED
        ctx.dtypes = (pd.dtype, v.dtype)
        ctx.save_for_backward(p_src, mask_saved, v_store, v_weights, v_idx)
        return torch.matmul(pd, v)  # under autocast this runs in the autocast dtype, as eager's

    @staticmethod
    def backward(ctx, grad):
        p_src, mask_saved, v_store, v_weights, v_idx = ctx.saved_tensors
        meta = ctx.meta
        pd_dtype, v_dtype = ctx.dtypes
        compute = grad.dtype  # the forward's matmul dtype (differs from the inputs' under autocast)
        grad_pd = grad_v = None
        if ctx.needs_input_grad[1]:
            pd = p_src if meta.cast is None else p_src.to(meta.cast)
            if meta.mask is not None:
                pd = meta.mask.apply(pd, mask_saved)
            grad_v = torch.matmul(pd.to(compute).transpose(-1, -2), grad).to(v_dtype)
        if ctx.needs_input_grad[0]:
            if v_idx is None:
                v_full = repeat_kv(v_store, meta.n_rep).to(compute)
                grad_pd = torch.matmul(grad, v_full.transpose(-1, -2))
            else:  # dP = dO V^T over k sampled head-dim columns
                grad_cols = gather_rows(grad.transpose(-1, -2), v_idx)  # [..., k, q]
                grad_pd = weighted_product(grad_cols, v_store, v_weights, compute)
            grad_pd = grad_pd.to(pd_dtype)
        return grad_pd, grad_v, None, None, None, None, None, None


@dataclass
class PVMeta:
    """What :class:`ReusedPV` needs to rebuild ``dropout(P)`` and V: the cast dtype of ``P``, the
    dropout's mask and the ``repeat_kv`` factor."""

    cast: torch.dtype | None
    mask: lossless.DropoutMask | None
    n_rep: int
