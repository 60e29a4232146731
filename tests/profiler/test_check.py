"""The CI gate: ratio bounds and baselines hold (0), regress (1), or the input is bad (2)."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import pytest
from rich.console import Console

from profiler.check import (
    baseline_from_results,
    read_baseline,
    run_check,
    write_baseline,
)
from profiler.records import read_records
from profiler.results import FigureKind, load_results

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture
def results(tmp_path, monkeypatch) -> Path:
    """A copy of the fixture in an empty working directory (so no committed baseline is found)."""
    for name in ("results.jsonl", "suite.json"):
        shutil.copy(FIXTURES / name, tmp_path / name)
    monkeypatch.chdir(tmp_path)
    return tmp_path / "results.jsonl"


def check(results: Path, **kwargs) -> tuple[int, str]:
    buffer = io.StringIO()
    code = run_check(results, console=Console(file=buffer, width=240, color_system=None), **kwargs)
    return code, buffer.getvalue()


def set_checks(results: Path, checks: list | None) -> None:
    path = results.parent / "suite.json"
    suite = json.loads(path.read_text())
    if checks is None:
        suite.pop("checks")
    else:
        suite["checks"] = checks
    path.write_text(json.dumps(suite))


def test_fixture_bounds_hold(results):
    code, out = check(results)
    assert code == 0, out
    assert "2 held, 0 regressed" in out
    assert "2.343–2.631× (8 points)" in out  # full/wtacrs@0.3 saved activations over the grid


def test_bound_violated_at_one_point_regresses(results):
    # full/wtacrs@0.3 peak ranges 1.50x (t5-base B=16 S=128) .. 2.20x over the grid
    peaks = {(r["params"]["method"]): r["memory"]["peak_bytes"] for r in read_records(results)
             if (r["params"]["model"], r["params"]["batch_size"], r["params"]["seq_len"]) == ("t5-base", 16, 128)}
    worst = peaks["full"] / peaks["wtacrs@0.3"]
    set_checks(results, [{"metric": "peak_bytes", "denominator": "wtacrs@0.3", "min": 1.6}])
    code, out = check(results)
    assert code == 1
    assert "0 held, 1 regressed" in out and f"1 point(s) outside, e.g. t5-base B=16 S=128: {worst:.3f}×" in out


def test_check_matching_no_cell_is_a_no_data_regression(results):
    set_checks(results, [{"metric": "peak_bytes", "denominator": "wtacrs@0.3", "min": 1.0,
                          "where": {"model": "t5-xxl"}}])
    code, out = check(results)
    assert code == 1 and "no data" in out


def test_error_cell_in_a_check_regresses_with_its_message(results):
    set_checks(results, [{"metric": "peak_bytes", "denominator": "checkpointing", "min": 1.0,
                          "where": {"model": "t5-small", "seq_len": [256]}}])
    code, out = check(results)
    assert code == 1
    assert "t5-small B=64 S=256: checkpointing error: RuntimeError: checkpoint recomputation saw <2>" in out


def one_error_line(out: str) -> bool:
    lines = [line for line in out.splitlines() if line.strip()]
    return len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in out


@pytest.mark.parametrize(
    "case",
    ["missing results", "garbage results", "no checks and no baseline", "unknown metric", "missing baseline",
     "baseline not json", "baseline without ratios", "baseline of another suite", "min above max"],
)
def test_bad_input_exits_2_with_one_line(results, case):
    kwargs = {}
    if case == "missing results":
        results = results.parent / "absent.jsonl"
    elif case == "garbage results":
        results.write_text("not json\n{}\n")
    elif case == "no checks and no baseline":
        set_checks(results, None)
    elif case == "unknown metric":
        set_checks(results, [{"metric": "peak_gb", "denominator": "lora", "min": 1}])
    elif case == "min above max":
        set_checks(results, [{"metric": "peak_bytes", "denominator": "lora", "min": 3, "max": 2}])
    elif case == "missing baseline":
        kwargs["baseline"] = results.parent / "absent.json"
    else:
        path = results.parent / "baseline.json"
        doc = baseline_from_results(load_results(results))
        if case == "baseline not json":
            path.write_text("{")
        elif case == "baseline without ratios":
            doc.pop("ratios")
            path.write_text(json.dumps(doc))
        else:
            doc["suite"] = "another suite"
            path.write_text(json.dumps(doc))
        kwargs["baseline"] = path
    code, out = check(results, **kwargs)
    assert code == 2
    assert one_error_line(out), out


def test_baseline_round_trips(results, tmp_path):
    doc = baseline_from_results(load_results(results))
    assert {"suite", "metric", "tolerance", "ratios"} <= set(doc)
    assert len(doc["ratios"]) == 47 - 8  # 5 methods x 8 grid points, less the failed cell
    path = tmp_path / "b.json"
    write_baseline(path, doc)
    assert read_baseline(path) == doc
    write_baseline(path, read_baseline(path))
    assert read_baseline(path) == doc


def test_update_baseline_writes_what_then_holds(results):
    code, out = check(results, update_baseline=True)
    assert code == 0, out
    path = Path("reports/baselines/t5-fixture.json")
    assert read_baseline(path) == baseline_from_results(load_results(results))
    set_checks(results, [])
    code, out = check(results)  # found by its default path
    assert code == 0, out
    assert "39 held, 0 regressed" in out and "reports/baselines/t5-fixture.json" in out


def test_baseline_worse_regresses_and_better_is_improved(results, tmp_path):
    doc = baseline_from_results(load_results(results))
    set_checks(results, [])
    path = tmp_path / "b.json"
    entry = next(e for e in doc["ratios"] if e["method"] == "wtacrs@0.3")
    measured = entry["ratio"]

    entry["ratio"] = round(measured * 1.2, 4)  # the results now save 1/1.2 of the baseline: -16.7%
    write_baseline(path, doc)
    code, out = check(results, baseline=path)
    assert code == 1 and "-16.7% against baseline" in out and "1 regressed" in out

    entry["ratio"] = round(measured * 1.04, 4)  # within the 5% tolerance
    write_baseline(path, doc)
    assert check(results, baseline=path)[0] == 0

    entry["ratio"] = round(measured * 0.8, 4)  # better than the baseline: held, and said so
    write_baseline(path, doc)
    code, out = check(results, baseline=path)
    assert code == 0 and "improved" in out and "(1 improved)" in out


def test_pairs_of_measured_and_estimated_figures_are_left_out(results):
    records = read_records(results)
    at = {"model": "t5-small", "batch_size": 64, "seq_len": 128}
    for record in records:
        if record["params"]["method"] == "full" and all(record["params"][k] == v for k, v in at.items()):
            record.update(status="estimated", device="meta", models_device="cuda")
    results.write_text("".join(json.dumps(r) + "\n" for r in records))
    set_checks(results, [{"metric": "peak_bytes", "denominator": "wtacrs@0.3", "min": 1.0, "where": at}])
    code, out = check(results)
    assert code == 1 and "no data" in out and "1 left out" in out


def test_cli_update_baseline_takes_a_tolerance(results, capsys):
    from profiler import cli

    path = results.parent / "b.json"
    assert cli.main(["check", str(results), "--baseline", str(path), "--update-baseline", "--tolerance", "0.02"]) == 0
    assert read_baseline(path)["tolerance"] == 0.02
    assert cli.main(["check", str(results), "--baseline", str(path)]) == 0
    capsys.readouterr()
    assert cli.main(["check", str(results), "--baseline", str(path), "--tolerance", "0.02"]) == 2
    assert "--tolerance applies with --update-baseline only" in capsys.readouterr().err


# --- NaN ratios and figure kinds ---------------------------------------------------------------


def _set_peak(results: Path, method: str, value: float, **where) -> None:
    rows = read_records(results)
    for row in rows:
        if row["params"]["method"] == method and all(row["params"][k] == v for k, v in where.items()):
            row["memory"]["peak_bytes"] = value
    results.write_text("".join(json.dumps(r) + "\n" for r in rows))  # json writes NaN as NaN


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_a_ratio_that_is_not_a_number_regresses_and_says_why(results, tmp_path, value):
    path = tmp_path / "b.json"
    write_baseline(path, baseline_from_results(load_results(results)))
    set_checks(results, [])
    at = {"model": "t5-base", "batch_size": 16, "seq_len": 128}
    _set_peak(results, "wtacrs@0.3", value, **at)
    if value == float("inf"):
        _set_peak(results, "full", value, **at)  # inf / inf
    code, out = check(results, baseline=path)
    # inf: every method's ratio over full's infinite peak at that point is a number no more
    assert code == 1 and f"{1 if value != value else 5} regressed" in out
    (row,) = [line for line in out.splitlines()
              if "regressed" in line and "÷ wtacrs@0.3 · t5-base B=16 S=128" in line]
    assert "not a finite ratio" in row
    set_checks(results, [{"metric": "peak_bytes", "denominator": "wtacrs@0.3", "min": 1.0, "where": at}])
    code, out = check(results)
    assert code == 1 and "0 held, 1 regressed" in out and "t5-base B=16 S=128: not a finite ratio" in out


def test_a_baseline_records_the_kind_of_each_figure(results):
    doc = baseline_from_results(load_results(results))
    kinds = {(e["cell"]["model"], e["figures"]) for e in doc["ratios"]}
    # t5-small was measured on the CPU, t5-base estimated on meta for cuda kernels
    assert kinds == {("t5-small", FigureKind.MEASURED_CPU), ("t5-base", FigureKind.ESTIMATED_CUDA)}


def _as_meta_estimates(results: Path, model: str, peak_scale: float) -> None:
    rows = read_records(results)
    for row in rows:
        if row["params"]["model"] == model and row["status"] == "ok":
            row.update(status="estimated", device="meta", models_device="cuda", throughput=None)
            if row["params"]["method"] != "full":
                row["memory"]["peak_bytes"] = int(row["memory"]["peak_bytes"] * peak_scale)
    results.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_figures_of_another_kind_are_a_kind_mismatch_not_a_regression(results, tmp_path):
    path = tmp_path / "b.json"
    write_baseline(path, baseline_from_results(load_results(results)))
    set_checks(results, [])
    _as_meta_estimates(results, "t5-small", peak_scale=1.18)  # a meta run of the CPU cells: 15% "lower" ratios
    code, out = check(results, baseline=path)
    assert code == 0, out  # the estimated t5-base ratios were compared like with like and held
    assert "regressed" not in out.replace("0 regressed", "")
    assert "20 held, 0 regressed, 1 kind mismatch" in out
    assert "baseline measured (cpu), results estimated (meta → cuda): 19 ratio(s) not compared" in out


def test_a_baseline_of_another_kind_only_exits_2_with_one_line(results, tmp_path):
    path = tmp_path / "b.json"
    doc = baseline_from_results(load_results(results))
    doc["ratios"] = [e for e in doc["ratios"] if e["cell"]["model"] == "t5-small"]
    write_baseline(path, doc)
    set_checks(results, [])
    _as_meta_estimates(results, "t5-small", peak_scale=1.18)
    code, out = check(results, baseline=path)
    assert code == 2 and one_error_line(out), out
    assert "its ratios are measured (cpu) figures, these results estimated (meta → cuda) ones" in out


def test_a_baseline_without_figure_kinds_is_refused(results, tmp_path):
    path = tmp_path / "b.json"
    doc = baseline_from_results(load_results(results))
    doc["format"] = 1
    for entry in doc["ratios"]:
        del entry["figures"]
    path.write_text(json.dumps(doc))
    code, out = check(results, baseline=path)
    assert code == 2 and one_error_line(out)
    assert "records no figure kinds; regenerate it with --update-baseline" in out
    # --update-baseline rewrites it, keeping its tolerance
    assert check(results, baseline=path, update_baseline=True)[0] == 0
    assert read_baseline(path)["format"] == 3


def test_a_format_2_baseline_names_kinds_by_label_and_is_still_read(results, tmp_path):
    path = tmp_path / "b.json"
    doc = baseline_from_results(load_results(results))
    doc["format"] = 2
    for entry in doc["ratios"]:
        entry["figures"] = entry["figures"].label  # "measured (cpu)", "estimated (meta → cuda)"
    path.write_text(json.dumps(doc))
    set_checks(results, [])
    code, out = check(results, baseline=path)
    assert code == 0 and "39 held, 0 regressed" in out, out


def test_a_baseline_ratio_of_no_known_kind_exits_2_with_one_line(results, tmp_path):
    path = tmp_path / "b.json"
    doc = baseline_from_results(load_results(results))
    doc["ratios"][0]["figures"] = "measured (cpu)"  # a format 2 label in a format 3 file
    path.write_text(json.dumps(doc))
    code, out = check(results, baseline=path)
    assert code == 2 and one_error_line(out), out
    assert "ratios[0] needs a 'cell' object, a 'method', its 'figures' kind (measured-cpu" in out
