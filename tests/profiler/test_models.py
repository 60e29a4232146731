"""The model factory's synthetic batches: on meta they are shapes only, and nothing is allocated."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from profiler.models import make_batch
from profiler.suite import parse_suite


class CpuBytes(TorchDispatchMode):
    """Counts the bytes of every CPU tensor an aten op returns inside the block."""

    def __init__(self) -> None:
        super().__init__()
        self.bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for leaf in tree_leaves(out):
            if isinstance(leaf, torch.Tensor) and leaf.device.type == "cpu":
                self.bytes += leaf.untyped_storage().nbytes()
        return out


@pytest.mark.parametrize("preset", ["t5-tiny", "bert-tiny", "gpt2-tiny", "llama-tiny"])
def test_a_meta_batch_allocates_nothing_and_has_the_cpu_batchs_shapes(preset):
    grid = {"batch_size": [64], "seq_len": [128]} | ({"target_len": [16]} if preset.startswith("t5") else {})
    (cell,) = parse_suite({"model": preset, "grid": grid, "methods": ["full"],
                           "training": {"pad_fraction": 0.25}}).cells()
    with CpuBytes() as counter:
        meta = make_batch(cell, "meta")
    assert counter.bytes == 0  # B=200000, S=512 used to draw 4.5 GB on the CPU first
    cpu = make_batch(cell, "cpu")
    assert set(meta) == set(cpu)  # the mask too: MetaMaskChecks answers transformers' value checks
    for name, tensor in meta.items():
        assert tensor.device.type == "meta"
        assert (tensor.shape, tensor.dtype) == (cpu[name].shape, cpu[name].dtype), name
