"""Per-GPU memory of one training step under DDP or FSDP2, estimated or measured per rank.

The same step and the same accounting serve both paths, so an estimate and a measurement of a
cell differ only in what runs beneath them:

- **estimated** (``estimate_rank``): one rank traced in this process. FSDP runs under PyTorch's
  fake process group (``init_process_group("fake", world_size=N)``: collectives return at once,
  no data moves) with the model built inside ``FakeTensorMode`` (FSDP2 rejects meta parameters).
  The rank holds 1/N of every parameter, gradient and optimizer state, and allocates FSDP's
  all-gather and reduce-scatter buffers where FSDP does (byte for byte what two gloo ranks
  measure under torchrun for a one-block t5-tiny, ``tests/profiler/test_parallel.py``; one CI
  run in three measured two more sharded-gradient-sized buffers at the peak, cause not traced).
  DDP's C++ reducer cannot run on fake tensors, so a DDP rank is the single-device step plus
  DDP's gradient buckets: one flat copy of every trainable gradient, alive for the whole step
  (``ddp_bucket_bytes``; DDP's default ``gradient_as_bucket_view=False``).
- **measured** (``profiler.distributed_run.measure_rank``): the same step on a real process group (``torchrun``: gloo on
  the CPU, nccl on cuda), each rank on its own device. DDP's buckets, allocated in C++, are met
  by the tracker when the reducer's all-reduce returns them in backward, and filed as
  "Activation": a measured DDP rank's categories count its buckets as activations (the peak is
  the same).

Accounting is torch's own: ``FSDPMemTracker`` for FSDP (categories sharded/unsharded param,
sharded/unsharded grad, all-gather, reduce-scatter, activations, temporaries, optimizer state,
inputs) and ``MemTracker`` otherwise, after ``warmup_steps`` untracked steps. The peak is the
largest sum of live tensor storages over one step on the rank. Modelling cuda on the CPU
(``models_device="cuda"``), the step saves and allocates what cuda kernels do
(``profiler.measure.CudaKernelBehaviour``: bool dropout masks, foreach optimizer steps) and every
storage is rounded up to the caching allocator's 512-byte blocks (``CudaBlockRounding``), as the
single-device meta estimates do. Not modelled: NCCL's own buffers and cuda streams' allocator
fragmentation (``max_memory_reserved``), both outside tensor storages.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn

from profiler.measure import CudaKernelBehaviour, shapes_only_warmup, training_step
from profiler.records import MEMORY_CATEGORIES
from profiler.tracker import CUDA_BLOCK_BYTES

STRATEGIES = ("none", "ddp", "fsdp")

# torch's tracker categories (``_RefType`` values of MemTracker and FSDPMemTracker) -> record categories
_CATEGORY_OF = {
    "Parameter": "parameters", "Sharded Param": "parameters", "Unsharded Param": "parameters",
    "Buffer": "other", "Gradient": "gradients", "Sharded Grad": "gradients", "Unsharded Grad": "gradients",
    "Activation": "activations", "Temp": "temporaries", "All Gather": "temporaries",
    "Reduce Scatter": "temporaries", "Optstate": "optimizer_state", "OptState": "optimizer_state",
    "Inputs": "other", "Other": "other", "DDP Buckets": "gradients",
}


@dataclass(frozen=True)
class ParallelSettings:
    """How a cell is split over ranks. ``world_size`` ranks, each with the suite's per-GPU batch."""

    strategy: str = "none"  # none | ddp | fsdp
    world_size: int = 1
    reshard_after_forward: bool = True  # FSDP: free the unsharded parameters after forward
    bucket_cap_mb: float = 25.0  # DDP


@dataclass
class RankFigures:
    """One rank's step: ``peak_bytes``, ``categories`` (record categories at the peak) and
    ``breakdown`` (torch's tracker categories at the peak, e.g. "All Gather"), bytes as ints."""

    rank: int
    peak_bytes: int
    categories: dict[str, int]
    breakdown: dict[str, int] = field(default_factory=dict)
    estimated: bool = False

    def to_json(self) -> dict:
        return {"rank": self.rank, "peak_bytes": self.peak_bytes, "breakdown": dict(self.breakdown)}


# -- sharding -------------------------------------------------------------------------------------
def block_classes(model: nn.Module) -> set[str]:
    """Class names of the model's transformer blocks: Hugging Face's ``_no_split_modules`` of
    every pretrained model inside ``model`` (a peft wrapper holds one), e.g. ``{"T5Block"}``."""
    names: set[str] = set()
    for module in model.modules():
        names.update(getattr(module, "_no_split_modules", None) or ())
    return names


def shard_fsdp(model: nn.Module, settings: ParallelSettings, mesh) -> nn.Module:
    """``fully_shard`` each transformer block, then the model (its embeddings, norms and head).
    In place; returns the model."""
    from torch.distributed.fsdp import fully_shard

    blocks = block_classes(model)
    if not blocks:
        raise ValueError(f"{type(model).__name__} names no transformer blocks (_no_split_modules) to shard")
    for module in list(model.modules()):
        if type(module).__name__ in blocks:
            fully_shard(module, mesh=mesh, reshard_after_forward=settings.reshard_after_forward)
    fully_shard(model, mesh=mesh, reshard_after_forward=settings.reshard_after_forward)
    return model


