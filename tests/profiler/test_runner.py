"""The runner: records, resume after a kill, failing cells, and the auto device's budgets.

Most tests use ``fake_measure`` (conftest) so that they pin the runner's own behaviour; one test
uses the real backend, when present, to pin that reusing a meta model across cells is exact.
"""

from __future__ import annotations

import dataclasses
import json

import pandas as pd
import pytest

from profiler import methods as methods_table
from profiler import records, runner
from profiler.suite import load_suite

ENV_KEYS = {"torch", "transformers", "peft", "python", "device_name", "host"}


def run(suite_path, out_dir, measure, **kwargs):
    plan = runner.plan_run(load_suite(suite_path), out_dir, **kwargs)
    return plan, runner.run_suite(plan, measure=measure)


class CountingMeasure:
    """Wraps a measure function; remembers the batch size and device of every call."""

    def __init__(self, measure, fail_at: int | None = None, error: BaseException | None = None):
        self.measure, self.fail_at, self.error, self.calls = measure, fail_at, error, []

    def __call__(self, model, batch, optimizer, **kwargs):
        self.calls.append((batch["input_ids"].shape[0], kwargs["device"]))
        if self.fail_at is not None and len(self.calls) == self.fail_at:
            raise self.error
        return self.measure(model, batch, optimizer, **kwargs)


def test_records_hold_params_status_memory_and_env(write_suite, tmp_path, fake_measure):
    plan, result = run(write_suite(), tmp_path / "out", fake_measure)
    rows = records.read_records(result.results_path)
    assert [r["cell_id"] for r in rows] == [c.cell_id for c in plan.cells]
    assert result.statuses == {"estimated": 8}
    for row in rows:
        assert row["status"] == "estimated" and row["device"] == "meta" and row["models_device"] == "cuda"
        assert row["params"]["method"] in ("full", "lora")
        assert set(row["memory"]["categories"]) == set(records.MEMORY_CATEGORIES)
        assert row["memory"]["peak_bytes"] == sum(row["memory"]["categories"].values())
        assert row["throughput"] is None  # meta runs have no step times
        assert set(row["env"]) == ENV_KEYS
    suite_json = json.loads((tmp_path / "out" / "suite.json").read_text())
    assert suite_json["name"] == "tiny" and len(suite_json["cells"]) == 8
    assert len(pd.read_csv(tmp_path / "out" / "results.csv")) == 8


def test_cpu_run_reports_throughput_from_step_times(write_suite, tmp_path, fake_measure):
    _, result = run(write_suite(), tmp_path / "out", fake_measure, device="cpu", only="t5-tiny/full/B3")
    (row,) = records.read_records(result.results_path)
    assert row["status"] == "ok" and row["device"] == "cpu"
    throughput = row["throughput"]
    assert throughput["timed_steps"] == 1
    # encoder-decoder: B * (S + T) tokens per step
    assert throughput["tokens_per_s"] == pytest.approx(3 * (8 + 8) / throughput["step_time_s"])
    assert throughput["samples_per_s"] == pytest.approx(3 / throughput["step_time_s"])


