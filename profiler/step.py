"""``profile_step``: the profiler's tracker and breakdown around a block of user code.

A small public face over the private engine, as ``torch.utils.flop_counter.FlopCounterMode`` sits
over its dispatch mode::

    from profiler import profile_step

    with profile_step(model, optimizer) as prof:
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
    prof.peak_bytes                  # most bytes of tensor storage alive at once in the block
    prof.activations_by_operator()   # [{"operator", "category", "bytes"}], saved for backward
    prof.activations_by_module()     # {module path: bytes saved for backward}
    prof.flops                       # matmul-class FLOPs of the block

The figures are those of ``python -m profiler run`` (``StorageTracker`` and
``SavedActivationBreakdown``); ``measure_training_step`` adds warm-up, labelled categories and
timed steps around the same engine.
"""

from __future__ import annotations

from collections.abc import Iterable
from contextlib import ExitStack

import torch
from torch import nn

from wtacrs.taxonomy import UnsupportedModelError, family_of

from .breakdown import SavedActivation, SavedActivationBreakdown
from .measure import CudaKernelBehaviour, step_state
from .tracker import CUDA_BLOCK_BYTES, StorageTracker


class profile_step:  # noqa: N801 -- a context manager named like torch's (``no_grad``, ``profile``)
    """Peak memory, saved activations and FLOPs of the code run inside the block.

    Storages alive on entry count from the start: the model's parameters, buffers and gradients,
    the optimizer's state, and ``inputs`` (the batch). ``models_device="cuda"`` on a cpu or meta
    model makes the block save and allocate what cuda kernels do (bool dropout masks, foreach
    optimizer steps) and rounds every storage to cuda's 512-byte blocks, as the runner's meta
    estimates do; the default models the model's own device.

    After the block:

    - ``peak_bytes``: the most bytes of tracked tensor storage alive at one instant;
    - ``flops``: ``torch.utils.flop_counter`` formulas summed over the block's ops;
    - ``saved``: one ``SavedActivation`` per storage the forward saved for backward
      (deduplicated, parameters and buffers excluded), attributed to an operator and a category
      of ``wtacrs.taxonomy``; ``activations_by_operator()``, ``activations_by_module()`` and
      ``saved_bytes`` sum them.

    Leaves no trace: the tracker, the breakdown's hooks, ``CudaKernelBehaviour`` and the patch of
    ``torch.autograd.backward`` are all undone on exit.

    Limitations:

    - The graph is read when the first backward of the block starts (``torch.autograd.backward``
      is wrapped for that), so the activations are those of the forward before it; a block
      without backward attributes what it saved by module role only.
    - The tracker's limits apply (``profiler.tracker.StorageTracker``): memory a kernel allocates
      for itself is not counted, so on cuda the caching allocator's peak is the reference.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer | None = None, *,
                 inputs: Iterable[torch.Tensor] | dict = (), models_device: str | None = None) -> None:
        devices = {p.device.type for p in model.parameters()} or {"cpu"}
        if models_device not in (None, "cuda", "cpu"):
            raise ValueError(f"models_device must be 'cuda', 'cpu' or None, got {models_device!r}")
        self.model = model
        self.optimizer = optimizer
        self.inputs = list(inputs.values() if isinstance(inputs, dict) else inputs)
        self.models_device = models_device or ("cuda" if "cuda" in devices else "cpu")
        cuda_on_host = self.models_device == "cuda" and "cuda" not in devices
        self._kernels = CudaKernelBehaviour(optimizer) if cuda_on_host else None
        # modelling cpu kernels on meta, the optimizer's cpu step counters count as they would on a cpu
        tracked = devices | {"cpu"} if self.models_device == "cpu" else devices
        self.tracker = StorageTracker(tracked, round_to=CUDA_BLOCK_BYTES if self.models_device == "cuda" else 1)
        try:
            family = family_of(model)
        except UnsupportedModelError:  # module roles by their types alone
            family = None
        self.breakdown = SavedActivationBreakdown(model, family, tracker=self.tracker)
        self._stack: ExitStack | None = None
        self._attributed = False

    # -- results --------------------------------------------------------------------------------
    @property
    def peak_bytes(self) -> int:
        return self.tracker.peak_bytes

    @property
    def flops(self) -> int:
        return self.tracker.flops

    @property
    def saved(self) -> list[SavedActivation]:
        return self.breakdown.saved

    @property
    def saved_bytes(self) -> int:
        """Every byte saved for backward: the sum of ``saved``."""
        return self.breakdown.total_bytes()

    def activations_by_operator(self) -> list[dict]:
        """``[{"operator", "category", "bytes"}]`` per (operator, category), in taxonomy order."""
        return self.breakdown.by_operator()

    def activations_by_module(self) -> dict[str, int]:
        """Bytes saved for backward per module path (``T5ForConditionalGeneration.encoder...``)."""
        totals: dict[str, int] = {}
        for activation in self.saved:
            totals[activation.path] = totals.get(activation.path, 0) + activation.nbytes
        return totals

    # -- the block ------------------------------------------------------------------------------
    def __enter__(self) -> profile_step:
        self.tracker.track_existing(step_state(self.model, self.inputs, self.optimizer))
        with ExitStack() as stack:
            if self._kernels is not None:
                stack.enter_context(self._kernels)
            stack.enter_context(self.tracker)
            original = torch.autograd.backward

            def backward(tensors, *args, **kwargs):
                self._attribute(tensors)
                return original(tensors, *args, **kwargs)

            torch.autograd.backward = backward
            stack.callback(setattr, torch.autograd, "backward", original)
            self.breakdown.__enter__()  # left in ``_attribute``
            self._stack = stack.pop_all()
        return self

    def __exit__(self, *exc) -> None:
        self._attribute(())
        self._stack.__exit__(*exc)
        self._stack = None

    def _attribute(self, outputs) -> None:
        """Read the graph behind ``outputs`` once, before backward frees it; stop listing saves."""
        if self._attributed:
            return
        self._attributed = True
        self.breakdown.__exit__(None, None, None)
        self.breakdown.attribute([outputs] if isinstance(outputs, torch.Tensor) else list(outputs))
