"""The runner: records, resume after a kill, failing cells, and the auto device's budgets.

Most tests use ``fake_measure`` (conftest) so that they pin the runner's own behaviour; one test
uses the real backend, when present, to pin that reusing a meta model across cells is exact.
"""

from __future__ import annotations

import json

import pandas as pd
import pytest

from profiler import methods as methods_table
from profiler import records, runner, steptime
from profiler.suite import load_suite
from tests.profiler.conftest import TINY_SUITE

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
        throughput = row["throughput"]  # meta runs: the roofline estimate for the suite's target GPU
        assert (throughput["kind"], throughput["target"], throughput["timed_steps"]) == ("estimated", "a100-80gb", 0)
        assert throughput["step_time_s"] == pytest.approx(row["flops"] / 19.5e12 + steptime.KERNEL_LAUNCH_S)
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
                        methods_table.METHODS + (methods_table.MethodEntry("boom", explode, "fails"),))
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
    monkeypatch.setattr(runner, "total_memory_bytes", lambda: 1000)
    counting = CountingMeasure(fake_measure)
    _, result = run(write_suite(), tmp_path / "out", counting, device="auto", only="t5-tiny/full/B2")
    (row,) = records.read_records(result.results_path)
    assert counting.calls == [(2, "meta")]
    assert row["status"] == "estimated" and row["device"] == "meta"
    assert "exceeds the CPU memory budget" in row["message"]


def test_auto_keeps_the_estimate_when_time_does_not_fit(write_suite, tmp_path, fake_measure):
    counting = CountingMeasure(fake_measure)
    text = TINY_SUITE + "budgets: {cell_seconds: 0.0001}\n"
    _, result = run(write_suite(text), tmp_path / "out", counting, device="auto", only="t5-tiny/full/B2")
    (row,) = records.read_records(result.results_path)
    assert counting.calls == [(2, "meta")]
    assert row["status"] == "estimated" and "(cell budget 0.0001 s)" in row["message"]
    assert row["policy"]["choice"] == "estimate" and row["policy"]["reason"] in row["message"]


def test_auto_plans_cpu_time_from_the_estimate_alone(write_suite, tmp_path, fake_measure):
    counting = CountingMeasure(fake_measure)
    _, result = run(write_suite(), tmp_path / "out", counting, device="auto", only="bert-tiny/lora/B3")
    (row,) = records.read_records(result.results_path)
    assert counting.calls == [(3, "meta"), (3, "cpu")]
    assert row["status"] == "ok" and row["device"] == "cpu" and row["models_device"] == "cpu"
    assert row["estimate"]["models_device"] == "cuda" and row["estimate"]["peak_bytes"] > 0
    assert row["throughput"]["tokens_per_s"] > 0 and row["throughput"]["kind"] == "measured"
    # the fake backend counts no kernels: the plan is its meta FLOPs on the nominal CPU, 3 steps
    meta_flops = row["estimate"]["flops"]
    nominal = steptime.NOMINAL_CPU
    assert row["policy"]["cpu_seconds"] == pytest.approx(3 * (meta_flops / nominal.matmul["fp32"] + nominal.per_op_s))
    assert row["policy"]["choice"] == "cpu"
    assert row["throughput"]["estimate_over_measured"] > 0


def test_suite_time_budget_stops_cpu_runs(write_suite, tmp_path, fake_measure):
    suite = load_suite(write_suite())
    suite = suite.model_copy(update={"budgets": suite.budgets.model_copy(update={"suite_seconds": 0.0})})
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
        # the first cell built its own model: only the second needs a fresh runner to compare with
        fresh = runner.CellRunner(suite, "meta", measure.measure_training_step).run(cells[1])
        assert [r["status"] for r in reused] == [fresh["status"]] * 2 == ["estimated"] * 2, fresh["message"]
        assert reused[1]["memory"] == fresh["memory"] and reused[1]["activations"] == fresh["activations"], method
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
    rows = {c.method.name: runner.CellRunner(suite, "meta", measure.measure_training_step).run(c) for c in suite.cells()}
    for method, row in rows.items():
        assert row["status"] == "estimated", (method, row["message"])
        assert row["memory"]["peak_bytes"] > 0
    full, sampled = (rows[m]["activations"] for m in ("full", "wtacrs@0.3"))
    assert {a["category"] for a in full} == {"uncompressed"}
    sampled_operators = {a["operator"] for a in sampled if a["category"] == "sampled" and a["bytes"] > 0}
    assert {"Linear-O", "Linear-U", "Linear-D"} <= sampled_operators, sampled_operators  # the default's attention is exact
    assert not {"TensorMul-1", "TensorMul-2"} & sampled_operators
    assert 0 < sum(a["bytes"] for a in sampled) < sum(a["bytes"] for a in full)


