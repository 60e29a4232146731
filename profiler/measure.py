"""Memory, activation breakdown, FLOPs and throughput of one training step.

``measure_training_step`` runs warm-up steps (so optimizer state exists), then one tracked step
and, off the meta device, timed steps. The tracked step is::

    optimizer.zero_grad(set_to_none=True); loss = model(**batch).loss; loss.backward(); optimizer.step()

Backends, each a context manager that undoes everything it installs:

- ``StorageTracker`` (``profiler.tracker``): cpu and meta. Exact accounting of tensor storages.
- ``CudaAllocatorPeak``: cuda. The caching allocator's peak, plus NVML used memory as context;
  categories still come from the tracker.
- ``CudaKernelBehaviour``: on a non-cuda device, makes the step save what cuda kernels save
  (``F.dropout`` -> ``native_dropout``, bool mask) and step the optimizer as on cuda (foreach).
"""

from __future__ import annotations

import time
import weakref
from contextlib import ExitStack, nullcontext
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from wtacrs.taxonomy import Family

from .breakdown import SavedActivationBreakdown
from .records import MEMORY_CATEGORIES
from .steptime import StepCost
from .tracker import CUDA_BLOCK_BYTES, PREEXISTING, StorageTracker

DEVICE_TYPES = ("cuda", "cpu", "meta")


@dataclass
class Measurement:
    """What one measured (or estimated) training step came to. Bytes are ints.

    ``categories`` holds every key of ``profiler.records.MEMORY_CATEGORIES``, the bytes alive at
    the peak instant in each. ``activations`` is ``[{"operator", "category", "bytes"}]``, the
    deduplicated bytes saved for backward in the forward pass.
    """

    peak_bytes: int
    categories: dict[str, int]
    activations: list[dict]
    reserved_bytes: int | None = None  # cuda allocator reserved peak
    nvml_used_bytes: int | None = None  # NVML used memory (context only, never a gate)
    step_times_s: list[float] = field(default_factory=list)  # timed steps; empty on meta
    cost: StepCost | None = None  # the tracked step's kernels: FLOPs and bytes per op (profiler.steptime)
    estimated: bool = False  # True on meta
    models_device: str = "cpu"  # whose kernels the figures model
    peak_phase: str | None = None  # forward / backward / optimizer: where the tracked peak fell

    @property
    def flops(self) -> int | None:
        """FLOPs of one training step (matmul-class ops); None when no kernel was counted."""
        return self.cost.flops if self.cost is not None else None


def training_step(model: nn.Module, batch: dict, optimizer: torch.optim.Optimizer) -> torch.Tensor:
    """One optimisation step; returns the (detached) loss."""
    optimizer.zero_grad(set_to_none=True)
    loss = model(**batch).loss
    loss.backward()
    optimizer.step()
    return loss.detach()


# Per meta model: the parameters a real warm-up step gave a gradient (ids; the model keeps them alive).
_REACHED_PARAMETERS: weakref.WeakKeyDictionary[nn.Module, frozenset[int]] = weakref.WeakKeyDictionary()


def shapes_only_warmup(model: nn.Module, optimizer: torch.optim.Optimizer,
                       reached: frozenset[int] | None = None) -> None:
    """Leave a meta model and optimizer as warm-up steps would, without running them.

    On meta a step computes shapes and nothing else, so all a warm-up leaves behind is a gradient
    (``empty_like``) for each parameter the backward reached -- ``reached``, recorded from the
    model's first real warm-up (which parameters the loss reaches does not depend on B or S) --
    and the optimizer state its step creates. This saves a forward and a backward per estimate
    after the first one of a model (the runner reuses meta models across batch sizes and
    sequence lengths); the cpu-vs-meta tests hold the figures to a real warm-up's. ``reached``
    None: every trainable parameter (a DDP/FSDP rank's fake model, ``profiler.parallel``).
    """
    optimizer.zero_grad(set_to_none=True)
    for parameter in model.parameters():
        if (reached is None or id(parameter) in reached) and parameter.requires_grad:
            parameter.grad = torch.empty_like(parameter)
    optimizer.step()


