"""Row sources: how to recompute rows of an activation from tensors that are saved anyway.

A sampled linear needs, in backward, ``k`` rows of its input. When that input is a row-wise
function of tensors other ops already keep for their own backward -- a LayerNorm/RMSNorm output
(the norm keeps its input), a linear's output computed from such rows, an activation or a
dropout of those -- the linear stores only the ``k`` indices and weights and recomputes the rows.
This is how Linear-Q/K/V/U read the norm's saved input and Linear-D reads GeLU/ReLU's input and
the dropout mask instead of storing rows of their own.

Producers (the lean norm, sampled linears, lossless activations and dropouts) call
:func:`register` on their output during a training forward; consumers call :func:`lookup` on
their input. A registration is held by the output tensor itself and dies with it, so nothing
outlives the forward pass except what autograd saved.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor

RowFn = Callable[[tuple[Tensor, ...], Tensor], Tensor]


@dataclass(frozen=True)
class RowSource:
    """``fn(tensors, indices)`` -> the rows ``[k, d]`` at flat token ``indices`` ``[k]``.

    ``tensors`` are the saved activations ``fn`` reads; a consumer saves them with
    ``save_for_backward`` (their storages are already saved by the producers, so they cost no
    extra bytes). ``fn`` captures only parameters and plain values, never activations.
    """

    tensors: tuple[Tensor, ...]
    fn: RowFn

    def rows(self, tensors: tuple[Tensor, ...], indices: Tensor) -> Tensor:
        return self.fn(tensors, indices.long())

    def then(self, fn: Callable[[Tensor], Tensor], extra: tuple[Tensor, ...] = ()) -> RowSource:
        """The source of ``fn(rows)``; ``fn`` may read ``extra`` tensors (passed after the rows)."""
        inner, n_inner = self.fn, len(self.tensors)

        def composed(tensors, indices):
            rows = inner(tensors[:n_inner], indices)
            return fn(rows, *tensors[n_inner:], indices=indices) if extra else fn(rows)

        return RowSource(self.tensors + tuple(extra), composed)


_ATTRIBUTE = "_wtacrs_row_source"


class _Registration:
    """A row source as registered on an output tensor, with the tensor's version at registration.

    It pickles (``torch.save``, ``copy.deepcopy`` of the tensor) as no registration: the source's
    closure does not pickle, and a copy is not the tensor the producer computed.
    """

    __slots__ = ("source", "version")

    def __init__(self, source: RowSource | None = None, version: int = -1) -> None:
        self.source, self.version = source, version

    def __reduce__(self):
        return (_Registration, ())


def register(output: Tensor, source: RowSource) -> None:
    """Declare that the rows of ``output`` (``[..., d]``, tokens flattened) come from ``source``.

    The registration is an attribute of ``output`` itself, so it lives exactly as long as the
    tensor and no table outlives the forward pass.
    """
    setattr(output, _ATTRIBUTE, _Registration(source, output._version))


def lookup(input: Tensor) -> RowSource | None:
    """The row source registered for ``input`` (same tensor object, not modified since)."""
    entry = getattr(input, _ATTRIBUTE, None)
    if entry is None or entry.source is None or entry.version != input._version:
        return None
    return entry.source