# --- a cell's identity: --resume and results outside the suite ------------------------------


CONFIG_SUITE = """\
name: layers
model: [{family: bert, preset: bert-tiny, config: {num_hidden_layers: 2}}]
grid: {batch_size: [2, 3], seq_len: [8]}
methods: [full, lora]
training: {warmup_steps: 1, timed_steps: 1}
device: meta
"""


def test_resume_after_a_config_change_runs_every_cell_again(write_suite, tmp_path, fake_measure):
    out = tmp_path / "out"
    run(write_suite(CONFIG_SUITE), out, fake_measure)
    counting = CountingMeasure(fake_measure)
    plan, _ = run(write_suite(CONFIG_SUITE.replace("num_hidden_layers: 2", "num_hidden_layers: 4")), out, counting,
                  resume=True)
    assert len(plan.todo) == len(plan.cells) == 4 and len(counting.calls) == 4
    rows = records.read_records(out / "results.jsonl")
    assert len(rows) == 4 and {r["params"]["n_layers"] for r in rows} == {4}
    assert len(records.read_records(out / runner.SUPERSEDED)) == 4  # the 2-layer records, set aside


@pytest.mark.parametrize("change", [
    ("num_hidden_layers: 2", "num_hidden_layers: 2, hidden_dropout_prob: 0.0"),  # config, not in params
    ("timed_steps: 1}", "timed_steps: 1, dtype: bfloat16}"),
    ("timed_steps: 1}", "timed_steps: 1, seed: 1}"),
    ("timed_steps: 1}", "timed_steps: 1, pad_fraction: 0.25}"),
    ("timed_steps: 1}", "timed_steps: 1, threads: 1}"),
    ("timed_steps: 1}", "timed_steps: 1, attn_implementation: sdpa}"),
    ("device: meta", "device: meta\nmodels_device: cpu"),
    ("device: meta", "device: cpu"),
    ("name: layers", "name: layers2"),
])
def test_every_setting_that_changes_figures_is_part_of_the_cell_identity(write_suite, tmp_path, fake_measure,
                                                                          change):
    out = tmp_path / "out"
    run(write_suite(CONFIG_SUITE), out, fake_measure)
    again = runner.plan_run(load_suite(write_suite(CONFIG_SUITE)), out, resume=True)
    assert again.todo == []  # the same suite, loaded again: every cell is finished
    changed = runner.plan_run(load_suite(write_suite(CONFIG_SUITE.replace(*change))), out, resume=True)
    assert len(changed.todo) == 4, change


def test_auto_budgets_are_part_of_the_cell_identity(write_suite, tmp_path, fake_measure, monkeypatch):
    monkeypatch.setattr(runner, "total_memory_bytes", lambda: 1000)  # every cell keeps its estimate
    text = CONFIG_SUITE.replace("device: meta", "device: auto")
    out = tmp_path / "out"
    run(write_suite(text), out, fake_measure)
    assert runner.plan_run(load_suite(write_suite(text)), out, resume=True).todo == []
    changed = text + "budgets: {memory_fraction: 0.5}\n"
    assert len(runner.plan_run(load_suite(write_suite(changed)), out, resume=True).todo) == 4
    report_only = text + "budgets: {memory_gib: [16]}\n"  # the report's sizes change no figure
    assert runner.plan_run(load_suite(write_suite(report_only)), out, resume=True).todo == []