# -- backends -------------------------------------------------------------------------------------
class CudaAllocatorPeak:
    """Peak of the CUDA caching allocator over the block.

    On enter: synchronize and ``reset_peak_memory_stats``. On exit: synchronize, then
    ``peak_bytes = max_memory_allocated``, ``reserved_bytes = max_memory_reserved`` and
    ``nvml_used_bytes``, the device's used memory as NVML reports it (whole device, every process;
    None without nvidia-ml-py or NVML).

    Limitations: the allocator counts blocks (rounded to 512 bytes, sometimes larger when a
    segment is not split); NVML adds the CUDA context and other processes, so it is never a gate.
    """

    def __init__(self, device: torch.device | str) -> None:
        self.device = torch.device(device)
        self.peak_bytes: int | None = None
        self.reserved_bytes: int | None = None
        self.nvml_used_bytes: int | None = None

    def __enter__(self) -> CudaAllocatorPeak:
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        return self

    def __exit__(self, *exc) -> None:
        torch.cuda.synchronize(self.device)
        self.peak_bytes = torch.cuda.max_memory_allocated(self.device)
        self.reserved_bytes = torch.cuda.max_memory_reserved(self.device)
        self.nvml_used_bytes = nvml_used_bytes(self.device)


def nvml_used_bytes(device: torch.device) -> int | None:
    """Used memory of the GPU behind ``device`` according to NVML, or None when unavailable."""
    try:
        import pynvml
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        return None
    try:
        uuid = str(torch.cuda.get_device_properties(device).uuid)
        try:
            handle = pynvml.nvmlDeviceGetHandleByUUID(uuid if uuid.startswith("GPU-") else f"GPU-{uuid}")
        except pynvml.NVMLError:  # MIG or an unexpected UUID format: fall back on the index
            handle = pynvml.nvmlDeviceGetHandleByIndex(device.index or 0)
        return int(pynvml.nvmlDeviceGetMemoryInfo(handle).used)
    except pynvml.NVMLError:
        return None
    finally:
        pynvml.nvmlShutdown()


class CudaKernelBehaviour:
    """Makes a step on cpu or meta save and allocate what the same step does on cuda.

    - ``torch.nn.functional.dropout`` is routed to ``torch.native_dropout`` where cuda's
      ``at::dropout`` takes its fused kernel (training, not in place, 0 < p < 1, non-empty input):
      the mask is saved as bool instead of the composite path's fp32.
    - Optimizer param groups with ``foreach=None`` get ``foreach=True``, cuda's default, whose
      multi-tensor steps allocate whole lists of temporaries at once.

    Both are undone on exit. Limitations: other device-specific kernels (fused attention backends,
    cuBLAS workspaces) are not modelled.
    """

    def __init__(self, optimizer: torch.optim.Optimizer | None = None) -> None:
        self.optimizer = optimizer
        self._dropout = None
        self._foreach_groups: list[dict] = []

    def __enter__(self) -> CudaKernelBehaviour:
        original = F.dropout
        self._dropout = original

        def dropout(input, p=0.5, training=True, inplace=False):
            if training and not inplace and 0.0 < p < 1.0 and input.numel() > 0:
                return torch.native_dropout(input, p, True)[0]
            return original(input, p, training, inplace)

        F.dropout = dropout
        if self.optimizer is not None:
            for group in self.optimizer.param_groups:
                if "foreach" in group and group["foreach"] is None:
                    group["foreach"] = True
                    self._foreach_groups.append(group)
        return self

    def __exit__(self, *exc) -> None:
        F.dropout = self._dropout
        for group in self._foreach_groups:
            group["foreach"] = None
        self._foreach_groups = []


