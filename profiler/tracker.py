"""Dispatch-level tracking of live tensor storages: the engine behind the cpu and meta backends.

``StorageTracker`` is one flat ``TorchDispatchMode``. For every op it looks at the tensors the op
returns; a storage it has not seen before is a new allocation, and a weak reference with a
callback on that storage tells it when the storage is freed. Live bytes are the sum over live
storages, the peak is the largest sum seen. The same pass counts matmul FLOPs with
``torch.utils.flop_counter``'s registered formulas and marks storages filled by random ops
(the masks of composite dropout), so one dispatch hook serves memory, FLOPs and the activation
breakdown.

Work per op is a dict lookup per returned tensor. The live set at the peak is not copied at each
new peak (every forward allocation is one): each storage records the clock ticks at which it was
born and died, and the live set at the peak tick is rebuilt once, after the step.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from profiler.steptime import StepCost, op_cost

aten = torch.ops.aten

CUDA_BLOCK_BYTES = 512  # the CUDA caching allocator rounds every block up to a multiple of 512 bytes

# Ops whose outputs are filled with random bits: a composite dropout's mask is born here.
_RANDOM_OPS = frozenset({aten.bernoulli, aten.bernoulli_})
# Ops that return their input's storage yet create it: ``torch.tensor(...)`` builds the data outside
# dispatch and hands it over through lift_fresh.
_FRESH_ALIAS_OPS = frozenset({aten.lift_fresh.default, aten.lift_fresh_copy.default})

PREEXISTING = 0  # the birth tick of storages alive when tracking starts


class StorageRecord:
    """One tracked storage: its counted bytes and the clock ticks of its birth and death."""

    __slots__ = ("born", "died", "key", "nbytes", "random", "ref")

    def __init__(self, key: int, nbytes: int, born: int, ref: weakref.ref) -> None:
        self.key = key
        self.nbytes = nbytes
        self.born = born
        self.died: int | None = None
        self.random = False
        self.ref = ref

    def alive_at(self, tick: int) -> bool:
        return self.born <= tick and (self.died is None or self.died > tick)


class StorageTracker(TorchDispatchMode):
    """Tracks the live tensor storages of the given device types while it is active.

    Contract:
    - ``track_existing(tensors)`` registers storages alive before the tracked work (parameters,
      gradients, optimizer state, the batch); they count from tick 0 and are labelled "other"
      unless a caller labels them.
    - Every storage an op returns that is not yet tracked is a new allocation of
      ``untyped_storage().nbytes()`` bytes, rounded up to ``round_to``. Storages are told apart by
      identity of the ``untyped_storage()`` object, which torch keeps alive exactly as long as the
      storage itself (so this works on meta, where ``data_ptr()`` is 0).
    - ``peak_bytes`` is the maximum of live bytes; ``peak_records()`` the storages alive then.
    - ``peak_phase`` is the phase (``mark_phase``) current when the peak was reached.
    - ``cost`` counts each kernel's FLOPs and bytes (``profiler.steptime.op_cost``, the roofline's
      input); ``flops`` is its sum of ``torch.utils.flop_counter`` formulas (matmuls, convolutions,
      attention).
    - Leaves no trace: ``__exit__`` pops the mode, and callbacks of storages that die later are
      ignored.

    Limitations:
    - Memory a kernel allocates for itself (workspaces, scalars it converts, allocator
      fragmentation) never surfaces as a tensor and is not counted; on cuda,
      ``max_memory_allocated`` is the reference.
    - A storage is counted with the size it had when first seen; ``resize_``/``set_`` are not
      followed.
    - A view or in-place result on a storage created before tracking and never registered is
      ignored (it was not allocated by the tracked work).
    - Tensors built below dispatch are not seen, except ``torch.get_rng_state()``'s (activation
      checkpointing keeps one per region, and its recomputation one more under
      ``torch.random.fork_rng``), which the tracker registers while active. On meta,
      ``fork_rng(device_type="meta")`` takes no state; the tracker makes it take the cpu state a
      real device's recomputation holds, so a meta estimate modelling cpu counts it too.
    - Python numbers wrapped into 0-dim cpu tensors (``x * 2.0``; autograd may keep one until
      backward) are made below dispatch and not counted: a few bytes each on cpu, nothing on cuda,
      where they stay on the host.
    - Ops must run on the thread that entered the mode or on autograd's engine threads (which
      inherit the mode).
    """

    def __init__(self, device_types: Iterable[str], *, round_to: int = 1) -> None:
        super().__init__()
        self.device_types = frozenset(device_types)
        if not self.device_types:
            raise ValueError("StorageTracker needs at least one device type to track")
        self.round_to = round_to
        self.records: list[StorageRecord] = []
        self._live: dict[int, StorageRecord] = {}  # id(untyped storage) -> record
        self._aliasing: dict[Any, bool] = {}  # op overload -> do its returns alias an input?
        self.clock = PREEXISTING
        self.live_bytes = 0
        self.peak_bytes = 0
        self.peak_tick = PREEXISTING
        self.cost = StepCost()  # the kernels of the ops seen: FLOPs and bytes (``profiler.steptime``)
        self.phase: str | None = None  # set by the caller (``mark_phase``): forward, backward, optimizer
        self.peak_phase: str | None = None  # the phase in which the peak was reached
        self._closed = False  # set on exit: storages dying afterwards no longer change the figures

    # -- the only code that mutates the live set ------------------------------------------------
    def _register(self, storage: torch.UntypedStorage, born: int) -> StorageRecord:
        nbytes = storage.nbytes()
        if self.round_to > 1 and nbytes:
            nbytes = -(-nbytes // self.round_to) * self.round_to
        sid = id(storage)
        record = StorageRecord(len(self.records), nbytes, born, weakref.ref(storage, self._freed_callback(sid)))
        self.records.append(record)
        self._live[sid] = record
        self.live_bytes += nbytes
        if self.live_bytes > self.peak_bytes:
            self.peak_bytes = self.live_bytes
            self.peak_tick = born
            self.peak_phase = self.phase
        return record

    def _freed_callback(self, sid: int):
        def freed(_ref: weakref.ref) -> None:
            record = self._live.pop(sid, None)
            if record is None or self._closed:
                return
            self.clock += 1
            record.died = self.clock
            self.live_bytes -= record.nbytes

        return freed

    # -- public reads and registration ----------------------------------------------------------
    def mark_phase(self, phase: str) -> None:
        """Name the phase of the work that follows (``forward``, ``backward``, ``optimizer``):
        ``peak_phase`` is the phase in which the peak was reached."""
        self.phase = phase

    def track_existing(self, tensors: Iterable[torch.Tensor]) -> None:
        """Register storages that are alive before the tracked work starts (tick 0)."""
        if self.clock != PREEXISTING:
            raise RuntimeError("track_existing must be called before any op is tracked")
        for tensor in tensors:
            if tensor is None or tensor.device.type not in self.device_types:
                continue
            storage = tensor.untyped_storage()
            if id(storage) not in self._live:
                self._register(storage, PREEXISTING)

    def record_of(self, tensor_or_storage: torch.Tensor | torch.UntypedStorage) -> StorageRecord | None:
        """The record of a live tracked storage, or None."""
        storage = tensor_or_storage
        if isinstance(storage, torch.Tensor):
            storage = storage.untyped_storage()
        return self._live.get(id(storage))

    def peak_records(self) -> list[StorageRecord]:
        """The storages alive at the peak tick."""
        return [r for r in self.records if r.alive_at(self.peak_tick)]

    def peak_categories(self, labels: Mapping[int, str], categories: Iterable[str]) -> dict[str, int]:
        """Bytes alive at the peak per category.

        ``labels`` maps record keys to a category; unlabelled storages are "other" when they
        existed before tracking and "temporaries" when the tracked work created them.
        """
        totals = dict.fromkeys(categories, 0)
        for record in self.peak_records():
            label = labels.get(record.key) or ("other" if record.born == PREEXISTING else "temporaries")
            totals[label] += record.nbytes
        return totals

    # -- the dispatch hook --------------------------------------------------------------------
    def __enter__(self):
        # ``torch.get_rng_state()`` builds its ByteTensor below dispatch. Activation checkpointing
        # keeps one per checkpointed region from forward to backward (5 KiB each on cpu), so the
        # tracker registers what it returns while active.
        original = self._original_get_rng_state = torch.get_rng_state

        def get_rng_state() -> torch.Tensor:
            state = original()
            if not self._closed:
                self._see_fresh(state)
            return state

        torch.get_rng_state = get_rng_state
        self._original_fork_rng = torch.random.fork_rng
        torch.random.fork_rng = self._fork_rng
        return super().__enter__()

    def __exit__(self, *exc):
        self._closed = True
        torch.get_rng_state = self._original_get_rng_state
        torch.random.fork_rng = self._original_fork_rng
        return super().__exit__(*exc)

    @property
    def flops(self) -> int:
        """Matmul-class FLOPs of the ops seen (``torch.utils.flop_counter``'s formulas)."""
        return self.cost.flops

    @contextlib.contextmanager
    def _fork_rng(self, devices=None, enabled=True, *args, device_type=None, **kwargs):
        """``torch.random.fork_rng``; on meta it also holds the cpu rng state, as off meta."""
        held = torch.get_rng_state() if enabled and device_type == "meta" else None
        with self._original_fork_rng(devices, enabled, *args, device_type=device_type, **kwargs):
            yield
        del held

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        packet = func._overloadpacket
        cost = op_cost(func, args, kwargs, out)
        if cost is not None:
            self.cost.add(*cost)
        if isinstance(out, torch.Tensor):
            self._see(out, func)
        else:
            for leaf in tree_leaves(out):
                if isinstance(leaf, torch.Tensor):
                    self._see(leaf, func)
        if packet in _RANDOM_OPS:
            for leaf in tree_leaves(out):
                record = self.record_of(leaf) if isinstance(leaf, torch.Tensor) else None
                if record is not None:
                    record.random = True
        return out

    def _see(self, tensor: torch.Tensor, func) -> None:
        if tensor.device.type not in self.device_types:
            return
        storage = tensor.untyped_storage()
        if id(storage) in self._live:
            return
        aliasing = self._aliasing.get(func)
        if aliasing is None:
            aliasing = func not in _FRESH_ALIAS_OPS and any(r.alias_info is not None for r in func._schema.returns)
            self._aliasing[func] = aliasing
        if aliasing:  # a view of, or a write into, a storage older than the tracking
            return
        self.clock += 1
        self._register(storage, self.clock)

    def _see_fresh(self, tensor: torch.Tensor) -> None:
        """Register a tensor made outside dispatch during the tracked work."""
        if tensor.device.type in self.device_types and id(tensor.untyped_storage()) not in self._live:
            self.clock += 1
            self._register(tensor.untyped_storage(), self.clock)