def test_results_of_removed_grid_values_and_methods_are_not_the_suites(write_suite, tmp_path, fake_measure):
    from profiler.report import load_results

    out = tmp_path / "out"
    run(write_suite(), out, fake_measure)
    smaller = (write_suite().read_text().replace("batch_size: [2, 3]", "batch_size: [3]")
               .replace("methods: [full, lora]", "methods: [full]").split("checks:")[0])
    counting = CountingMeasure(fake_measure)
    plan, _ = run(write_suite(smaller), out, counting, resume=True)
    assert counting.calls == [] and len(plan.cells) == 2
    loaded = load_results(out / "results.jsonl")
    assert sorted(r["cell_id"] for r in loaded.records) == sorted(c.cell_id for c in plan.cells)
    assert len(pd.read_csv(out / "results.csv")) == 2
    assert len(plan.superseded) == 6 and plan.superseded_note().startswith("6 record(s) of ")
    assert len(records.read_records(out / runner.SUPERSEDED)) == 6


def test_report_and_check_read_only_the_records_of_the_suite(write_suite, tmp_path, fake_measure):
    import io

    from rich.console import Console

    from profiler.check import run_check
    from profiler.report import load_results

    def check() -> tuple[int, str]:
        buffer = io.StringIO()
        return run_check(out / "results.jsonl", console=Console(file=buffer, width=200)), buffer.getvalue()

    out = tmp_path / "out"
    run(write_suite(), out, fake_measure)
    code, _ = check()
    rows = records.read_records(out / "results.jsonl")
    # a record of the same cell id from another version of the suite (4 layers), appended later
    stray = json.loads(json.dumps(rows[0]))
    stray["params"]["n_layers"], stray["cell_key"] = 4, "0" * 16
    stray["memory"]["peak_bytes"] *= 2
    records.append_record(out / "results.jsonl", stray)
    loaded = load_results(out / "results.jsonl")
    (mine,) = [r for r in loaded.records if r["cell_id"] == rows[0]["cell_id"]]
    assert mine == rows[0] and len(loaded.records) == 8
    assert loaded.outside == 1
    again, text = check()
    assert again == code and "1 record(s) of results.jsonl are not cells of suite.json: ignored" in text


# --- one run per output directory --------------------------------------------------------------


def _wait_for(condition, alive, seconds: float = 240) -> None:
    """Poll ``condition`` while ``alive()`` (a safety limit, not a timing assertion)."""
    import time

    deadline = time.monotonic() + seconds
    while not condition():
        assert alive(), "the process or thread waited for has ended"
        assert time.monotonic() < deadline, "gave up waiting"
        time.sleep(0.05)


