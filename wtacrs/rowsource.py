"""Row sources: how to recompute rows of an activation from tensors that are saved anyway.

A sampled linear needs, in backward, ``k`` rows of its input. When that input is a row-wise
function of tensors other ops already keep for their own backward -- a LayerNorm/RMSNorm output
(the norm keeps its input), a linear's output computed from such rows, an activation or a
dropout of those -- the linear stores only the ``k`` indices and weights and recomputes the rows.
This is how Linear-Q/K/V/U read the norm's saved input and Linear-D reads GeLU/ReLU's input and
the dropout mask instead of storing rows of their own.

Producers (the lean norm, sampled linears, lossless activations and dropouts) call
:func:`register` on their output during a training forward; consumers call :func:`lookup` on
their input. A registration is held by the output's storage and dies with it, so nothing
outlives the forward pass except what autograd saved.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

RowFn = Callable[[tuple[Tensor, ...], Tensor], Tensor]


@dataclass(frozen=True)
class RowSource:
    """``fn(tensors, indices)`` -> the rows ``[k, d]`` at flat token ``indices`` ``[k]`` (int64).

    ``tensors`` are the saved activations ``fn`` reads; a consumer saves them with
    ``save_for_backward`` (their storages are already saved by the producers, so they cost no
    extra bytes) and keeps only ``fn`` beyond the forward. ``fn`` captures only parameters and
    plain values, never activations: a reference it held would keep an activation alive that
    activation checkpointing frees.
    """

    tensors: tuple[Tensor, ...]
    fn: RowFn

    def then(self, fn: Callable[[Tensor], Tensor], extra: tuple[Tensor, ...] = ()) -> RowSource:
        """The source of ``fn(rows)``; ``fn`` may read ``extra`` tensors (passed after the rows)."""
        inner, n_inner, reads_extra = self.fn, len(self.tensors), bool(extra)  # never capture ``extra``

        def composed(tensors, indices):
            rows = inner(tensors[:n_inner], indices)
            return fn(rows, *tensors[n_inner:], indices=indices) if reads_extra else fn(rows)

        return RowSource(self.tensors + tuple(extra), composed)


_ATTRIBUTE = "_wtacrs_row_sources"

Geometry = tuple[int, tuple[int, ...], tuple[int, ...], torch.dtype]


def _geometry(tensor: Tensor) -> Geometry:
    return tensor.storage_offset(), tuple(tensor.shape), tuple(tensor.stride()), tensor.dtype


class _Registration:
    """A row source as registered on an output tensor, with the tensor's version at registration."""

    __slots__ = ("source", "version")

    def __init__(self, source: RowSource, version: int) -> None:
        self.source, self.version = source, version


class _Registrations(dict):
    """The registrations on one storage, by the geometry of the registered tensor.

    It pickles (``torch.save``, ``copy.deepcopy``) as no registration: the sources' closures do
    not pickle, and a copy is not the tensor the producer computed.
    """

    def __reduce__(self):
        return (_Registrations, ())


def register(output: Tensor, source: RowSource) -> None:
    """Declare that the rows of ``output`` (``[..., d]``, tokens flattened) come from ``source``.

    The registration is an attribute of ``output``'s storage, keyed by ``output``'s geometry
    (offset, shape, strides, dtype), so it lives exactly as long as the data and no table
    outlives the forward pass. Any tensor with that storage and geometry is the same data and
    finds it: in particular the alias autograd unpacks for a saved tensor under
    ``saved_tensors_hooks``, such as the inputs a non-reentrant ``torch.utils.checkpoint`` region
    is recomputed from (a new Python object, so an attribute of the tensor object would be lost
    and the recomputation would save other tensors than the forward). ``source.tensors`` must
    not include ``output`` itself.
    """
    storage = output.untyped_storage()
    table = getattr(storage, _ATTRIBUTE, None)
    if table is None:
        table = _Registrations()
        setattr(storage, _ATTRIBUTE, table)
    table[_geometry(output)] = _Registration(source, output._version)


def lookup(input: Tensor) -> RowSource | None:
    """The row source registered for ``input``'s data (same storage and geometry), or None when
    none is or the data was modified in place since (aliases share the version counter)."""
    table = getattr(input.untyped_storage(), _ATTRIBUTE, None)
    entry = None if table is None else table.get(_geometry(input))
    if entry is None or entry.version != input._version:
        return None
    return entry.source
