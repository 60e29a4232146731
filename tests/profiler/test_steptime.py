"""The roofline step time: per-op FLOPs and bytes counted by hand, the max() per op, recompute
counted under checkpointing, and the GPU table."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from profiler import gpus, steptime
from profiler.steptime import OpCostCounter, Rates, StepCost


def meta(*shape, dtype=torch.float32):
    return torch.empty(*shape, device="meta", dtype=dtype)


def test_counted_flops_and_bytes_of_known_ops_equal_hand_counts():
    a, b = meta(64, 128), meta(128, 32)
    with OpCostCounter() as counter:
        y = a @ b                                   # 2*64*128*32 FLOPs; reads a, b, writes y
        z = y.relu()                                # reads and writes 64*32 floats
        z.t()                                       # a view: no kernel
        torch.empty(10, 10, device="meta")          # an allocation: no kernel
        a + meta(128)                               # a broadcast row is read once
        F.embedding(torch.zeros(10, dtype=torch.long, device="meta"), meta(1000, 32))  # a gather
        meta(16, 16).copy_(meta(16, 16, dtype=torch.bfloat16))  # copy_ writes its target, reads the source
    expected = {
        (2 * 64 * 128 * 32, 4 * (64 * 128 + 128 * 32 + 64 * 32), "fp32"): 1,
        (0, 4 * 2 * 64 * 32, "fp32"): 1,
        (0, 4 * (64 * 128 + 128 + 64 * 128), "fp32"): 1,
        (0, 8 * 10, "fp32"): 1,                               # torch.zeros: writes 10 int64
        (0, 8 * 10 + 4 * 10 * 32 * 2, "fp32"): 1,            # indices, and as many source rows as written
        (0, 2 * 16 * 16 + 4 * 16 * 16, "fp32"): 1,            # the dtype key is the first input's
    }
    assert dict(counter.cost.kernels) == expected
    assert counter.cost.flops == 2 * 64 * 128 * 32
    assert counter.cost.ops == 6


def test_an_in_place_op_returning_nothing_costs_what_it_reads_and_writes():
    """A foreach optimizer step's ops (``_foreach_add_``: ``-> ()``) write their first list."""
    a, b, c, d = meta(10), meta(20), meta(10), meta(20)
    with OpCostCounter() as counter:
        torch._foreach_add_([a, b], [c, d])  # reads a, b, c, d; writes a, b: one kernel
        torch._foreach_mul_([a, b], 2.0)      # reads and writes a, b
    assert dict(counter.cost.kernels) == {(0, 4 * (60 + 30), "fp32"): 1, (0, 4 * (30 + 30), "fp32"): 1}


def test_roofline_takes_the_slower_of_compute_and_memory_per_op():
    rates = Rates("toy", {"fp32": 1e3, "bf16": 4e3}, bandwidth=100.0, per_op_s=0.5)
    cost = StepCost()
    cost.add(2000, 100, "fp32")   # compute 2 s, memory 1 s
    cost.add(10, 300, "fp32")     # compute 0.01 s, memory 3 s
    cost.add(2000, 100, "bf16")   # compute 0.5 s, memory 1 s
    cost.add(2000, 100, "fp16")   # no fp16 rate: fp32's, 2 s
    assert cost.seconds(rates) == pytest.approx((2 + 0.5) + (3 + 0.5) + (1 + 0.5) + (2 + 0.5))
    a100 = steptime.gpu_rates("a100-80gb")
    assert (a100.matmul["fp32"], a100.matmul["bf16"], a100.bandwidth) == (19.5e12, 312e12, 2039e9)
    assert a100.per_op_s == steptime.KERNEL_LAUNCH_S


class Blocks(nn.Module):
    def __init__(self, width: int, blocks: int, checkpointed: bool):
        super().__init__()
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(width, width), nn.ReLU()) for _ in range(blocks))
        self.checkpointed = checkpointed

    def forward(self, x):
        for block in self.blocks:
            x = checkpoint(block, x, use_reentrant=False) if self.checkpointed else block(x)
        return x.sum()


