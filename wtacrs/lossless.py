"""Lossless activation ops: bit-packed dropout and ReLU masks.

Every op here is plain torch (no C++ extension), runs on CPU, CUDA, the meta device and under
``FakeTensorMode`` (all shapes are static), and stores what its backward needs with
``ctx.save_for_backward`` only, so ``torch.autograd.graph.saved_tensors_hooks`` (and the
profiler) sees every byte.

Dropout
-------
:func:`dropout` gives, under the same RNG state, a forward output **bitwise identical** to
``torch.nn.functional.dropout``: it runs exactly the kernels torch runs on that device,

* CUDA (and the other devices of torch's fused kernel, for ``0 < p < 1``): ``torch.native_dropout``,
  whose bool mask is packed;
* CPU and meta: torch's composite path ``noise = empty_like(x).bernoulli_(1 - p).div_(1 - p)``,
  ``x * noise``; ``noise != 0`` is packed,

and its gradient is the one torch computes (``native_dropout_backward`` / ``grad * noise``).

The mask is kept as 1 bit per element (:class:`PackedDropout`): ``ceil(numel / 8)`` uint8, the
same bits on every device, and backward needs no generator state. (Regenerating the mask from a
saved generator state instead is measured in ``benchmarks/lossless.py``; figures in
``benchmarks/RESULTS.md``.)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from wtacrs.taxonomy import Category, Operator

# --------------------------------------------------------------------------------------------
# bit packing
# --------------------------------------------------------------------------------------------


def packed_numel(numel: int) -> int:
    """Bytes of a packed mask of ``numel`` bits: ``ceil(numel / 8)``."""
    return (numel + 7) // 8


def pack_bits(mask: Tensor, *, invert: bool = False) -> Tensor:
    """Pack a bool tensor into ``ceil(numel / 8)`` uint8 bytes (flattened in row-major order).

    Bit ``j`` of byte ``i`` is element ``8 i + j``; the padding bits of the last byte are 0.
    ``invert=True`` packs ``~mask``. Plain torch ops on the ``[n/8, 8]`` byte view (one
    shift-or per bit column), so it runs on any device, on meta and under ``FakeTensorMode``.
    """
    if mask.dtype != torch.bool:
        raise TypeError(f"pack_bits needs a bool tensor, got {mask.dtype}")
    flat = mask.reshape(-1)
    n = flat.numel()
    if n == 0:
        return torch.empty(0, dtype=torch.uint8, device=mask.device)
    pad = (-n) % 8
    if pad:
        flat = torch.cat([flat, flat.new_full((pad,), invert)])
    columns = flat.view(-1, 8).view(torch.uint8)
    packed = columns[:, 0].clone()
    for bit in range(1, 8):
        packed |= columns[:, bit] << bit
    if invert:
        packed ^= 0xFF
    return packed


def _bits_table(device: torch.device) -> Tensor:
    """bool ``[256, 8]``: row ``b`` holds the 8 bits of byte ``b``, least significant first."""
    byte = torch.arange(256, dtype=torch.int32, device=device)
    shift = torch.arange(8, dtype=torch.int32, device=device)
    return byte.unsqueeze(-1).bitwise_right_shift(shift).bitwise_and_(1).bool()


def _unpack_rows(packed: Tensor, table: Tensor, shape: torch.Size) -> Tensor:
    """``table[packed]`` (``table`` ``[256, 8]``, any dtype) cut to ``shape``: one gather pass."""
    out = table.index_select(0, packed.int()).reshape(-1)
    n = shape.numel()
    if out.numel() != n:
        out = out[:n]
    return out.view(shape)


def unpack_bits(packed: Tensor, shape: torch.Size | tuple[int, ...]) -> Tensor:
    """The bool tensor of ``shape`` that :func:`pack_bits` packed into ``packed``."""
    shape = torch.Size(shape)
    _check_packed(packed, shape)
    return _unpack_rows(packed, _bits_table(packed.device), shape)


def _check_packed(packed: Tensor, shape: torch.Size) -> None:
    n = shape.numel()
    if packed.dtype != torch.uint8 or packed.dim() != 1 or packed.numel() != packed_numel(n):
        raise ValueError(
            f"unpack_bits: expected {packed_numel(n)} uint8 bytes for shape {tuple(shape)}, "
            f"got {packed.dtype} {tuple(packed.shape)}"
        )


# --------------------------------------------------------------------------------------------
# dropout
# --------------------------------------------------------------------------------------------


def _fused_device(x: Tensor, p: float) -> bool:
    """Whether torch's ``F.dropout`` takes the fused ``native_dropout`` kernel for ``x`` (ATen's
    ``is_fused_kernel_acceptable``)."""
    return x.device.type in ("cuda", "xpu", "lazy", "privateuseone") and 0.0 < p < 1.0 and x.numel() > 0


def _scale(p: float) -> float:
    return 0.0 if p == 1.0 else 1.0 / (1.0 - p)


def _composite_noise(mask: Tensor, dtype: torch.dtype, p: float) -> Tensor:
    """CPU dropout's ``noise`` (``bernoulli_(1 - p).div_(1 - p)``) rebuilt bit for bit from the mask."""
    noise = mask.to(dtype)
    noise.div_(1.0 - p)
    return noise