def test_resume_after_a_kill_runs_only_the_missing_cells(write_suite, tmp_path, fake_measure):
    out = tmp_path / "out"
    plan, _ = run(write_suite(), out, fake_measure)
    lines = (out / "results.jsonl").read_text().splitlines()
    # a kill after three cells, in the middle of writing the fourth
    (out / "results.jsonl").write_text("\n".join(lines[:3]) + "\n" + lines[3][: len(lines[3]) // 2])
    counting = CountingMeasure(fake_measure)
    plan, result = run(write_suite(), out, counting, resume=True)
    assert [c.cell_id for c in plan.todo] == [c.cell_id for c in plan.cells[3:]]
    assert len(counting.calls) == 5 and result.ran == 5
    rows = records.read_records(out / "results.jsonl")
    assert sorted(r["cell_id"] for r in rows) == sorted(c.cell_id for c in plan.cells)
    assert rows[:3] == [json.loads(line) for line in lines[:3]]  # finished cells untouched
    assert len(pd.read_csv(out / "results.csv")) == 8


def test_resume_retries_failed_cells_and_keeps_one_record_per_cell(write_suite, tmp_path, fake_measure):
    out = tmp_path / "out"
    run(write_suite(), out, CountingMeasure(fake_measure, fail_at=2, error=RuntimeError("flaky")))
    assert [r["status"] for r in records.read_records(out / "results.jsonl")].count("error") == 1
    counting = CountingMeasure(fake_measure)
    run(write_suite(), out, counting, resume=True)
    rows = records.read_records(out / "results.jsonl")
    assert len(counting.calls) == 1
    assert len(rows) == 8 and {r["status"] for r in rows} == {"estimated"}


def test_a_failing_method_is_recorded_and_the_suite_goes_on(write_suite, tmp_path, fake_measure, monkeypatch):
    def explode(model, family, ratio, seed):
        raise ValueError("this method always fails")

    monkeypatch.setattr(methods_table, "METHODS",
                        methods_table.METHODS + (methods_table.Method("boom", explode, False, "fails"),))
    text = write_suite().read_text().replace("methods: [full, lora]", "methods: [full, boom, lora]")
    _, result = run(write_suite(text), tmp_path / "out", fake_measure)
    rows = records.read_records(result.results_path)
    assert len(rows) == 12
    failed = [r for r in rows if r["params"]["method"] == "boom"]
    assert len(failed) == 4
    assert all(r["status"] == "error" and r["message"] == "ValueError: this method always fails" for r in failed)
    assert all(r["memory"] is None for r in failed)
    assert {r["status"] for r in rows if r["params"]["method"] != "boom"} == {"estimated"}


def test_out_of_memory_is_its_own_status(write_suite, tmp_path, fake_measure):
    counting = CountingMeasure(fake_measure, fail_at=1, error=MemoryError("no room"))
    _, result = run(write_suite(), tmp_path / "out", counting)
    rows = records.read_records(result.results_path)
    assert rows[0]["status"] == "oom" and rows[0]["message"] == "MemoryError: no room"
    assert result.statuses == {"oom": 1, "estimated": 7}


def test_ctrl_c_keeps_every_finished_cell(write_suite, tmp_path, fake_measure):
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        run(write_suite(), out, CountingMeasure(fake_measure, fail_at=3, error=KeyboardInterrupt()))
    assert len(records.read_records(out / "results.jsonl")) == 2
    assert len(pd.read_csv(out / "results.csv")) == 2
    counting = CountingMeasure(fake_measure)
    run(write_suite(), out, counting, resume=True)
    assert len(counting.calls) == 6


def test_existing_results_need_resume_or_overwrite(write_suite, tmp_path, fake_measure):
    out = tmp_path / "out"
    run(write_suite(), out, fake_measure, only="bert-tiny/full/B2")
    before = (out / "results.jsonl").read_text()
    with pytest.raises(runner.RunInputError, match="results exist already"):
        runner.plan_run(load_suite(write_suite()), out)
    assert (out / "results.jsonl").read_text() == before
    _, result = run(write_suite(), out, fake_measure, overwrite=True, only="t5-tiny/lora/*")
    assert [r["cell_id"] for r in records.read_records(result.results_path)] == [
        "t5-tiny/lora/B2-S8-T8-D64-H4", "t5-tiny/lora/B3-S8-T8-D64-H4"]


def test_auto_keeps_the_estimate_when_memory_does_not_fit(write_suite, tmp_path, fake_measure, monkeypatch):
    monkeypatch.setattr(runner, "available_memory_bytes", lambda: 1000)
    counting = CountingMeasure(fake_measure)
    _, result = run(write_suite(), tmp_path / "out", counting, device="auto", only="t5-tiny/full/B2")
    (row,) = records.read_records(result.results_path)
    assert counting.calls == [(2, "meta")]
    assert row["status"] == "estimated" and row["device"] == "meta"
    assert "exceeds the CPU memory budget" in row["message"]


def test_auto_keeps_the_estimate_when_time_does_not_fit(write_suite, tmp_path, fake_measure, monkeypatch):
    monkeypatch.setattr(runner, "cpu_flop_rate", lambda: 1.0)  # one FLOP per second: nothing fits
    counting = CountingMeasure(fake_measure)
    _, result = run(write_suite(), tmp_path / "out", counting, device="auto", only="t5-tiny/full/B2")
    (row,) = records.read_records(result.results_path)
    assert counting.calls == [(2, "meta")]
    assert row["status"] == "estimated" and "cell budget 60 s" in row["message"]


def test_auto_runs_on_cpu_when_the_estimate_fits(write_suite, tmp_path, fake_measure, monkeypatch):
    monkeypatch.setattr(runner, "cpu_flop_rate", lambda: 1e15)
    counting = CountingMeasure(fake_measure)
    _, result = run(write_suite(), tmp_path / "out", counting, device="auto", only="bert-tiny/lora/B3")
    (row,) = records.read_records(result.results_path)
    assert counting.calls == [(3, "meta"), (3, "cpu")]
    assert row["status"] == "ok" and row["device"] == "cpu" and row["models_device"] == "cpu"
    assert row["estimate"]["models_device"] == "cuda" and row["estimate"]["peak_bytes"] > 0
    assert row["throughput"]["tokens_per_s"] > 0


def test_suite_time_budget_stops_cpu_runs(write_suite, tmp_path, fake_measure, monkeypatch):
    monkeypatch.setattr(runner, "cpu_flop_rate", lambda: 1e15)
    suite = load_suite(write_suite())
    suite = dataclasses.replace(suite, budgets=dataclasses.replace(suite.budgets, suite_seconds=0.0))
    plan = runner.plan_run(suite, tmp_path / "out", device="auto", only="bert-tiny/full")
    result = runner.run_suite(plan, measure=fake_measure)
    rows = records.read_records(result.results_path)
    assert {r["status"] for r in rows} == {"estimated"}
    assert all("left of the suite budget" in r["message"] for r in rows)


def test_parallel_meta_estimates_match_serial_ones(write_suite, tmp_path):
    from tests.profiler.conftest import (
        fake_measure_training_step,  # importable by worker processes
    )

    suite = load_suite(write_suite())
    serial = runner.run_suite(runner.plan_run(suite, tmp_path / "a"), measure=fake_measure_training_step)
    parallel = runner.run_suite(runner.plan_run(suite, tmp_path / "b"), measure=fake_measure_training_step, jobs=2)
    a, b = records.read_records(serial.results_path), records.read_records(parallel.results_path)
    assert [r["cell_id"] for r in a] == [r["cell_id"] for r in b]  # suite order either way
    assert [r["memory"] for r in a] == [r["memory"] for r in b]


REUSE_SUITE = """\
name: reuse
model: [{family: t5, preset: t5-tiny}, {family: bert, preset: bert-tiny}]
grid: {batch_size: [2, 3], seq_len: [8]}
methods: [lora, checkpointing, lora+wtacrs@0.3]
training: {warmup_steps: 1, timed_steps: 1}
device: meta
"""


@pytest.mark.parametrize("model", ["t5-tiny", "bert-tiny"])
def test_reusing_a_meta_model_across_cells_is_exact(write_suite, model):
    from profiler import measure

    suite = load_suite(write_suite(REUSE_SUITE))
    for method in suite.methods:
        cells = [c for c in suite.cells() if c.model == model and c.method == method]
        shared = runner.CellRunner(suite, "meta", measure.measure_training_step)
        reused = [shared.run(c) for c in cells]  # the second cell reuses the first cell's model...
        # ...and skips its warm-up step: only its gradients and optimizer state are made
        assert shared.cache.model in measure._REACHED_PARAMETERS
        fresh = [runner.CellRunner(suite, "meta", measure.measure_training_step).run(c) for c in cells]
        for a, b in zip(reused, fresh):
            assert a["status"] == b["status"] == "estimated", (a["message"], b["message"])
            assert a["memory"] == b["memory"] and a["activations"] == b["activations"], method
        saved = [sum(item["bytes"] for item in r["activations"]) for r in reused]
        assert saved[0] < saved[1]  # the batch size did change


def test_cpu_runs_use_the_suites_thread_count(write_suite, tmp_path, fake_measure):
    import torch

    seen = []

    def measure(*args, **kwargs):
        seen.append(torch.get_num_threads())
        return fake_measure(*args, **kwargs)

    before = torch.get_num_threads()
    text = write_suite().read_text().replace("training: {", "training: {threads: 1, ")
    _, result = run(write_suite(text), tmp_path / "out", measure, device="cpu", only="bert-tiny/full/B2")
    (row,) = records.read_records(result.results_path)
    assert seen == [1] and "(1 threads)" in row["env"]["device_name"]
    assert torch.get_num_threads() == before


# one tiny preset per family of the taxonomy table (Gemma: each generation, they differ in attention)
FAMILY_PRESETS = {"t5": ["t5-tiny-gated"], "bert": ["bert-tiny"], "gpt2": ["gpt2-tiny"], "llama": ["llama-tiny"],
                  "qwen3": ["qwen3-tiny"], "gemma": ["gemma-tiny", "gemma2-tiny", "gemma3-tiny"]}


def test_family_presets_cover_the_taxonomy_table():
    from wtacrs.taxonomy import FAMILIES, family_of

    from profiler.models import PRESETS, build_model
    from tests.profiler.test_suite import _cell_for

    assert set(FAMILY_PRESETS) == set(FAMILIES)
    for family, presets in FAMILY_PRESETS.items():
        assert {family_of(build_model(_cell_for(p), "meta")).name for p in presets} == {family}, presets
        assert all(p in PRESETS for p in presets)


@pytest.mark.parametrize("preset", [p for presets in FAMILY_PRESETS.values() for p in presets])
def test_every_family_estimates_on_meta(preset):
    """One tiny padded cell per family, full and WTA-CRS, estimated on meta with the real backend."""
    from profiler import measure
    from profiler.suite import parse_suite

    grid = {"batch_size": [2], "seq_len": [16], **({"target_len": [8]} if preset.startswith("t5") else {})}
    suite = parse_suite({"model": preset, "grid": grid, "methods": ["full", "wtacrs@0.3"], "device": "meta",
                         "training": {"pad_fraction": 0.25}})
    rows = {c.method: runner.CellRunner(suite, "meta", measure.measure_training_step).run(c) for c in suite.cells()}
    for method, row in rows.items():
        assert row["status"] == "estimated", (method, row["message"])
        assert row["memory"]["peak_bytes"] > 0
    full, sampled = (rows[m]["activations"] for m in ("full", "wtacrs@0.3"))
    assert {a["category"] for a in full} == {"uncompressed"}
    sampled_operators = {a["operator"] for a in sampled if a["category"] == "sampled" and a["bytes"] > 0}
    assert {"Linear-O", "Linear-U", "Linear-D", "TensorMul-1"} <= sampled_operators, sampled_operators
    assert 0 < sum(a["bytes"] for a in sampled) < sum(a["bytes"] for a in full)