@pytest.mark.parametrize("device", ["meta", "cpu"])
def test_checkpointing_counts_the_recomputed_forward(device):
    tokens, width, blocks = 32, 16, 3
    flops = {}
    for checkpointed in (False, True):
        torch.manual_seed(0)
        model = Blocks(width, blocks, checkpointed).to(device)
        x = torch.randn(tokens, width, device=device, requires_grad=True)
        with OpCostCounter() as counter:
            model(x).backward()
        flops[checkpointed] = counter.cost.flops
    forward = blocks * 2 * tokens * width * width  # one addmm per block
    assert flops[False] == 3 * forward  # forward, grad of the input, grad of the weight
    assert flops[True] - flops[False] == forward


def test_a_wtacrs_step_counts_its_sampling_ops():
    from profiler.methods import parse
    from profiler.models import MetaMaskChecks, build_model, make_batch
    from profiler.suite import parse_suite

    suite = parse_suite({"model": "t5-tiny", "grid": {"batch_size": [2], "seq_len": [8]},
                         "methods": ["full", "wtacrs@0.3"]})
    costs = {}
    for cell in suite.cells():
        model = parse(cell.method.name).prepare(build_model(cell, "meta"), cell.family).train()
        batch = make_batch(cell, "meta", torch.Generator().manual_seed(0))
        with MetaMaskChecks(cell), OpCostCounter() as counter:
            model(**batch).loss.backward()
        costs[cell.method.name] = counter.cost
    full, sampled = costs["full"], costs["wtacrs@0.3"]
    assert sampled.flops < full.flops  # weight gradients from 30% of the rows
    assert sampled.ops > full.ops  # norms, sorting, drawing, gathering: kernels the exact step has not


@pytest.mark.parametrize("name, key", [
    ("NVIDIA A100-SXM4-80GB", "a100-80gb"), ("NVIDIA A100-PCIE-40GB", "a100-40gb"),
    ("NVIDIA H100 80GB HBM3", "h100-80gb"), ("NVIDIA H200", "h200"), ("NVIDIA L4", "l4-24gb"),
    ("NVIDIA L40S", "l40s-48gb"), ("NVIDIA A10G", "a10g-24gb"), ("Tesla T4", "t4-16gb"),
    ("NVIDIA GeForce RTX 4090", "rtx4090-24gb"), ("Tesla V100-SXM2-32GB", "v100-32gb"),
    ("NVIDIA GeForce GTX 1080", None), ("NVIDIA A100", None),
])
def test_gpu_names_map_to_their_table_entry(name, key):
    assert gpus.detect(name) == key


def test_the_default_target_is_in_the_table():
    assert gpus.DEFAULT_TARGET in gpus.GPUS
    for gpu in gpus.GPUS.values():  # dense peaks: tensor cores at least as fast as FP32, none sparse-doubled
        assert all(rate is None or gpu.fp32 <= rate <= 16 * gpu.fp32 for rate in (gpu.tf32, gpu.bf16, gpu.fp16))


def test_the_tracked_step_carries_its_kernels():
    from profiler.measure import measure_training_step
    from profiler.models import MetaMaskChecks, build_model, make_batch
    from profiler.runner import build_optimizer
    from profiler.suite import parse_suite

    (cell,) = parse_suite({"model": "t5-tiny", "grid": {"batch_size": [2], "seq_len": [8]},
                           "methods": ["full"]}).cells()
    model = build_model(cell, "meta").train()
    batch = make_batch(cell, "meta", torch.Generator().manual_seed(0))
    with MetaMaskChecks(cell):
        measured = measure_training_step(model, batch, build_optimizer(model, "adamw"), device="meta",
                                         family=cell.point.taxonomy)
    assert measured.flops > 0  # the tracker's FLOP count, one op at a time
    parameters = sum(p.numel() * 4 for p in model.parameters())
    assert measured.cost.bytes_moved > 4 * parameters  # AdamW alone reads and writes p, grad, m, v
