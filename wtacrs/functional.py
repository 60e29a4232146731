"""Autograd ops with an exact forward and a sampled weight gradient.

Both ops store their activations with ``save_for_backward`` only, so
``torch.autograd.graph.saved_tensors_hooks`` (and therefore the profiler) sees every byte.
``generator=`` draws the sampled rows; None draws from torch's default generator (the rule for
calls outside a conversion is stated once, in :mod:`wtacrs.rng`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from wtacrs import estimator
from wtacrs.estimator import budget, gather_rows, index_dtype, row_norms, row_probabilities, sample_rows, weighted_product, wtacrs_sample
from wtacrs.rowsource import RowSource
from wtacrs.taxonomy import Category

GradNormSink = Callable[[Tensor], None]


class SampledLinear(torch.autograd.Function):
    """``F.linear`` whose weight gradient comes from k stored (or recomputed) input rows.

    Saved, after the ``weight`` (a parameter, for grad_input), one of:

    - ``rows`` ``[k, in]`` (input dtype, as they are), the fp32 sample weights ``[k]`` and
      ``indices`` ``[k]`` int32;
    - the fp32 sample weights, ``indices`` and the tensors of a
      :class:`~wtacrs.rowsource.RowSource`, whose function (kept on ``ctx``, without the
      tensors) rebuilds the rows in backward (those tensors are saved by other ops already, so
      only ``8 k`` bytes are new);
    - the input itself when ``k >= n`` (exact gradient);
    - nothing when the weight does not require grad.

    The weights are applied in backward by :func:`wtacrs.estimator.weighted_product`, in fp32, so
    fp16 rows times weights of about ``n / k`` cannot overflow.
    """

    operator = None  # a matmul: the module decides (its Linear-Q/K/V/O/U/D entry)
    category = Category.SAMPLED

    @staticmethod
    def forward(ctx, input, weight, bias, rows, weights, indices, grad_norm_sink, row_source, *source_tensors):
        ctx.input_shape, ctx.input_dtype = input.shape, input.dtype
        ctx.has_bias = bias is not None
        ctx.grad_norm_sink = grad_norm_sink
        # the function only: ``row_source.tensors`` go through save_for_backward, where activation
        # checkpointing (and any saved_tensors_hooks) can free them; a ctx attribute would keep them
        ctx.row_fn = None if row_source is None else row_source.fn
        saved = [t for t in (weight, rows, weights, indices) if t is not None]
        ctx.save_for_backward(*saved, *source_tensors)
        ctx.n_saved = len(saved)
        return F.linear(input, weight, bias)

    @staticmethod
    def backward(ctx, grad_output):
        saved = ctx.saved_tensors
        weight, stored, source_tensors = saved[0], saved[1 : ctx.n_saved], saved[ctx.n_saved :]
        grad_2d = grad_output.reshape(-1, grad_output.shape[-1])
        if ctx.grad_norm_sink is not None:
            ctx.grad_norm_sink(torch.linalg.vector_norm(grad_2d.detach().float(), dim=-1))
        grad_input = grad_weight = grad_bias = None
        dtype = grad_2d.dtype  # differs from the saved tensors' under autocast
        if ctx.needs_input_grad[0]:
            grad_input = grad_2d.mm(weight.to(dtype)).view(ctx.input_shape).to(ctx.input_dtype)
        if ctx.needs_input_grad[1]:
            if len(stored) == 1:  # k >= n: the exact product
                grad_weight = grad_2d.t().mm(stored[0].reshape(-1, stored[0].shape[-1]).to(dtype))
            else:
                *rows, weights, indices = stored
                rows = ctx.row_fn(source_tensors, indices.long()) if ctx.row_fn is not None else rows[0]
                grad_weight = weighted_product(grad_2d.index_select(0, indices), rows, weights, dtype)
            grad_weight = grad_weight.to(weight.dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = grad_2d.sum(0).to(weight.dtype)
        return (grad_input, grad_weight, grad_bias, None, None, None, None, None) + (None,) * len(source_tensors)


Sample = tuple[Tensor | None, Tensor | None, Tensor | None]


def linear(
    input: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    *,
    ratio: float,
    min_k: int = 1,
    grad_norm: Tensor | None = None,
    generator: torch.Generator | None = None,
    sample: Sample | None = None,
    grad_norm_sink: GradNormSink | None = None,
    row_source: RowSource | None = None,
) -> Tensor:
    """``F.linear(input, weight, bias)`` with an unbiased WTA-CRS estimate of the weight gradient.

    ``input`` ``[..., in]`` (2D or 3D), ``weight`` ``[out, in]``. The n = ``input.numel() / in``
    token rows are sampled with ``p_i ∝ ||h_i|| * grad_norm_i``; ``k = budget(n, ratio, min_k)``
    rows are stored. ``grad_norm`` (``[n]`` or ``input.shape[:-1]``) estimates the output-gradient
    row norms (small but nonzero for pad tokens, see :mod:`wtacrs.gradnorm`); None means 1.
    ``sample`` is a precomputed result of :func:`sample_input` (with the same ``row_source``) to
    share one sample between layers that read the same input. ``grad_norm_sink`` receives the
    fp32 output-gradient row norms ``[n]`` during backward (the per-sample gradient-norm cache
    uses it). ``row_source`` says how to rebuild input rows from tensors saved elsewhere; then
    only indices and weights are stored.
    """
    source_tensors: tuple[Tensor, ...] = ()
    if not weight.requires_grad:
        rows = weights = indices = row_source = None
    else:
        if sample is None:
            sample = sample_input(
                input, ratio=ratio, min_k=min_k, grad_norm=grad_norm, generator=generator, row_source=row_source
            )
        rows, weights, indices = sample
        if indices is None:  # k >= n: exact
            row_source = None
        elif row_source is not None:
            source_tensors = row_source.tensors
    return SampledLinear.apply(input, weight, bias, rows, weights, indices, grad_norm_sink, row_source, *source_tensors)


def sample_input(
    input: Tensor,
    *,
    ratio: float,
    min_k: int = 1,
    grad_norm: Tensor | None = None,
    generator: torch.Generator | None = None,
    row_source: RowSource | None = None,
) -> Sample:
    """What a sampled linear stores for ``input`` ``[..., in]``: ``(rows, weights, indices)``.

    ``rows`` ``[k, in]`` in the input's dtype (None with a ``row_source``: rebuilt in backward),
    ``weights`` ``[k]`` fp32, ``indices`` ``[k]`` int32. When ``k >= n`` it is
    ``(input, None, None)``: the input itself is kept and the gradient is exact.
    """
    x = input.detach().reshape(-1, input.shape[-1])
    n = x.shape[0]
    k = budget(n, ratio, min_k)
    if k >= n:
        return input.detach(), None, None
    if grad_norm is not None:
        grad_norm = grad_norm.reshape(n)
    with torch.no_grad():
        if row_source is None:
            return sample_rows(x, k, grad_norm=grad_norm, generator=generator)
        if estimator.shapes_only(x):
            return None, torch.empty(k, dtype=torch.float32, device="meta"), torch.empty(k, dtype=index_dtype(n), device="meta")
        norms = row_norms(x)
        p = row_probabilities(x, grad_norm, norms=norms)
        sample = wtacrs_sample(p, k, generator, forced=~torch.isfinite(norms))
        return None, sample.weights, sample.indices.to(index_dtype(n))


class SampledMatmul(torch.autograd.Function):
    """``a @ b`` (``[..., M, K] @ [..., K, N]``) with both operand gradients estimated.

    For ``grad_b = a^T grad`` it stores rows of ``a`` sampled along M (``[..., kM, K]``, their
    fp32 weights ``[..., kM]`` and indices), or ``a`` itself; for ``grad_a = grad b^T`` it stores
    columns of ``b`` sampled along N, kept as rows of ``b^T`` (``[..., kN, K]``, weights and
    indices), or ``b`` itself. The six slots are saved in the fixed order ``a_rows, a_weights,
    a_idx, b_cols, b_weights, b_idx``; unused slots are None. The weights are applied in backward
    (:func:`wtacrs.estimator.weighted_product`).
    """

    operator = None  # a matmul: the module decides (a Linear's entry, the attention's call order)
    category = Category.SAMPLED

    @staticmethod
    def forward(ctx, a, b, a_rows, a_weights, a_idx, b_cols, b_weights, b_idx):
        ctx.a_shape, ctx.b_shape = a.shape, b.shape
        ctx.a_dtype, ctx.b_dtype = a.dtype, b.dtype
        ctx.save_for_backward(a_rows, a_weights, a_idx, b_cols, b_weights, b_idx)
        return torch.matmul(a, b)

    @staticmethod
    def backward(ctx, grad):
        a_rows, a_weights, a_idx, b_cols, b_weights, b_idx = ctx.saved_tensors
        grad_a = grad_b = None
        dtype = grad.dtype  # differs from the saved tensors' under autocast
        if ctx.needs_input_grad[0]:
            if b_idx is None:  # b_cols is b itself
                grad_a = torch.matmul(grad, b_cols.transpose(-1, -2).to(dtype))
            else:
                grad_cols = gather_rows(grad.transpose(-1, -2), b_idx)  # [..., kN, M]
                grad_a = weighted_product(grad_cols, b_cols, b_weights, dtype)
            grad_a = grad_a.sum_to_size(ctx.a_shape).to(ctx.a_dtype)
        if ctx.needs_input_grad[1]:
            if a_idx is None:  # a_rows is a itself
                grad_b = torch.matmul(a_rows.transpose(-1, -2).to(dtype), grad)
            else:
                grad_rows = gather_rows(grad, a_idx)  # [..., kM, N]
                grad_b = weighted_product(a_rows, grad_rows, a_weights, dtype)
            grad_b = grad_b.sum_to_size(ctx.b_shape).to(ctx.b_dtype)
        return grad_a, grad_b, None, None, None, None, None, None


def matmul(
    a: Tensor,
    b: Tensor,
    *,
    ratio: float,
    min_k: int = 1,
    sample_a: bool = True,
    sample_b: bool = True,
    generator: torch.Generator | None = None,
) -> Tensor:
    """``torch.matmul(a, b)`` for batched ``[..., M, K] @ [..., K, N]`` with sampled gradients.

    Rows of ``a`` are sampled along M and columns of ``b`` along N, independently per leading
    index (per (batch, head) in attention), ``k = budget(M or N, ratio, min_k)``. ``sample_a=False``
    keeps ``a`` whole (exact ``grad_b``), ``sample_b=False`` keeps ``b`` whole (exact ``grad_a``).
    Nothing is stored for an operand whose gradient is not required.
    """
    if a.dim() < 2 or b.dim() < 2:
        raise ValueError(f"matmul needs operands of at least 2 dims, got {tuple(a.shape)} and {tuple(b.shape)}")
    lead = torch.broadcast_shapes(a.shape[:-2], b.shape[:-2])
    a_sample = b_sample = (None, None, None)
    with torch.no_grad():
        if b.requires_grad:
            a_sample = _operand_sample(a.detach(), lead, ratio, min_k, sample_a, generator)
        if a.requires_grad:
            b_sample = _operand_sample(b.detach().transpose(-1, -2), lead, ratio, min_k, sample_b, generator)
            if b_sample[2] is None:
                b_sample = (b.detach(), None, None)
    return SampledMatmul.apply(a, b, *a_sample, *b_sample)


def _operand_sample(x, lead, ratio, min_k, sample, generator):
    """``(rows, weights, indices)`` of ``x`` ``[..., n, d]`` (broadcast to ``lead``), or
    ``(x, None, None)`` if kept whole."""
    n = x.shape[-2]
    k = budget(n, ratio, min_k)
    if not sample or k >= n:
        return x, None, None
    x = x.expand(*lead, *x.shape[-2:])
    return sample_rows(x, k, generator=generator)
