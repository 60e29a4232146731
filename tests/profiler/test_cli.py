"""The command line: bad input exits 2 with one line per problem and writes nothing; the smoke
suite runs end to end in a subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from profiler import cli, records

ROOT = Path(__file__).resolve().parents[2]
BASE = "model: t5-tiny\ngrid: {batch_size: [2], seq_len: [8]}\nmethods: [full]\n"

# one representative per kind of bad input; test_suite.py pins every message
BAD = {
    "unknown key": (BASE + "trainig: {}\n", "trainig: unknown key; did you mean 'training'?"),
    "wrong type": (BASE.replace("[2]", "two"), "grid.batch_size[0]: expected an integer, got str 'two'"),
    "n_head does not divide d_model": (BASE.replace("seq_len: [8]", "seq_len: [8], n_head: [3]"),
                                       "grid.n_head: t5-tiny: n_head 3 does not divide d_model 64"),
    "empty grid": (BASE.replace("[2]", "[]"), "grid.batch_size: empty list"),
    "unknown method": (BASE.replace("[full]", "[ful]"), "methods[0]: unknown method 'ful'"),
    "bad yaml": (BASE + "checks: [\n", "YAML syntax error"),
}


def run_cli(argv, capsys):
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("case", list(BAD))
def test_bad_suite_exits_2_with_one_line_and_writes_nothing(case, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    text, reason = BAD[case]
    suite = tmp_path / "bad.yaml"
    suite.write_text(text)
    before = sorted(p.name for p in tmp_path.iterdir())
    code, out, err = run_cli(["run", suite, "--out", tmp_path / "out"], capsys)
    assert code == 2
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{suite}:") and reason in lines[0], err
    assert out == ""
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # not even the out dir, nor reports/


def test_missing_suite_file_exits_2(tmp_path, capsys):
    code, _, err = run_cli(["run", tmp_path / "absent.yaml", "--out", tmp_path / "out"], capsys)
    assert code == 2 and err == f"{tmp_path / 'absent.yaml'}: suite file not found\n"
    assert not (tmp_path / "out").exists()


def test_bad_input_in_a_real_process_has_no_traceback(tmp_path):
    suite = tmp_path / "bad.yaml"
    suite.write_text(BASE + "device: gpu\nbudgets: {memory_fraction: 2}\n")
    proc = subprocess.run([sys.executable, "-m", "profiler", "run", str(suite), "--out", str(tmp_path / "out")],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [
        f"{suite}:4: device: 'gpu' is not allowed; did you mean 'cpu'? (expected one of auto, cpu, cuda, meta)",
        f"{suite}:5: budgets.memory_fraction: 2 must be > 0 and <= 1",
    ]
    assert proc.stdout == "" and not (tmp_path / "out").exists()


@pytest.mark.parametrize("argv, message", [
    (["run"], "the following arguments are required: SUITE.yaml"),
    (["run", "suites/smoke.yaml", "--device", "tpu"], "argument --device: invalid choice: 'tpu'"),
    (["frobnicate"], "invalid choice: 'frobnicate'"),
])
def test_usage_errors_are_one_line(argv, message, capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(argv)
    _, err = capsys.readouterr()
    assert info.value.code == 2 and len(err.splitlines()) == 1 and message in err


def test_only_matching_no_cell_exits_2(tmp_path, capsys):
    code, _, err = run_cli(["run", ROOT / "suites/smoke.yaml", "--out", tmp_path / "out", "--only", "gpt9"], capsys)
    assert code == 2 and "--only 'gpt9': matches none of the suite's 18 cell ids" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a machine without cuda")
def test_cuda_without_cuda_exits_2(tmp_path, capsys):
    code, _, err = run_cli(["run", ROOT / "suites/smoke.yaml", "--out", tmp_path / "o", "--device", "cuda"], capsys)
    assert code == 2 and "device: cuda requested but torch.cuda.is_available() is False" in err
    assert not (tmp_path / "o").exists()


def test_existing_results_without_resume_exit_2_and_stay(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "results.jsonl").write_text('{"cell_id": "x", "status": "ok"}\n')
    code, _, err = run_cli(["run", ROOT / "suites/smoke.yaml", "--out", out], capsys)
    assert code == 2 and "pass --resume to continue them or --overwrite" in err
    assert (out / "results.jsonl").read_text() == '{"cell_id": "x", "status": "ok"}\n'
    assert sorted(p.name for p in out.iterdir()) == ["results.jsonl"]


@pytest.mark.parametrize("command", ["report", "check"])
def test_report_and_check_of_a_missing_file_exit_2(command, tmp_path, capsys):
    code, _, err = run_cli([command, tmp_path / "none.jsonl"], capsys)
    assert code == 2 and err == f"{tmp_path / 'none.jsonl'}: results file not found\n"


def test_report_of_a_corrupt_file_exits_2(tmp_path, capsys):
    path = tmp_path / "results.jsonl"
    path.write_text("not json\n{}\n")
    code, _, err = run_cli(["report", path], capsys)
    assert code == 2 and err.startswith(f"{path}: unreadable results:") and len(err.splitlines()) == 1


@pytest.mark.parametrize("command", [[], ["run"], ["report"], ["check"]])
def test_help_everywhere(command, capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(command + ["--help"])
    assert info.value.code == 0 and "usage:" in capsys.readouterr().out


def test_run_meta_then_resume_via_cli(write_suite, tmp_path, capsys, monkeypatch, fake_measure):
    import profiler.runner as runner

    monkeypatch.setattr(runner, "_default_measure", lambda: fake_measure)
    out = tmp_path / "out"
    code, stdout, _ = run_cli(["run", write_suite(), "--out", out, "--quiet", "--no-report"], capsys)
    assert code == 0 and "[8/8] bert-tiny/lora/B3-S8-D64-H4  estimated" in stdout
    rows = records.read_records(out / "results.jsonl")
    (out / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:5]))
    code, stdout, _ = run_cli(["run", write_suite(), "--out", out, "--quiet", "--no-report", "--resume"], capsys)
    assert code == 0 and "3 cells on meta, 5 already finished" in stdout
    assert len(records.read_records(out / "results.jsonl")) == 8


@pytest.mark.slow
def test_smoke_suite_end_to_end(tmp_path, capsys):
    """What CI runs (.ci/run): the smoke suite through the real CLI in a subprocess -- every cell
    measured on the CPU after its meta estimate, a report rendered -- then the gate: the suite's
    bounds and the committed baseline hold."""
    out = tmp_path / "smoke"
    env = {**os.environ, "MPLBACKEND": "Agg"}
    proc = subprocess.run([sys.executable, "-m", "profiler", "run", "suites/smoke.yaml", "--out", str(out), "--quiet"],
                          cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = records.read_records(out / "results.jsonl")
    assert len(rows) == 18 and {r["status"] for r in rows} == {"ok"}  # 3 models x 6 methods
    for row in rows:
        assert row["device"] == "cpu" and row["estimate"]["models_device"] == "cuda"
        assert row["memory"]["peak_bytes"] > 0 and row["throughput"]["tokens_per_s"] > 0
        assert sum(item["bytes"] for item in row["activations"]) > 0
    assert {p.name for p in out.iterdir()} >= {"suite.json", "results.csv", "report.html", "peak_memory.png"}
    code = cli.main(["check", str(out / "results.jsonl"), "--baseline", str(ROOT / "reports/baselines/smoke.json")])
    stdout = capsys.readouterr().out
    assert code == 0, stdout
    assert "0 regressed" in stdout and "have no cells" not in stdout  # every baseline ratio was checked
