"""Activation checkpointing of a converted model: a recomputed region samples what its forward sampled.

Non-reentrant ``torch.utils.checkpoint`` runs each region twice, in the forward and again in
backward, and backward uses what the second run saves. For a sampled layer the two runs must
draw the same rows. Three things would make them differ:

- the conversion's :class:`~wtacrs.rng.GeneratorPool`: checkpoint replays torch's default
  generators (``preserve_rng_state``, which covers the dropout masks) but not private ones, so
  the second run would draw new rows from an advanced generator;
- the token masks and :class:`~wtacrs.gradnorm.GradNormCache` the probabilities read: the
  model's forward hook closes their scope before backward, so the second run would see none;
- the sample share of Q/K/V, which the forward hook clears after the forward.

:func:`checkpoint_context_fn` gives the ``context_fn`` that checkpoint calls once per region. On
entry to the region's forward it takes the pool's generator states and the active sources; the
recomputation runs with both restored (the generators are put back as they were afterwards,
as ``torch.random.fork_rng`` does), so it draws the forward's rows: the same indices and
weights, and gradients equal to those of the same model without checkpointing, bit for bit.

Usage::

    model = wtacrs.convert(model, config)
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={
        "use_reentrant": False, "context_fn": wtacrs.checkpoint_context_fn(model)})

(``gradient_checkpointing_enable(gradient_checkpointing_kwargs=...)`` in transformers releases
before ``activation_checkpointing_enable``.)

Limitations: the reentrant variant (``use_reentrant=True``) takes no ``context_fn``; its
recomputation draws other rows than the forward (not reproducible; the bias of that mix is
not measured). Under ``torch.compile`` checkpoint accepts only ``TorchDispatchMode`` contexts
and raises for this one (read from torch's ``torch.utils.checkpoint``, not run here). Each
region keeps its generator states until backward: host memory, about 5 KiB per region for a cpu
generator and 16 bytes for a cuda one, not tensor memory of the device.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from wtacrs.convert import conversion_state
from wtacrs.gradnorm import ForwardSources
from wtacrs.modules import SampleShare
from wtacrs.rng import GeneratorPool


class _Recomputation:
    """What a region's forward draws from, taken when checkpoint asks for the region's contexts
    (just before its forward runs): restored around its recomputation (re-entrant)."""

    def __init__(self, generators: GeneratorPool | None, share: SampleShare) -> None:
        self.generators, self.share = generators, share
        self.states = {} if generators is None else generators.get_state()
        self.sources = ForwardSources()
        self._outer: list[dict[torch.device, torch.Tensor]] = []

    def __enter__(self) -> _Recomputation:
        if self.generators is not None:
            self._outer.append(self.generators.get_state())
            self.generators.set_state(self.states)
        self.sources.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.sources.__exit__(*exc)
        self.share.clear()  # the recomputation's samples are saved by its nodes; the share need not hold them
        if self.generators is not None:
            self.generators.set_state(self._outer.pop())


class CheckpointContext:
    """The ``context_fn`` of one converted model: an object rather than a closure, so that a
    ``copy.deepcopy`` of the model (which copies the checkpoint partials on its layers) replays
    the copy's generators, not the original's."""

    def __init__(self, model: nn.Module) -> None:
        self.state = conversion_state(model)  # ValueError for a model wtacrs.convert did not convert

    def __call__(self) -> tuple[contextlib.nullcontext, _Recomputation]:
        return contextlib.nullcontext(), _Recomputation(self.state.generators, self.state.share)


def checkpoint_context_fn(model: nn.Module) -> CheckpointContext:
    """The ``context_fn`` for non-reentrant ``torch.utils.checkpoint`` on a model converted by
    :func:`wtacrs.convert` (see the module docstring). Raises ValueError for any other model."""
    return CheckpointContext(model)