# -- the measurement ------------------------------------------------------------------------------
def measure_training_step(
    model: nn.Module,
    batch: dict,
    optimizer: torch.optim.Optimizer,
    *,
    device: str,
    family: Family | None,
    warmup_steps: int = 1,
    timed_steps: int = 3,
    models_device: str = "cuda",
) -> Measurement:
    """Measure one training step of ``model`` on ``batch`` (tensors already on ``device``).

    ``device`` is where the model lives: ``cuda`` (allocator peak), ``cpu`` (exact tracking) or
    ``meta`` (the same tracking, an estimate: no data, no times). ``models_device`` is whose
    kernels the figures model: with ``cuda`` on cpu/meta, dropout saves bool masks, the optimizer
    runs foreach, and tracked bytes are rounded to cuda's 512-byte blocks.

    The tracked step's kernels are counted (``cost``) for a roofline step time.
    Peak and categories are taken over one full step after ``warmup_steps`` untracked steps (on
    meta, a model's later estimates replace them by ``shapes_only_warmup``: same figures, one
    step less); ``activations`` are the deduplicated bytes saved in its forward (raw, not
    rounded). The ``activations`` category is the part of them still alive at the peak instant,
    which is small when the peak falls in the optimizer step.
    """
    try:
        device_type = torch.device(device).type
    except (RuntimeError, TypeError):
        device_type = None
    if device_type not in DEVICE_TYPES:
        raise ValueError(f"device must be one of {', '.join(DEVICE_TYPES)}, got {device!r}")
    if models_device not in ("cuda", "cpu"):
        raise ValueError(f"models_device must be 'cuda' or 'cpu', got {models_device!r}")
    if warmup_steps < 0 or timed_steps < 0:
        raise ValueError(f"warmup_steps and timed_steps must be >= 0, got {warmup_steps} and {timed_steps}")
    if device_type == "cuda":
        models_device = "cuda"

    with ExitStack() as stack:
        if models_device == "cuda" and device_type != "cuda":
            stack.enter_context(CudaKernelBehaviour(optimizer))
        reached = _REACHED_PARAMETERS.get(model) if device_type == "meta" else None
        if reached is not None and warmup_steps > 0:
            shapes_only_warmup(model, optimizer, reached)
        else:
            for _ in range(warmup_steps):
                training_step(model, batch, optimizer)
            if device_type == "meta" and warmup_steps > 0:
                _REACHED_PARAMETERS[model] = frozenset(id(p) for p in model.parameters() if p.grad is not None)

        tracked_types = {device_type} if models_device != "cpu" else {device_type, "cpu"}
        tracker = StorageTracker(tracked_types, round_to=CUDA_BLOCK_BYTES if models_device == "cuda" else 1)
        tracker.track_existing(step_state(model, batch, optimizer))
        warmup_grads = [p.grad for p in model.parameters() if p.grad is not None]
        labels = _labels(tracker, {"gradients": warmup_grads})
        del warmup_grads
        breakdown = SavedActivationBreakdown(model, family, tracker=tracker)
        allocator = CudaAllocatorPeak(device) if device_type == "cuda" else None
        with allocator or nullcontext(), tracker:
            optimizer.zero_grad(set_to_none=True)
            tracker.mark_phase("forward")
            with breakdown:
                loss = model(**batch).loss
            breakdown.attribute(loss)
            saved_keys = breakdown.saved_record_keys()
            tracker.mark_phase("backward")
            loss.backward()
            del loss
            tracker.mark_phase("optimizer")
            optimizer.step()
        parameter_keys = _labels(tracker, {"parameters": list(model.parameters())})
        labels.update(_labels(tracker, {"gradients": [p.grad for p in model.parameters() if p.grad is not None]}))
        labels.update(_labels(tracker, {"optimizer_state": list(_optimizer_tensors(optimizer))}))
        # Priority when a storage has two roles: parameters > gradients > optimizer state > activations.
        # A storage older than the step (a buffer such as BERT's position_ids, saved as embedding
        # indices) is model state, not an activation of this step.
        for key in saved_keys:
            if tracker.records[key].born != PREEXISTING:
                labels.setdefault(key, "activations")
        labels.update(parameter_keys)
        categories = tracker.peak_categories(labels, MEMORY_CATEGORIES)

        step_times: list[float] = []
        if device_type != "meta":
            for _ in range(timed_steps):
                _synchronize(device_type, device)
                start = time.perf_counter()
                training_step(model, batch, optimizer)
                _synchronize(device_type, device)
                step_times.append(time.perf_counter() - start)

    return Measurement(
        peak_bytes=allocator.peak_bytes if allocator is not None else tracker.peak_bytes,
        categories=categories,
        activations=breakdown.by_operator(),
        reserved_bytes=allocator.reserved_bytes if allocator is not None else None,
        nvml_used_bytes=allocator.nvml_used_bytes if allocator is not None else None,
        step_times_s=step_times,
        cost=tracker.cost,
        estimated=device_type == "meta",
        models_device=models_device,
        peak_phase=tracker.peak_phase,
    )


def step_state(model: nn.Module, inputs, optimizer: torch.optim.Optimizer | None):
    """Every tensor alive before the tracked step that the step uses: parameters, buffers,
    gradients, optimizer state and ``inputs`` (a batch dict or an iterable of tensors)."""
    yield from model.parameters()
    yield from model.buffers()
    yield from (p.grad for p in model.parameters() if p.grad is not None)
    yield from _optimizer_tensors(optimizer)
    yield from (v for v in (inputs.values() if isinstance(inputs, dict) else inputs) if isinstance(v, torch.Tensor))


def _optimizer_tensors(optimizer: torch.optim.Optimizer | None):
    if optimizer is None:
        return
    for state in optimizer.state.values():
        for value in state.values():
            if isinstance(value, torch.Tensor):
                yield value


def _labels(tracker: StorageTracker, tensors_by_label: dict[str, list[torch.Tensor]]) -> dict[int, str]:
    labels = {}
    for label, tensors in tensors_by_label.items():
        for tensor in tensors:
            record = tracker.record_of(tensor) if tensor.device.type in tracker.device_types else None
            if record is not None:
                labels[record.key] = label
    return labels


def _synchronize(device_type: str, device: str) -> None:
    if device_type == "cuda":
        torch.cuda.synchronize(torch.device(device))