def ddp_bucket_bytes(model: nn.Module, settings: ParallelSettings, models_device: str) -> int:
    """Bytes of DDP's gradient buckets: the trainable parameters, grouped in reverse order as
    ``DistributedDataParallel`` groups them when given ``bucket_cap_mb`` (as
    ``profiler.distributed_run.measure_rank`` gives it: every bucket, the first too, of at most ``bucket_cap_mb``), each bucket one flat
    tensor (rounded to 512-byte blocks when modelling cuda)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        return 0
    shapes = [torch.empty(p.shape, dtype=p.dtype, device="meta") for p in reversed(params)]
    limits = [int(settings.bucket_cap_mb * 1024 * 1024)]
    groups, _ = dist._compute_bucket_assignment_by_size(shapes, limits)
    sizes = [sum(shapes[i].numel() * shapes[i].element_size() for i in group) for group in groups]
    return sum(_rounded(size, models_device) for size in sizes)


def _rounded(nbytes: int, models_device: str) -> int:
    return math.ceil(nbytes / CUDA_BLOCK_BYTES) * CUDA_BLOCK_BYTES if models_device == "cuda" else nbytes


# -- accounting -----------------------------------------------------------------------------------
class CudaBlockRounding:
    """Inside the block, torch's MemTracker rounds every storage up to 512 bytes, as it does for
    cuda storages, whatever the device (an estimate of cuda on cpu tensors). Undone on exit."""

    def __enter__(self) -> CudaBlockRounding:
        from torch.distributed._tools import mem_tracker

        self._info = mem_tracker._WeakRefInfo
        self._original = self._info._calculate_mem_consumed

        def rounded(info) -> int:
            return _rounded(info.size * info.element_size, "cuda")

        self._info._calculate_mem_consumed = rounded
        return self

    def __exit__(self, *exc) -> None:
        self._info._calculate_mem_consumed = self._original


def _frozen_aware(tracker_class: type) -> type:
    """``tracker_class`` (torch's MemTracker or FSDPMemTracker) hooking the gradients of trainable
    parameters only. torch 2.13's ``_track_module_params_and_buffers`` calls ``register_hook`` on
    every parameter of a module in its first forward, which raises on a frozen one (LoRA's base
    weights): "cannot register a hook on a tensor that doesn't require gradient". Every parameter
    is still counted; a frozen one never gets a gradient to count."""
    from torch.distributed._tools.mem_tracker import _MemRefType

    class FrozenAware(tracker_class):
        def _track_module_params_and_buffers(self, module: nn.Module, install_grad_hooks: bool = True):
            counted = super()._track_module_params_and_buffers(module, install_grad_hooks=False)

            def hook(grad: torch.Tensor) -> None:
                self._update_and_maybe_create_winfos(grad, _MemRefType.GRAD)

            for param in module.parameters() if install_grad_hooks else ():
                if param.requires_grad and self._param_to_grad_hook_handles.get(param) is None:
                    self._param_to_grad_hook_handles[param] = (
                        param.register_hook(hook), param.register_post_accumulate_grad_hook(lambda p: hook(p.grad)))
            return counted

    FrozenAware.__name__ = f"FrozenAware{tracker_class.__name__}"
    return FrozenAware


def tracked_step(model: nn.Module, batch: dict, optimizer: torch.optim.Optimizer, *, strategy: str,
                 models_device: str, warmup_steps: int = 1, extra: dict[str, int] | None = None,
                 rank: int = 0, estimated: bool = False) -> RankFigures:
    """Run ``warmup_steps`` steps, then one step under torch's tracker; the rank's figures.

    An estimate (``estimated``, fake tensors) replaces the warm-up steps by their outcome:
    ``_shapes_only_warmup``. ``extra`` adds storages the tracker cannot see (DDP's buckets, allocated in C++), by
    category name, alive for the whole step. ``models_device="cuda"`` on cpu tensors models cuda
    (module docstring).
    """
    from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker
    from torch.distributed._tools.mem_tracker import MemTracker

    on_cuda = any(p.device.type == "cuda" for p in model.parameters())
    with contextlib.ExitStack() as stack:
        if models_device == "cuda" and not on_cuda:
            stack.enter_context(CudaKernelBehaviour(optimizer))
            stack.enter_context(CudaBlockRounding())
        if estimated:
            stack.enter_context(_memoised_strided_shard_flag())
            if warmup_steps:
                # the step runs as configured (foreach when modelling cuda): its first foreach call
                # on DTensors allocates outputs to infer shardings, cached from then on, and a
                # tracked step after a per-tensor warm-up would count them as optimizer state
                shapes_only_warmup(model, optimizer)
        else:
            for _ in range(warmup_steps):
                training_step(model, batch, optimizer)
        if strategy == "fsdp":
            tracker = _frozen_aware(FSDPMemTracker)(model, optimizer)
            tracker.track_inputs(tuple(batch.values()))
        else:
            tracker = _frozen_aware(MemTracker)()
            tracker.track_external(model, optimizer, *batch.values())
        with tracker:
            training_step(model, batch, optimizer)
        peak = tracker.get_tracker_snapshot("peak")
    device = next(iter(peak)) if len(peak) == 1 else next(d for d in peak if d.type != "cpu")
    breakdown = {getattr(k, "value", str(k)): int(v) for k, v in peak[device].items() if k != "Total" and v}
    breakdown.update({k: v for k, v in (extra or {}).items() if v})
    categories = dict.fromkeys(MEMORY_CATEGORIES, 0)
    for name, nbytes in breakdown.items():
        categories[_CATEGORY_OF.get(name, "other")] += nbytes
    return RankFigures(rank=rank, peak_bytes=sum(breakdown.values()), categories=categories,
                       breakdown=breakdown, estimated=estimated)


@contextlib.contextmanager
def _memoised_strided_shard_flag() -> Iterator:
    """Inside the block, DTensor's ``_propagate_use_strided_shard_flag`` scans the op's argument
    specs once per op instead of once per tensor of a foreach list (quadratic in the list: a
    T5-3B AdamW step spent most of its time there). Same result: the scan depends on the op's
    schema alone, and finds nothing to fix where no input is ``_StridedShard`` (FSDP2's dim-0
    shards). Undone on exit; a no-op where torch has no such function."""
    import weakref

    from torch.distributed.tensor import _sharding_prop as prop

    original = getattr(prop, "_propagate_use_strided_shard_flag", None)
    if original is None:
        yield
        return
    strided = prop._StridedShard
    last: list = [None, False]  # weak reference to the last schema, whether it has strided specs

    def propagate(op_strategy, op_schema) -> None:
        if last[0] is None or last[0]() is not op_schema:
            has = any(isinstance(p, strided) for spec in op_schema.args_spec for p in spec.placements)
            last[:] = [weakref.ref(op_schema), has]
        if last[1]:
            original(op_strategy, op_schema)

    prop._propagate_use_strided_shard_flag = propagate
    try:
        yield
    finally:
        prop._propagate_use_strided_shard_flag = original


# -- the estimate ---------------------------------------------------------------------------------
@contextlib.contextmanager
def fake_process_group(world_size: int) -> Iterator:
    """A fake process group of ``world_size`` ranks (this process is rank 0) and its 1-D cpu
    mesh, destroyed on exit. Refuses to run where a process group exists already."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        raise RuntimeError("a process group is initialised already: a rank estimate needs its own fake one")
    dist.init_process_group("fake", rank=0, world_size=world_size, store=FakeStore())
    try:
        yield init_device_mesh("cpu", (world_size,))  # outside FakeTensorMode, as FSDP needs
    finally:
        dist.destroy_process_group()


def estimate_rank(build, batch: dict, make_optimizer, settings: ParallelSettings, *,
                  models_device: str = "cuda", warmup_steps: int = 1) -> RankFigures:
    """The figures of one rank of ``settings`` for a model ``build()`` returns (a prepared,
    train-mode model on the cpu; it is called inside ``FakeTensorMode``), stepped on ``batch``
    (real cpu tensors, the per-rank batch) by ``make_optimizer(model)``. ``estimated`` is True."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    group = fake_process_group(settings.world_size) if settings.strategy == "fsdp" else contextlib.nullcontext()
    with group as mesh, FakeTensorMode(allow_non_fake_inputs=True):
        with _adapters_stay_put():
            model = build()
        extra = {}
        if settings.strategy == "fsdp":
            shard_fsdp(model, settings, mesh)
        elif settings.strategy == "ddp":
            extra["DDP Buckets"] = ddp_bucket_bytes(model, settings, models_device)
        optimizer = make_optimizer(model)
        return tracked_step(model, batch, optimizer, strategy=settings.strategy, models_device=models_device,
                            warmup_steps=warmup_steps, extra=extra, estimated=True)



@contextlib.contextmanager
def _adapters_stay_put():
    """Inside the block, ``Module.to`` a cpu module's own device and dtype returns it unchanged.
    peft moves each new LoRA layer to its base layer's device and dtype with ``Module.to``,
    which cannot swap fake parameters; under one FakeTensorMode they are there already."""
    original = nn.Module.to

    def to(module, *args, **kwargs):
        device, dtype, _, _ = torch._C._nn._parse_to(*args, **kwargs)
        same_dtype = dtype is None or all(t.dtype == dtype for t in module.parameters() if t.is_floating_point())
        if (device is None or device.type == "cpu") and same_dtype:
            return module
        return original(module, *args, **kwargs)

    nn.Module.to = to
    try:
        yield
    finally:
        nn.Module.to = original
