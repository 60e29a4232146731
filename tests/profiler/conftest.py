"""Shared fixtures of the profiler tests: tiny suite files and a stand-in measurement backend.

``fake_measure`` has the signature and result type of ``profiler.measure.measure_training_step``
and runs the real training step, so runner tests exercise model building, methods, batches and
optimizers without depending on the tracker; its figures (parameter bytes + bytes saved for
backward, deduplicated by storage) are simple enough to check by hand.
"""

from __future__ import annotations

import textwrap
import time
from pathlib import Path

import pytest
import torch

from profiler.measure import Measurement
from profiler.records import MEMORY_CATEGORIES
from profiler.steptime import StepCost

TINY_SUITE = """\
name: tiny
model:
  - {family: t5, preset: t5-tiny}
  - {family: bert, preset: bert-tiny}
grid:
  batch_size: [2, 3]
  seq_len: [8]
methods: [full, lora]
training: {warmup_steps: 1, timed_steps: 1}
device: meta
checks:
  - {metric: peak_bytes, denominator: lora, min: 1.0, where: {batch_size: 3}}
"""


def fake_measure_training_step(model, batch, optimizer, *, device, family, warmup_steps=1, timed_steps=3,
                               models_device="cuda"):
    saved: dict[int, int] = {}
    params = {id(p.untyped_storage()) for p in model.parameters()}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if id(storage) not in params:
            saved[id(storage)] = storage.nbytes()
        return tensor

    times = []
    # meta tensors have no values: one step gives the figures (what is saved for backward), and
    # neither warm-up nor timed steps change them
    steps = 1 if device == "meta" else warmup_steps + timed_steps
    for step in range(steps):
        saved.clear()
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        if step >= warmup_steps and device != "meta":
            times.append(time.perf_counter() - start)
    parameters = sum(p.numel() * p.element_size() for p in model.parameters())
    activations = sum(saved.values())
    categories = dict.fromkeys(MEMORY_CATEGORIES, 0)
    categories.update(parameters=parameters, activations=activations)
    cost = StepCost()
    cost.add(6 * parameters // 4 * batch["input_ids"].numel(), 0, "fp32")  # the step's FLOPs, as one kernel
    return Measurement(
        peak_bytes=parameters + activations,
        categories=categories,
        activations=[{"operator": "Other", "category": "uncompressed", "bytes": activations}],
        step_times_s=times,
        cost=cost,
        estimated=device == "meta",
        models_device=models_device if device == "meta" else device,
    )


@pytest.fixture(autouse=True)
def one_cpu_thread():
    """Tiny models run one intra-op thread: on shared cores a second thread only makes every
    small kernel wait for it (a t5-tiny step: 1.3 s with 2 threads, 0.02 s with 1). No figure a
    test checks depends on the thread count."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def fake_measure():
    return fake_measure_training_step


@pytest.fixture
def write_suite(tmp_path: Path):
    """Write a suite file (dedented YAML text) and return its path."""

    def write(text: str = TINY_SUITE, name: str = "suite.yaml") -> Path:
        path = tmp_path / name
        path.write_text(textwrap.dedent(text), encoding="utf-8")
        return path

    write.path = tmp_path / "suite.yaml"
    return write


def sleeping_measure(*args, **kwargs):
    """A measurement that never ends: writes this process's pid into ``$PROFILER_TEST_PIDS``
    and sleeps (worker-process tests kill its parent and look for it)."""
    import os

    pids = Path(os.environ["PROFILER_TEST_PIDS"])
    (pids / str(os.getpid())).touch()
    time.sleep(600)
    raise AssertionError("slept for 10 minutes")


def estimate_and_measurement(suite) -> tuple[dict, dict]:
    """The one cell of ``suite`` estimated on meta and measured on the cpu, through the runner;
    asserts what every estimate-equals-measurement test needs: the same peak, categories and
    activations, and that there were activations and optimizer state to count."""
    from profiler import runner
    from profiler.measure import measure_training_step

    (cell,) = suite.cells()
    meta = runner.CellRunner(suite, "meta", measure_training_step).run(cell)
    cpu = runner.CellRunner(suite, "cpu", measure_training_step).run(cell)
    assert (meta["status"], cpu["status"]) == ("estimated", "ok"), (meta["message"], cpu["message"])
    assert meta["memory"]["peak_bytes"] == cpu["memory"]["peak_bytes"]
    assert meta["memory"]["categories"] == cpu["memory"]["categories"]
    assert meta["activations"] == cpu["activations"]
    assert sum(a["bytes"] for a in cpu["activations"]) > 0 and cpu["memory"]["categories"]["optimizer_state"] > 0
    return meta, cpu
