"""Step time from the tracked step itself: per-op FLOPs and bytes, and a roofline.

``OpCostCounter`` is a ``TorchDispatchMode`` that sees every aten op of the step (on meta, cpu or
cuda alike) and adds one entry per kernel to a ``StepCost``:

- ``flops``: ``torch.utils.flop_counter``'s registered formula (matmul class: mm, addmm, bmm,
  baddbmm, convolutions, fused attention), 0 for every other op;
- ``bytes``: what the op reads and writes, the tensors of its inputs and outputs, each counted as
  its distinct elements (a broadcast ``expand`` is its source's size) times the item size.
  Gathers (``embedding``, ``index_select``, ``gather``, ``index``) read as many source elements
  as they write; ops that only write their first argument (``copy_``, ``fill_``, ``zero_``,
  random fills) do not read it.
- an in-place op that returns nothing (the ``_foreach_*_`` ops of a foreach optimizer step)
  writes the arguments its schema marks written: they are its outputs;
- views, ``empty*`` and ops that neither return nor write a tensor launch no kernel and cost nothing.

``StepCost.seconds(rates)`` is the roofline: per op ``max(flops / matmul rate of its dtype,
bytes / bandwidth) + per_op_s``, summed over the ops. Checkpointing's recomputed forward and
WTA-CRS's sampling, packing and row rebuilding run in the step, so they are counted like any op.

Rates: ``gpu_rates(key)`` from the datasheet table ``profiler.gpus.GPUS`` with
``KERNEL_LAUNCH_S`` per kernel; ``measure_cpu_rates()`` a short fixed probe of this CPU (the
calibration of the model); ``NOMINAL_CPU``, fixed rates the ``device: auto`` policy plans with,
so that its choice does not depend on the machine's load.

Limitations: kernels are timed alone (no overlap, no fusion, no cache reuse), matmuls at peak
whatever their shape, and a float32 matmul at the FP32 rate (PyTorch's default, no TF32).
"""

from __future__ import annotations

import functools
import math
import time
from collections import Counter
from dataclasses import dataclass, field

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import flop_registry

from profiler.gpus import GPUS

aten = torch.ops.aten

# Per kernel: what a CUDA launch (and PyTorch's eager dispatch around it) costs at least.
KERNEL_LAUNCH_S = 5e-6
DTYPE_KEYS = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}

_NO_KERNEL = frozenset({aten.empty, aten.empty_like, aten.empty_strided, aten.new_empty, aten.new_empty_strided,
                        aten._unsafe_view, aten.lift_fresh, aten.lift_fresh_copy})
_GATHERS = frozenset({aten.embedding, aten.index_select, aten.gather, aten.index})  # first argument: the source
_WRITE_ONLY_FIRST = frozenset({aten.copy_, aten.fill_, aten.zero_, aten.normal_, aten.uniform_, aten.bernoulli_,
                               aten.random_, aten.exponential_})


@dataclass(frozen=True)
class Rates:
    """A device as the roofline sees it: matmul FLOP/s by dtype key (``fp32`` always given),
    bytes/s to and from memory, and seconds per op on top."""

    name: str
    matmul: dict[str, float]
    bandwidth: float
    per_op_s: float

    def matmul_rate(self, dtype_key: str) -> float:
        return self.matmul.get(dtype_key) or self.matmul["fp32"]


def gpu_rates(key: str) -> Rates:
    """The datasheet rates of ``GPUS[key]`` (KeyError for a key not in the table)."""
    gpu = GPUS[key]
    matmul = {k: rate for k in ("fp32", "bf16", "fp16") if (rate := getattr(gpu, k)) is not None}
    return Rates(key, matmul, gpu.bandwidth, KERNEL_LAUNCH_S)


# What ``device: auto`` assumes of a CPU when it plans which cells to run there: planning
# constants, not a measurement (the example's two CPU cells, one thread of a shared machine, took
# 1.8x and 3.5x their planned time). Fixed, so the plan is a function of the suite alone.
NOMINAL_CPU = Rates("nominal cpu", {"fp32": 50e9}, 10e9, 20e-6)


