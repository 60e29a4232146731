"""Memory backends: the tracked peak against the CPU allocator's own record, categories and FLOPs
against hand counts, meta against cpu, and no trace left behind."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from profiler.measure import Measurement, measure_training_step, training_step
from profiler.records import MEMORY_CATEGORIES
from tests.factory import tiny_model
from tests.profiler.conftest import estimate_and_measurement
from wtacrs.taxonomy import FAMILIES

T5 = FAMILIES["t5"]
N, IN, HIDDEN, OUT = 32, 16, 64, 8  # MLP: tokens, widths


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(IN, HIDDEN)
        self.act = nn.ReLU()
        self.down = nn.Linear(HIDDEN, OUT)

    def forward(self, x, y):
        out = self.down(self.act(self.up(x)))
        return SimpleNamespace(loss=((out - y) ** 2).mean())


def mlp_cell(device: str = "cpu"):
    torch.manual_seed(0)
    model = MLP().to(device)
    batch = {"x": torch.randn(N, IN).to(device), "y": torch.randn(N, OUT).to(device)}
    return model, batch, torch.optim.AdamW(model.parameters(), lr=1e-3), None


def t5_cell(device: str = "cpu", d_model: int = 32, layers: int = 2, batch_size: int = 2, seq_len: int = 6):
    model = tiny_model("t5", d_model=d_model, n_head=4, d_head=d_model // 4, n_layers=layers, vocab=50, device=device)
    ids = torch.randint(1, 50, (batch_size, seq_len), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids.to(device), "labels": ids.clone().to(device)}
    return model, batch, torch.optim.AdamW(model.parameters(), lr=1e-3), T5


def live_state_bytes(model, batch, optimizer) -> int:
    """Bytes of every distinct storage the step starts with (no gradients)."""
    tensors = [*model.parameters(), *model.buffers(), *batch.values()]
    tensors += [v for s in optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
    return sum({id(t.untyped_storage()): t.untyped_storage().nbytes() for t in tensors}.values())


def allocator_peak_delta(step) -> int:
    """Peak of the CPU allocator above its level at the start, from torch.profiler's memory events."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    level = peak = 0
    for event in sorted(events, key=lambda e: e.start_ns()):
        level += event.nbytes()
        peak = max(peak, level)
    return peak


# The allocator also sees what kernels allocate for themselves and never return as a tensor. In the
# T5 step the peak falls inside AdamW's ``exp_avg_sq.sqrt() / bias_correction2_sqrt``, whose kernel
# wraps and converts the Python float: 16 bytes measured; 64 leaves room for one more scalar pair.
@pytest.mark.parametrize("make_cell, kernel_scalar_bytes", [(mlp_cell, 0), (t5_cell, 64)], ids=["mlp", "t5"])
def test_cpu_peak_equals_allocator_peak_from_profiler(make_cell, kernel_scalar_bytes):
    model, batch, optimizer, family = make_cell()
    training_step(model, batch, optimizer)  # optimizer state exists
    # Start both steps without gradients: the profiler does not report frees of blocks it did not
    # see allocated, so no block older than the profiled step may be freed inside it.
    optimizer.zero_grad(set_to_none=True)
    start = live_state_bytes(model, batch, optimizer)
    m = measure_training_step(
        model, batch, optimizer, device="cpu", family=family, warmup_steps=0, timed_steps=0, models_device="cpu"
    )
    optimizer.zero_grad(set_to_none=True)
    allocator = allocator_peak_delta(lambda: training_step(model, batch, optimizer))
    assert 0 <= allocator - (m.peak_bytes - start) <= kernel_scalar_bytes


def tracked_and_allocator_peaks(model, batch, optimizer, family) -> tuple[int, int, list[dict]]:
    """(tracked peak, profiler's allocator peak) above the state the step starts from, and the breakdown."""
    training_step(model, batch, optimizer)
    optimizer.zero_grad(set_to_none=True)
    start = live_state_bytes(model, batch, optimizer)
    m = measure_training_step(
        model, batch, optimizer, device="cpu", family=family, warmup_steps=0, timed_steps=0, models_device="cpu"
    )
    optimizer.zero_grad(set_to_none=True)
    return m.peak_bytes - start, allocator_peak_delta(lambda: training_step(model, batch, optimizer)), m.activations