def test_a_second_run_on_a_busy_out_dir_exits_2_and_writes_nothing(write_suite, tmp_path, capsys, monkeypatch,
                                                                   fake_measure):
    """The first run holds the directory's lock from a thread of this process: ``flock`` locks an
    open file description, so a second open of the directory is refused as another process's is."""
    import threading

    from profiler import cli

    suite, out = write_suite(), tmp_path / "out"
    waiting, go, calls, outcome = threading.Event(), threading.Event(), [], {}

    def gated(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # one cell is on disk: wait in the second until the test says go
            waiting.set()
            assert go.wait(240)
        return fake_measure(*args, **kwargs)

    def first_run():
        try:
            outcome["result"] = runner.run_suite(runner.plan_run(load_suite(suite), out), measure=gated)
        except BaseException as e:  # reported by the test thread
            outcome["error"] = e

    first = threading.Thread(target=first_run, daemon=True)
    first.start()
    try:
        _wait_for(waiting.is_set, first.is_alive)
        before = {p.name: p.read_bytes() for p in out.iterdir()}
        monkeypatch.setattr(runner, "_default_measure", lambda: fake_measure)
        for flags in (["--overwrite"], ["--resume"], []):
            code = cli.main(["run", str(suite), "--out", str(out), "--quiet", "--no-report", *flags])
            captured = capsys.readouterr()
            assert code == 2 and captured.out == "", flags
            assert captured.err == f"{out}: another run is writing to this output directory; wait for it to end " \
                                   "or choose another --out\n", flags
            assert {p.name: p.read_bytes() for p in out.iterdir()} == before, flags
    finally:
        go.set()
        first.join(240)
    assert "error" not in outcome, outcome.get("error")
    rows = records.read_records(out / "results.jsonl")
    assert len(rows) == 8 and len({r["cell_id"] for r in rows}) == 8


def test_a_run_locked_out_after_planning_writes_nothing(write_suite, tmp_path, fake_measure):
    out = tmp_path / "out"
    plan = runner.plan_run(load_suite(write_suite()), out)  # out does not exist yet: nothing to lock
    out.mkdir()
    with runner.output_lock(out):  # another run started in between
        with pytest.raises(runner.RunInputError, match="another run is writing to this output directory"):
            runner.run_suite(plan, measure=fake_measure)
    assert list(out.iterdir()) == []


def test_a_run_planned_before_another_run_wrote_refuses(write_suite, tmp_path, fake_measure):
    out = tmp_path / "out"
    late = runner.plan_run(load_suite(write_suite()), out)
    run(write_suite(), out, fake_measure, only="t5-tiny/full/B2")  # another run came and went
    before = (out / "results.jsonl").read_text()
    with pytest.raises(runner.RunInputError, match="changed since this run was planned"):
        runner.run_suite(late, measure=fake_measure)
    assert (out / "results.jsonl").read_text() == before


# --- cost --------------------------------------------------------------------------------------


def test_results_csv_grows_by_one_row_per_cell(write_suite, tmp_path, fake_measure, monkeypatch):
    reads = []
    real = records.iter_records

    def counted(path):
        reads.append(path)
        return real(path)

    monkeypatch.setattr(records, "iter_records", counted)
    calls, inodes = [], []
    csv_path = tmp_path / "out" / "results.csv"

    def measure(*args, **kwargs):
        result = fake_measure(*args, **kwargs)
        calls.append(1)
        inodes.append(csv_path.stat().st_ino if csv_path.exists() else None)
        if len(calls) >= 5:  # a new operator from the fifth cell on: the column set grows once
            result.activations.append({"operator": "Softmax", "category": "uncompressed", "bytes": len(calls)})
        return result

    _, result = run(write_suite(), tmp_path / "out", measure)
    assert reads == []  # results.jsonl is never read back to write the CSV
    # appended in place, but for the one rewrite (a new file) when the fifth cell widened the header
    assert inodes[0] is None and len(set(inodes[1:5])) == 1 and len(set(inodes[5:])) == 1
    assert inodes[4] != inodes[5]
    monkeypatch.setattr(records, "iter_records", real)
    rows = records.read_records(result.results_path)
    expected = pd.DataFrame([records.flatten(r) for r in rows])
    written = pd.read_csv(tmp_path / "out" / "results.csv")
    assert list(written.columns) == list(expected.columns)
    assert written["act[Softmax|uncompressed]_bytes"].tolist()[4:] == [5, 6, 7, 8]
    assert written["act[Softmax|uncompressed]_bytes"].isna().tolist()[:4] == [True] * 4
    pd.testing.assert_frame_equal(written, pd.read_csv(__import__("io").StringIO(expected.to_csv(index=False))))


def _alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie, dead but not yet reaped by its new parent, is dead)."""
    from pathlib import Path

    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


PARENT = """\
import sys
from profiler import runner
from profiler.suite import load_suite
from tests.profiler.conftest import sleeping_measure

plan = runner.plan_run(load_suite(sys.argv[1]), sys.argv[2])
runner.run_suite(plan, measure=sleeping_measure, jobs=2)
"""


@pytest.mark.skipif(not __import__("sys").platform.startswith("linux"), reason="reads /proc")
def test_workers_die_with_a_killed_parent(write_suite, tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    pids = tmp_path / "pids"
    pids.mkdir()
    parent = subprocess.Popen([sys.executable, "-c", PARENT, str(write_suite()), str(tmp_path / "out")], cwd=root,
                              env={**os.environ, "PROFILER_TEST_PIDS": str(pids)},
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    workers: list[int] = []
    try:
        _wait_for(lambda: len(list(pids.iterdir())) == 2, lambda: parent.poll() is None)  # both workers are measuring
        workers = [int(p.name) for p in pids.iterdir()]
        parent.send_signal(signal.SIGKILL)  # no cleanup of any kind runs
        parent.wait()
        deadline = time.monotonic() + 60  # a safety limit: PR_SET_PDEATHSIG acts at once
        while any(_alive(pid) for pid in workers) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not [pid for pid in workers if _alive(pid)]
    finally:
        if parent.poll() is None:
            parent.kill()
        for pid in workers:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