def _composite_apply(x: Tensor, noise: Tensor) -> Tensor:
    return x * noise


def _fused_apply(x: Tensor, mask: Tensor, p: float) -> Tensor:
    """``native_dropout_backward(x, mask, scale)``: ``x * mask * scale`` as the CUDA kernels compute it."""
    if torch.is_grad_enabled() and x.requires_grad:  # create_graph: torch's differentiable formula
        return x * (mask.type_as(x) * _scale(p))
    return torch.ops.aten.native_dropout_backward(x, mask, _scale(p))


class DropoutMask:
    """How to rebuild a dropout's keep-mask from the tensor its node saved (no tensor inside).

    Returned by :func:`dropout_with_mask` together with that saved tensor (the packed bits). An op that needs the same mask -- TensorMul-2 recomputing ``dropout(P)`` --
    saves that very tensor with ``save_for_backward``, so its storage is counted once, and calls
    :meth:`apply` in backward.
    """

    __slots__ = ("fused", "p", "shape")

    def __init__(self, p: float, x: Tensor):
        self.p, self.fused, self.shape = p, _fused_device(x, p), x.shape

    def keep(self, saved: Tensor) -> Tensor:
        """The bool keep-mask (``True`` = kept) of shape :attr:`shape`."""
        return unpack_bits(saved, self.shape)

    def apply(self, x: Tensor, saved: Tensor) -> Tensor:
        """``dropout(x)`` with this mask, computed as torch's kernel on this device computes it.

        For the tensor the dropout read this is bitwise its output; for a gradient it is torch's
        dropout backward (``native_dropout_backward`` / ``grad * noise``).
        """
        if not self.fused:
            # CPU noise straight from the bytes: a [256, 8] table of {0, 1 / (1 - p)} in x's dtype,
            # divided exactly as torch divides its noise
            _check_packed(saved, self.shape)
            table = _bits_table(saved.device).to(x.dtype).div_(1.0 - self.p)
            return _composite_apply(x, _unpack_rows(saved, table, self.shape))
        return dropout_rows(x, self.keep(saved), self.p, fused=self.fused)


def _draw(x: Tensor, p: float, generator: torch.Generator | None) -> tuple[Tensor, Tensor, bool]:
    """``(out, keep, fused)``: exactly what ``F.dropout(x, p, True)`` computes on this device."""
    if _fused_device(x, p):
        if generator is None:
            out, keep = torch.native_dropout(x, p, True)
        else:  # native_dropout takes no generator: the same maths, the mask from bernoulli_
            keep = torch.empty(x.shape, dtype=torch.bool, device=x.device).bernoulli_(1.0 - p, generator=generator)
            out = torch.ops.aten.native_dropout_backward(x, keep, _scale(p))
        return out, keep, True
    noise = torch.empty_like(x).bernoulli_(1.0 - p, generator=generator)
    noise.div_(1.0 - p)
    return x * noise, noise.ne(0), False


class PackedDropout(torch.autograd.Function):
    """Dropout that saves its keep-mask as ``ceil(numel / 8)`` packed bytes, and nothing else.

    ``apply(x, p, generator, info)`` returns ``(out, packed)``: the packed mask is a
    (non-differentiable) output, so ops that reuse the mask can save that very tensor. It leaves
    the Function as an output, not through a side channel, which ``torch.compile`` requires.
    """

    operator = Operator.DROPOUT
    category = Category.LOSSLESS

    @staticmethod
    def forward(ctx, x, p, generator, info):
        out, keep, _ = _draw(x, p, generator)
        packed = pack_bits(keep)
        ctx.info = info
        ctx.save_for_backward(packed)
        ctx.mark_non_differentiable(packed)
        return out, packed

    @staticmethod
    def backward(ctx, grad, _grad_packed):
        (packed,) = ctx.saved_tensors
        return ctx.info.apply(grad, packed), None, None, None