@dataclass
class StepCost:
    """Kernels of one step, as ``(flops, bytes, dtype key) -> how many ran``."""

    kernels: Counter = field(default_factory=Counter)

    def add(self, flops: int, nbytes: int, dtype_key: str) -> None:
        self.kernels[(flops, nbytes, dtype_key)] += 1

    @property
    def flops(self) -> int:
        return sum(f * n for (f, _, _), n in self.kernels.items())

    @property
    def bytes_moved(self) -> int:
        return sum(b * n for (_, b, _), n in self.kernels.items())

    @property
    def ops(self) -> int:
        return sum(self.kernels.values())

    def seconds(self, rates: Rates) -> float:
        """The roofline time of the step on ``rates`` (module docstring)."""
        return sum(n * (max(f / rates.matmul_rate(d), b / rates.bandwidth) + rates.per_op_s)
                   for (f, b, d), n in self.kernels.items())


def tensor_bytes(tensor: torch.Tensor) -> int:
    """Bytes of the distinct elements of ``tensor``: a stride-0 (broadcast) dimension counts once."""
    elements = math.prod(size for size, stride in zip(tensor.shape, tensor.stride()) if stride != 0)
    return elements * tensor.element_size()


@functools.cache
def _is_view(func) -> bool:
    returns = func._schema.returns
    return bool(returns) and all(r.alias_info is not None and not r.alias_info.is_write for r in returns)


@functools.cache
def _written_arguments(func) -> tuple[tuple[int, str], ...]:
    """(position, name) of each argument the op writes (``Tensor(a!)``, ``Tensor(a!)[]``)."""
    return tuple((i, a.name) for i, a in enumerate(func._schema.arguments)
                 if a.alias_info is not None and a.alias_info.is_write)


def _written(func, args, kwargs) -> list[torch.Tensor]:
    """The tensors an op writes in place: the outputs of one that returns nothing (``_foreach_add_``)."""
    values = [args[i] if i < len(args) else kwargs.get(name) for i, name in _written_arguments(func)]
    return [t for t in tree_leaves(values) if isinstance(t, torch.Tensor)]


def op_cost(func, args, kwargs, out) -> tuple[int, int, str] | None:
    """``(flops, bytes, dtype key)`` of one op (module docstring), None when it runs no kernel."""
    packet = func._overloadpacket
    outputs = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)] or _written(func, args, kwargs)
    if not outputs or packet in _NO_KERNEL or _is_view(func):
        return None
    inputs = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
    skip = 1 if (packet in _GATHERS or packet in _WRITE_ONLY_FIRST) and inputs and args and args[0] is inputs[0] else 0
    read = inputs[skip:]
    if packet in _GATHERS and skip:
        read = [*read, *outputs]  # a gather reads one source element per element it writes
    nbytes = sum(map(tensor_bytes, read)) + sum(map(tensor_bytes, outputs))
    formula = flop_registry.get(packet)
    flops = int(formula(*args, **kwargs, out_val=out)) if formula is not None else 0
    dtype = next((t.dtype for t in inputs if t.is_floating_point()), outputs[0].dtype)
    return flops, nbytes, DTYPE_KEYS.get(dtype, "fp32")


class OpCostCounter(TorchDispatchMode):
    """Adds every kernel of the ops run inside the block to ``cost`` (a ``StepCost``).

    Leaves no trace: it installs nothing but itself as a dispatch mode. Ops on any device count.
    """

    def __init__(self) -> None:
        super().__init__()
        self.cost = StepCost()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        cost = op_cost(func, args, kwargs, out)
        if cost is not None:
            self.cost.add(*cost)
        return out


def measure_cpu_rates(seconds: float = 0.2) -> Rates:
    """This CPU's rates, each timed for about ``seconds`` at torch's current thread count:
    fp32 matmuls of 512 x 512, a 32 MiB copy (bytes read + written) and a one-element add
    (the per-op cost)."""
    a, b = torch.randn(512, 512), torch.randn(512, 512)
    matmul = _rate(lambda: torch.mm(a, b), 2 * 512**3, seconds)
    source = torch.randn(8 * 2**20)
    target = torch.empty_like(source)
    bandwidth = _rate(lambda: target.copy_(source), 2 * source.numel() * 4, seconds)
    x, y = torch.ones(1), torch.ones(1)
    per_op = 1 / _rate(lambda: torch.add(x, y), 1, seconds)
    return Rates("cpu", {"fp32": matmul}, bandwidth, per_op)


def _rate(work, amount: float, seconds: float) -> float:
    """``amount`` per second of ``work()``, repeated for about ``seconds`` after one warm-up call."""
    work()
    repeats, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds or repeats == 0:
        work()
        repeats += 1
    return amount * repeats / elapsed
