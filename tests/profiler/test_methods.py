"""The checkpointing combinations of the method table: names, memory against checkpointing
alone, and meta estimates equal to cpu measurements."""

from __future__ import annotations

import pytest
import torch

import profiler
from profiler import methods
from profiler.measure import training_step
from profiler.suite import parse_suite

from .conftest import estimate_and_measurement
from .test_measure import t5_cell


@pytest.mark.parametrize(
    "name, canonical, ratio",
    [("checkpointing+wtacrs@.30", "checkpointing+wtacrs@0.3", 0.3), ("checkpointing+lora", "checkpointing+lora", None),
     ("checkpointing+lora+wtacrs@0.1", "checkpointing+lora+wtacrs@0.1", 0.1)],
)
def test_checkpointing_combinations_parse(name, canonical, ratio):
    method = methods.parse(name)
    assert (method.name, method.ratio) == (canonical, ratio)
    assert "checkpointing+wtacrs@R" in methods.METHOD_NAMES_HELP and "checkpointing+lora" in methods.METHOD_NAMES_HELP


def _after_forward(method: str, batch_size: int = 4, seq_len: int = 16) -> dict:
    """Bytes alive right after the forward of a tracked step, and what that forward saved."""
    model, batch, _, _ = t5_cell("cpu", batch_size=batch_size, seq_len=seq_len)
    model = methods.prepare(method, model, "t5")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    training_step(model, batch, optimizer)  # the warm-up
    with profiler.profile_step(model, optimizer, inputs=batch) as prof:
        optimizer.zero_grad(set_to_none=True)
        loss = model(**batch).loss
        live = prof.tracker.live_bytes
        loss.backward()
        del loss
        optimizer.step()
    return {"live": live, "saved": prof.saved_bytes, "peak": prof.peak_bytes}


def test_checkpointed_wtacrs_keeps_nothing_of_its_regions_after_the_forward():
    """Byte-exact on cpu: after the forward, checkpointing+wtacrs holds what checkpointing alone
    holds beyond the saved activations, plus WTA-CRS's own new state, and saves less.

    The extra is counted by hand: the running per-position gradient norms PositionGradNorms
    folds in at the forward (fp32 [S] per group of layers that read one input: per encoder block
    Q/K/V, O, U, D; per decoder block self Q/K/V, O, cross Q, cross K/V, O, U, D) and T5's
    decoder token mask (bool [B, T], read by the sinks in backward)."""
    batch_size, seq_len, layers = 4, 16, 2
    alone = _after_forward("checkpointing", batch_size, seq_len)
    sampled = _after_forward("checkpointing+wtacrs@0.3", batch_size, seq_len)
    groups = layers * 4 + layers * 7
    extra = groups * seq_len * 4 + batch_size * seq_len
    assert sampled["live"] - sampled["saved"] == alone["live"] - alone["saved"] + extra
    assert sampled["saved"] < alone["saved"] and sampled["peak"] < alone["peak"]


def _t5_tiny_suite(method: str):
    return parse_suite({
        "model": "t5-tiny", "grid": {"batch_size": [2], "seq_len": [16]}, "methods": [method], "device": "meta",
        "models_device": "cpu", "training": {"warmup_steps": 1, "timed_steps": 1, "pad_fraction": 0.25},
    })


@pytest.mark.parametrize("method", ["checkpointing+wtacrs@0.3", "checkpointing+lora"])
def test_checkpointing_combinations_meta_estimate_equals_cpu_measurement(method):
    """Under the runner (the breakdown's outer saved_tensors_hooks included): no CheckpointError,
    and the meta estimate is the cpu measurement, byte for byte."""
    estimate_and_measurement(_t5_tiny_suite(method))
