"""``profile_step``, the public context manager: the figures of the runner's measurement around
a user's own step, and no trace left behind."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import _get_current_dispatch_mode

import profiler
from profiler.measure import measure_training_step, training_step

from .test_measure import T5, t5_cell


def _tracked_step(model, batch, optimizer):
    optimizer.zero_grad(set_to_none=True)
    loss = model(**batch).loss
    loss.backward()
    del loss  # as measure_training_step does: 4 bytes alive in the optimizer step otherwise
    optimizer.step()


@pytest.mark.parametrize("device, models_device", [("cpu", "cpu"), ("meta", "cuda"), ("meta", "cpu")])
def test_profile_step_gives_the_figures_of_measure_training_step(device, models_device):
    model, batch, optimizer, _ = t5_cell(device)
    expected = measure_training_step(model, batch, optimizer, device=device, family=T5, warmup_steps=1,
                                     timed_steps=0, models_device=models_device)
    model, batch, optimizer, _ = t5_cell(device)
    training_step(model, batch, optimizer)  # the warm-up: gradients and optimizer state exist
    with profiler.profile_step(model, optimizer, inputs=batch, models_device=models_device) as prof:
        _tracked_step(model, batch, optimizer)
    assert prof.peak_bytes == expected.peak_bytes
    assert prof.activations_by_operator() == expected.activations
    assert prof.flops == expected.flops > 0
    assert prof.saved_bytes == sum(a["bytes"] for a in expected.activations)
    by_module = prof.activations_by_module()
    assert sum(by_module.values()) == prof.saved_bytes
    assert any(".encoder.block.0." in path for path in by_module)


def test_profile_step_leaves_no_trace():
    model, batch, optimizer, _ = t5_cell("cpu")
    backward, dropout = torch.autograd.backward, F.dropout
    with profiler.profile_step(model, optimizer, inputs=batch, models_device="cuda") as prof:
        assert _get_current_dispatch_mode() is prof.tracker and F.dropout is not dropout
        _tracked_step(model, batch, optimizer)
    assert torch.autograd.backward is backward and F.dropout is dropout
    assert _get_current_dispatch_mode() is None
    assert all(group["foreach"] is None for group in optimizer.param_groups)
    with pytest.raises(RuntimeError, match="boom"), profiler.profile_step(model, optimizer):
        raise RuntimeError("boom")
    assert torch.autograd.backward is backward and _get_current_dispatch_mode() is None


def test_importing_profiler_loads_no_torch():
    code = "import sys, profiler; assert 'torch' not in sys.modules and 'pandas' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
    assert sorted(profiler.__all__) == ["load_suite", "plan_run", "prepare_method", "profile_step",
                                        "render_report", "run_check", "run_suite"]