@pytest.mark.parametrize("reentrant", [False, True], ids=["non-reentrant", "reentrant"])
def test_checkpointed_peak_equals_allocator_peak_and_is_below_the_plain_one(reentrant):
    # Checkpoint's recomputation must be seen once (in backward), its frees noticed, and the
    # breakdown must not unpack checkpointed tensors (that re-runs the region each time) -- and
    # the cpu RNG state checkpoint keeps per region (made below dispatch) must be counted.
    cell = {"batch_size": 8, "seq_len": 32}
    plain, plain_allocator, plain_saved = tracked_and_allocator_peaks(*t5_cell(**cell))
    model, batch, optimizer, family = t5_cell(**cell)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    tracked, allocator, saved = tracked_and_allocator_peaks(model, batch, optimizer, family)
    assert 0 <= allocator - tracked <= 64  # kernel scalars, as above
    assert 0 <= plain_allocator - plain <= 64
    assert tracked < 0.5 * plain
    # What checkpoint keeps for backward is each region's input hidden states (the layers' other
    # inputs are shared): B x S x d_model fp32 per layer, encoder and decoder, all listed.
    layer_inputs = 2 * 2 * cell["batch_size"] * cell["seq_len"] * 32 * 4
    other = sum(a["bytes"] for a in saved if a["operator"] == "Other")
    assert other - sum(a["bytes"] for a in plain_saved if a["operator"] == "Other") >= layer_inputs
    assert sum(a["bytes"] for a in saved) < 0.2 * sum(a["bytes"] for a in plain_saved)


def test_mlp_categories_activations_and_flops_match_hand_count():
    model, batch, optimizer, _ = mlp_cell()
    m = measure_training_step(model, batch, optimizer, device="cpu", family=None, timed_steps=2, models_device="cpu")
    params = (IN * HIDDEN + HIDDEN + HIDDEN * OUT + OUT) * 4
    assert m.categories["parameters"] == params
    # AdamW: exp_avg and exp_avg_sq per parameter, plus a fp32 step counter per tensor (on cpu).
    assert m.categories["optimizer_state"] == 2 * params + 4 * 4
    assert set(m.categories) == set(MEMORY_CATEGORIES)
    assert sum(m.categories.values()) == m.peak_bytes
    # Saved: x by up's addmm, ReLU's output (also down's input), (out - y) by pow.
    assert m.activations == [
        {"operator": "Activation", "category": "uncompressed", "bytes": N * HIDDEN * 4},
        {"operator": "Other", "category": "uncompressed", "bytes": N * IN * 4 + N * OUT * 4},
    ]
    # Forward 2nk per layer; backward 2nk for each weight gradient and for down's input gradient
    # (x needs no gradient).
    assert m.flops == 2 * N * IN * HIDDEN * 2 + 2 * N * HIDDEN * OUT * 3
    assert len(m.step_times_s) == 2 and all(t > 0 for t in m.step_times_s)
    assert not m.estimated and m.models_device == "cpu"


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointing"])
def test_meta_estimate_equals_cpu_measurement(checkpointing):
    cell = {"batch_size": 4, "seq_len": 16}  # big enough for the peak to fall in backward
    cpu_model, cpu_batch, cpu_optimizer, _ = t5_cell("cpu", **cell)
    model, batch, optimizer, _ = t5_cell("meta", **cell)
    if checkpointing:
        for m in (cpu_model, model):
            m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    cpu = measure_training_step(cpu_model, cpu_batch, cpu_optimizer, device="cpu", family=T5, timed_steps=0,
                                models_device="cpu")
    # the first estimate of a meta model runs a real warm-up step; later ones only make what it
    # leaves behind (gradients, optimizer state): both must equal the cpu measurement
    estimates = []
    for _ in range(2):
        model.zero_grad(set_to_none=True)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        estimates.append(measure_training_step(model, batch, optimizer, device="meta", family=T5, models_device="cpu"))
    for meta in estimates:
        assert meta.estimated and meta.step_times_s == []
        assert (meta.peak_bytes, meta.categories, meta.activations, meta.flops) == (
            cpu.peak_bytes,
            cpu.categories,
            cpu.activations,
            cpu.flops,
        )
    assert cpu.categories["activations"] > 0 and cpu.categories["optimizer_state"] > 0


def decoder_suite(preset: str, method: str, pad: float):
    from profiler.suite import parse_suite

    return parse_suite({
        "model": preset, "grid": {"batch_size": [2], "seq_len": [24]}, "methods": [method], "device": "meta",
        "models_device": "cpu", "training": {"warmup_steps": 1, "timed_steps": 1, "pad_fraction": pad},
    })