def dropout_with_mask(
    x: Tensor,
    p: float = 0.5,
    training: bool = True,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, DropoutMask | None, Tensor | None]:
    """:func:`dropout`, also returning ``(mask, saved)``: a :class:`DropoutMask` and the tensor
    the dropout node saved (``(None, None)`` when nothing is dropped or no graph is recorded).

    ``mask.apply(y, saved)`` rebuilds ``dropout(y)`` with the same mask for another tensor ``y``
    (bitwise ``out`` for ``y = x``).
    """
    if p < 0.0 or p > 1.0:
        raise ValueError(f"dropout probability has to be between 0 and 1, but got {p}")
    if not training or p == 0.0 or x.numel() == 0:
        return x, None, None
    if p == 1.0:  # torch: input * zeros({}) (NaN stays NaN); its gradient needs nothing saved
        return x * torch.zeros((), dtype=x.dtype, device=x.device), None, None
    if not (torch.is_grad_enabled() and x.requires_grad):  # nothing will be saved
        return (F.dropout(x, p, True) if generator is None else _draw(x, p, generator)[0]), None, None
    info = DropoutMask(p, x)
    out, saved = PackedDropout.apply(x, p, generator, info)
    return out, info, saved


def dropout(
    x: Tensor,
    p: float = 0.5,
    training: bool = True,
    generator: torch.Generator | None = None,
) -> Tensor:
    """``F.dropout(x, p, training)`` (bitwise, the same RNG draw) that saves a 1-bit mask.

    ``p == 0``, ``training=False`` or an empty ``x`` return ``x`` itself and save nothing, like
    torch. ``generator`` draws the mask instead of the device's default generator (then the mask
    is not the one ``F.dropout`` would draw).
    """
    return dropout_with_mask(x, p, training, generator)[0]


# --------------------------------------------------------------------------------------------
# ReLU
# --------------------------------------------------------------------------------------------


class PackedReLU(torch.autograd.Function):
    """``torch.relu`` that saves ``ceil(numel / 8)`` bytes: the bits of ``not (relu(x) <= 0)``.

    That is exactly what torch's ``threshold_backward(grad, result, 0)`` reads, so the gradient
    is torch's bit for bit (NaN passes the gradient through, an infinite gradient at a dead
    unit becomes 0, as in torch).
    """

    operator = Operator.ACTIVATION
    category = Category.LOSSLESS

    @staticmethod
    def forward(ctx, x):
        out = torch.relu(x)
        packed = pack_bits(out.le(0), invert=True)
        ctx.shape = out.shape
        ctx.save_for_backward(packed)
        return out

    @staticmethod
    def backward(ctx, grad):
        (packed,) = ctx.saved_tensors
        keep = _unpack_rows(packed, _bits_table(packed.device).to(grad.dtype), ctx.shape)
        return torch.ops.aten.threshold_backward(grad, keep, 0)


def relu(x: Tensor) -> Tensor:
    """``torch.relu(x)`` with a 1-bit saved mask and torch's exact gradient."""
    if not (torch.is_grad_enabled() and x.requires_grad):
        return torch.relu(x)
    return PackedReLU.apply(x)


def dropout_rows(x_rows: Tensor, keep_rows: Tensor, p: float, *, fused: bool) -> Tensor:
    """``dropout`` applied to rows gathered from a dropout's input, with the gathered keep-mask.

    ``fused`` is :attr:`DropoutMask.fused` (the CUDA kernel's maths, else CPU's ``x * noise``).
    Elementwise, so the result is bitwise the gathered rows of the dropout's output.
    """
    if fused:
        return _fused_apply(x_rows, keep_rows, p)
    return _composite_apply(x_rows, _composite_noise(keep_rows, x_rows.dtype, p))


__all__ = [
    "DropoutMask",
    "PackedDropout",
    "PackedReLU",
    "dropout",
    "dropout_rows",
    "dropout_with_mask",
    "pack_bits",
    "packed_numel",
    "relu",
    "unpack_bits",
]