# Eager attention, the synthetic batch with its attention mask; "wtacrs" attention asks transformers
# for SDPA-style masks, which it skips without padding (sliding windows: Gemma 2 / 3 at 16 < 24 tokens).
@pytest.mark.parametrize(
    "preset, method, pad",
    [("gpt2-tiny", "full", 0.25), ("llama-tiny", "full", 0.25), ("llama-tiny", "wtacrs@0.3", 0.0),
     ("llama-tiny", "wtacrs@0.3", 0.25), ("qwen3-tiny", "full", 0.25), ("gemma-tiny", "wtacrs@0.3", 0.25),
     ("gemma2-tiny", "full", 0.25), ("gemma2-tiny", "wtacrs@0.3", 0.0), ("gemma3-tiny", "wtacrs@0.3", 0.25)],
)
def test_meta_estimate_of_a_decoder_equals_cpu_measurement(preset, method, pad):
    meta, cpu = estimate_and_measurement(decoder_suite(preset, method, pad))
    if method == "full":  # wtacrs: the sampling's probability products run on real data only
        assert meta["flops"] == cpu["flops"]


def test_cuda_modelling_saves_bool_dropout_masks_and_rounds_blocks():
    as_cpu = measure_training_step(*t5_cell("meta")[:3], device="meta", family=T5, models_device="cpu")
    as_cuda = measure_training_step(*t5_cell("meta")[:3], device="meta", family=T5, models_device="cuda")

    def dropout_bytes(m: Measurement) -> int:
        return sum(a["bytes"] for a in m.activations if a["operator"] == "Dropout")

    assert dropout_bytes(as_cpu) == 4 * dropout_bytes(as_cuda) > 0
    def others(m: Measurement) -> list[dict]:
        return [a for a in m.activations if a["operator"] != "Dropout"]

    assert others(as_cpu) == others(as_cuda)
    assert all(v % 512 == 0 for v in as_cuda.categories.values())
    assert as_cuda.models_device == "cuda"


def test_backends_leave_no_trace_even_when_the_step_fails():
    dropout, get_rng_state, fork_rng = F.dropout, torch.get_rng_state, torch.random.fork_rng
    hooks = (dict(torch.nn.modules.module._global_forward_pre_hooks), dict(torch.nn.modules.module._global_forward_hooks))
    model, batch, optimizer, _ = t5_cell("meta")
    measure_training_step(model, batch, optimizer, device="meta", family=T5, models_device="cuda")

    forward = model.forward

    def failing_forward(**kwargs):
        if torch._C._len_torch_dispatch_stack() > 0:  # the tracked step, under the tracker
            raise RuntimeError("out of memory (simulated)")
        return forward(**kwargs)

    model.forward = failing_forward
    with pytest.raises(RuntimeError, match="simulated"):
        measure_training_step(model, batch, optimizer, device="meta", family=T5, models_device="cuda")

    assert F.dropout is dropout
    assert torch.get_rng_state is get_rng_state and torch.random.fork_rng is fork_rng
    assert all(group["foreach"] is None for group in optimizer.param_groups)
    assert torch._C._len_torch_dispatch_stack() == 0
    assert torch._C._autograd._top_saved_tensors_default_hooks(False) is None
    assert (dict(torch.nn.modules.module._global_forward_pre_hooks), dict(torch.nn.modules.module._global_forward_hooks)) == hooks


@pytest.mark.parametrize(
    "kwargs, message",
    [({"device": "tpu"}, "device must be one of"), ({"device": "cpu", "models_device": "xla"}, "models_device")],
)
def test_bad_device_is_one_clear_error(kwargs, message):
    model, batch, optimizer, _ = mlp_cell()
    with pytest.raises(ValueError, match=message):
        measure_training_step(model, batch, optimizer, family=None, **kwargs)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointing"])
def test_cuda_peak_is_the_allocator_peak_and_meta_estimate_is_within_5_percent(checkpointing):
    cell = {"d_model": 256, "layers": 4, "batch_size": 16, "seq_len": 128}
    model, batch, optimizer, family = t5_cell("cuda", **cell)
    meta_model, meta_batch, meta_optimizer, _ = t5_cell("meta", **cell)
    if checkpointing:
        for m in (model, meta_model):
            m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    measured = measure_training_step(model, batch, optimizer, device="cuda", family=family, timed_steps=2)
    assert measured.reserved_bytes >= measured.peak_bytes > 0
    assert len(measured.step_times_s) == 2
    estimate = measure_training_step(meta_model, meta_batch, meta_optimizer, device="meta", family=T5,
                                     models_device="cuda")
    assert abs(estimate.peak_bytes - measured.peak_bytes) <= 0.05 * measured.peak_bytes
    assert estimate.activations == measured.activations
