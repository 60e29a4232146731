"""The command line: bad input exits 2 with one line per problem and writes nothing; the smoke
suite runs end to end, and bad input in a real process has no traceback."""

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
    """What CI runs (.ci/run runs the smoke suite here, once): the smoke suite through the CLI --
    every cell measured on the CPU after its meta estimate, a report rendered -- then the gate: the
    suite's bounds and the committed baseline hold. (In this process: a subprocess would only add
    the imports; test_bad_input_in_a_real_process_has_no_traceback runs the CLI as a process.)"""
    out = tmp_path / "smoke"
    code, stdout, stderr = run_cli(["run", ROOT / "suites/smoke.yaml", "--out", out, "--quiet"], capsys)
    assert code == 0, stdout + stderr
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


# --- hostile input: one line on stderr, exit 2, no traceback, nothing written -----------------

FIXTURES = Path(__file__).parent / "fixtures"


def files_under(root: Path) -> dict[str, bytes | None]:
    """Every path under ``root`` with its bytes (None for a directory): what "nothing written" compares."""
    return {str(p.relative_to(root)): p.read_bytes() if p.is_file() else None for p in sorted(root.rglob("*"))}


def read_only_dir(path: Path, monkeypatch) -> Path:
    """A directory nobody may write to. Root writes through a 0o555 mode, so where the tests run as
    root, os.access answers for it what it answers any other user (access(2) is what the CLI asks)."""
    path.mkdir(exist_ok=True)
    path.chmod(0o555)
    if os.access(path, os.W_OK):
        real = os.access
        monkeypatch.setattr(os, "access", lambda p, mode, *a, **k: False if Path(p) == path and mode & os.W_OK
                            else real(p, mode, *a, **k))
    return path


def results_dir(tmp_path: Path, edit=None, suite_edit=None) -> Path:
    """The report fixture's results and suite.json in tmp_path/res, the first record changed by ``edit``."""
    out = tmp_path / "res"
    out.mkdir()
    rows = records.read_records(FIXTURES / "results.jsonl")
    if edit is not None:
        edit(rows[0])
    (out / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    suite = json.loads((FIXTURES / "suite.json").read_text())
    if suite_edit is not None:
        suite_edit(suite)
    (out / "suite.json").write_text(json.dumps(suite))
    return out / "results.jsonl"


def _suite(tmp_path: Path, extra: str = "", text: str = BASE) -> Path:
    path = tmp_path / "s.yaml"
    path.write_text(text + extra)
    return path


def _resume_on(content: str):
    def case(tmp_path, monkeypatch):
        out = tmp_path / "out"
        out.mkdir()
        (out / "results.jsonl").write_text(content)
        return ["run", _suite(tmp_path), "--out", out, "--resume"], f"{out / 'results.jsonl'}:1: not a cell record"
    return case


def _report_of(edit, reason: str, suite_edit=None):
    def case(tmp_path, monkeypatch):
        results = results_dir(tmp_path, edit, suite_edit)
        return ["report", results], f"{results}: {reason}" if edit else reason
    return case


HOSTILE = {
    "zero heads": lambda tmp_path, mp: (
        ["run", _suite(tmp_path, text=BASE.replace("model: t5-tiny", "model: {preset: bert-tiny, config: "
                                                   "{num_attention_heads: 0}}"))],
        "model.config.num_attention_heads: 0 must be a positive integer"),
    "NaN memory fraction": lambda tmp_path, mp: (
        ["run", _suite(tmp_path, "budgets: {memory_fraction: .nan}\n")],
        "budgets.memory_fraction: expected a finite number, got nan"),
    "infinite memory size": lambda tmp_path, mp: (
        ["run", _suite(tmp_path, "budgets: {memory_gib: [.inf]}\n")],
        "budgets.memory_gib[0]: expected a finite number, got inf"),
    "NUL in the name": lambda tmp_path, mp: (
        ["run", _suite(tmp_path, 'name: "a\\0b"\n')], "name: expected a non-empty name of printable characters"),
    "300-character name": lambda tmp_path, mp: (
        ["run", _suite(tmp_path, f"name: {'n' * 300}\n")], "name: expected at most 100 characters, got 300"),
    "run --out under a file": lambda tmp_path, mp: (
        (tmp_path / "f").write_text("x") and ["run", _suite(tmp_path), "--out", tmp_path / "f" / "out"],
        f"{tmp_path / 'f' / 'out'}: --out cannot be created: {tmp_path / 'f'} is a file"),
    "run --out in a read-only directory": lambda tmp_path, mp: (
        ["run", _suite(tmp_path), "--out", read_only_dir(tmp_path / "ro", mp) / "out"],
        f"{tmp_path / 'ro' / 'out'}: --out cannot be created: {tmp_path / 'ro'} is not writable"),
    "run --out with a name too long": lambda tmp_path, mp: (
        ["run", _suite(tmp_path), "--out", tmp_path / ("o" * 300)],
        f"{tmp_path / ('o' * 300)}: --out cannot be created: File name too long"),
    "report --out under a file": lambda tmp_path, mp: (
        (tmp_path / "f").write_text("x") and ["report", results_dir(tmp_path), "--out", tmp_path / "f" / "out"],
        f"{tmp_path / 'f' / 'out'}: --out cannot be created: {tmp_path / 'f'} is a file"),
    "report --out in a read-only directory": lambda tmp_path, mp: (
        ["report", results_dir(tmp_path), "--out", read_only_dir(tmp_path / "ro", mp)],
        f"{tmp_path / 'ro'}: --out cannot be created: {tmp_path / 'ro'} is not writable"),
    "report beside results in a read-only directory": lambda tmp_path, mp: (
        ["report", read_only_dir(results_dir(tmp_path).parent, mp) / "results.jsonl"],
        f"{tmp_path / 'res'}: --out cannot be created: {tmp_path / 'res'} is not writable"),
    "resume on {}": _resume_on("{}\n"),
    "resume on [1]": _resume_on("[1]\n"),
    "resume --overwrite": lambda tmp_path, mp: (
        ["run", _suite(tmp_path), "--resume", "--overwrite"],
        "argument --overwrite: not allowed with argument --resume"),
    "memory of the wrong type": _report_of(lambda r: r.update(memory=[1]),
                                           "record 1: memory: expected an object or null, got list"),
    "peak of the wrong type": _report_of(lambda r: r["memory"].update(peak_bytes="big"),
                                         "record 1: memory.peak_bytes: expected a number or null, got str"),
    "categories of the wrong type": _report_of(lambda r: r["memory"].update(categories=[3]),
                                               "record 1: memory.categories: expected an object or null, got list"),
    "throughput of the wrong type": _report_of(lambda r: r.update(throughput=5),
                                               "record 1: throughput: expected an object or null, got int"),
    "tokens/s of the wrong type": _report_of(lambda r: r.update(throughput={"tokens_per_s": [1]}),
                                             "record 1: throughput.tokens_per_s: expected a number or null, got list"),
    "activations of the wrong type": _report_of(lambda r: r.update(activations={"Linear-Q": 1}),
                                                "record 1: activations: expected a list or null, got dict"),
    "an activation item of the wrong type": _report_of(
        lambda r: r.update(activations=[1]), "record 1: activations[0]: expected an object, got int"),
    "activation bytes of the wrong type": _report_of(
        lambda r: r.update(activations=[{"operator": "Softmax", "category": "uncompressed", "bytes": "9"}]),
        "record 1: activations[0].bytes: expected an integer, got str"),
    "an infinite budget in suite.json": _report_of(
        None, "suite.json: memory budget inf is not a memory size",
        lambda s: s["budgets"].update(memory_gib=[float("inf")])),
    "grid beyond the cell limit": lambda tmp_path, mp: (
        ["run", _suite(tmp_path, text=BASE.replace("[2]", str(list(range(1, 1002)))))],
        "grid: 1001 cells, more than the limit of 1000 (raise it with --max-cells)"),
    "a cell limit below the grid": lambda tmp_path, mp: (
        ["run", _suite(tmp_path, text=BASE.replace("[2]", "[1, 2]")), "--max-cells", "1"],
        "grid: 2 cells, more than the limit of 1 (raise it with --max-cells)"),
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_input_exits_2_with_one_line_and_writes_nothing(case, tmp_path, capsys, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)  # the default --out, reports/<name>, would land here
    argv, reason = HOSTILE[case](work, monkeypatch)
    before = files_under(tmp_path)
    try:
        code, out, err = run_cli(argv, capsys)
    except SystemExit as e:  # argparse's usage errors
        code, (out, err) = e.code, capsys.readouterr()
    assert code == 2, err
    lines = err.splitlines()
    assert len(lines) == 1 and reason in lines[0], err
    assert out == ""
    assert files_under(tmp_path) == before


def test_rich_markup_in_out_is_printed_literally(write_suite, tmp_path, capsys, monkeypatch, fake_measure):
    import profiler.runner as runner

    monkeypatch.setattr(runner, "_default_measure", lambda: fake_measure)
    out = tmp_path / "a[/]b[bold]"
    code, stdout, err = run_cli(["run", write_suite(), "--out", out, "--only", "t5-tiny/full/B2", "--no-report"],
                                capsys)  # the live view, not --quiet
    assert code == 0, err
    assert f"-> {out / 'results.jsonl'}" in stdout and f"results in {out / 'results.jsonl'}" in stdout
    assert len(records.read_records(out / "results.jsonl")) == 1
    code, stdout, err = run_cli(["report", out / "results.jsonl", "--out", tmp_path / "[red]r[/]"], capsys)
    assert code == 0 and stdout == f"report: {tmp_path / '[red]r[/]' / 'report.html'}\n", err


def test_max_cells_lets_a_larger_grid_run(write_suite, tmp_path, capsys, monkeypatch, fake_measure):
    import profiler.runner as runner

    monkeypatch.setattr(runner, "_default_measure", lambda: fake_measure)
    args = ["run", write_suite(), "--out", tmp_path / "out", "--quiet", "--no-report"]
    code, _, err = run_cli(args + ["--max-cells", "7"], capsys)
    assert code == 2 and "grid: 8 cells, more than the limit of 7 (raise it with --max-cells)" in err
    code, stdout, _ = run_cli(args + ["--max-cells", "8"], capsys)
    assert code == 0 and "8 cells on meta" in stdout
    with pytest.raises(SystemExit) as info:
        cli.main([str(a) for a in args] + ["--max-cells", "0"])
    assert info.value.code == 2 and "argument --max-cells: expected 1 or more, got 0" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# estimate


def test_estimate_json_gives_peak_and_fits_per_method_and_batch(capsys):
    from profiler.fits import fits, needed_bytes

    code, out, err = run_cli(["estimate", "--model", "t5-tiny", "-B", "2,4", "-S", "16", "--methods",
                              "full,lora,wtacrs@0.3", "--budget", "24GB,0.51GiB", "--json"], capsys)
    assert code == 0, err
    doc = json.loads(out)
    assert doc["model"] == "t5-tiny" and [b["bytes"] for b in doc["budgets"]] == [24 * 10**9, int(0.51 * 2**30)]
    assert doc["margin"] == {"cuda_context_bytes": 2**29, "allocator_reserve": 0.1}
    rows = {(r["method"], r["batch_size"]): r for r in doc["rows"]}
    assert set(rows) == {(m, b) for m in ("full", "lora", "wtacrs@0.3") for b in (2, 4)}
    for row in rows.values():
        assert row["status"] == "estimated" and row["peak_bytes"] > 0 and row["seq_len"] == 16
        assert row["needed_bytes"] == int(needed_bytes(row["peak_bytes"]))
        assert row["fits"] == {b["label"]: fits(row["peak_bytes"], b["bytes"]) for b in doc["budgets"]}
    assert rows[("full", 4)]["peak_bytes"] > rows[("lora", 4)]["peak_bytes"]  # LoRA keeps no Adam state of W
    assert rows[("full", 2)]["peak_ratio"] == 1.0
    # the same figures as the suite runner's meta estimate of the same cell
    from profiler.runner import CellRunner
    from profiler.suite import parse_suite

    suite = parse_suite({"model": "t5-tiny", "grid": {"batch_size": [4], "seq_len": [16]}, "methods": ["lora"],
                         "device": "meta", "training": {"warmup_steps": 1, "timed_steps": 1}})
    assert CellRunner(suite, "meta").run(suite.cells()[0])["memory"]["peak_bytes"] == rows[("lora", 4)]["peak_bytes"]


def test_estimate_table_of_a_local_config_json(tmp_path, capsys):
    config = {"model_type": "bert", "architectures": ["BertForMaskedLM"], "hidden_size": 32, "num_hidden_layers": 1,
              "num_attention_heads": 2, "intermediate_size": 64, "vocab_size": 128, "transformers_version": "4.0",
              "some_unknown_key": 1}
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    code, out, err = run_cli(["estimate", "--model", path, "-B", "2", "-S", "8", "--methods", "full",
                              "--budget", "24GB", "--target", "h100-80gb"], capsys)
    assert code == 0, err
    assert "bert: estimated on meta for cuda" in out and "22.35 GiB" in out and "fits" in out
    assert "peak × 1.1 + 0.5 GiB" in out


def test_estimate_of_bert_tiny_at_two_batch_sizes_grows_with_b(capsys):
    code, out, err = run_cli(["estimate", "--model", "bert-tiny", "-B", "2,8", "-S", "32", "--methods", "full",
                              "--json"], capsys)
    assert code == 0, err
    small, large = sorted(json.loads(out)["rows"], key=lambda r: r["batch_size"])
    assert large["peak_bytes"] > small["peak_bytes"]


@pytest.mark.parametrize("argv, message", [
    (["--model", "t5-nope"], "--model 't5-nope': not a preset"),
    (["--model", "missing/config.json"], "--model missing/config.json: no such config file"),
    (["--model", "t5-tiny", "-B", "2,x"], "argument -B/--batch-sizes: expected a whole number, got 'x'"),
    (["--model", "t5-tiny", "--budget", "24TB"], "'24TB' is not a memory size"),
    (["--model", "t5-tiny", "--methods", "full,wtacrs@2"], "methods[1]: ratio 2 is not in (0, 1]"),
    (["--model", "t5-tiny", "-S", "0"], "expected 1 or more, got 0"),
])
def test_estimate_bad_input_exits_2_with_one_line(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    try:
        code = cli.main(["estimate", *argv])
    except SystemExit as e:  # argparse's usage errors
        code = e.code
    out, err = capsys.readouterr()
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and message in err, err
    assert list(tmp_path.iterdir()) == []


def test_estimate_of_a_config_of_no_supported_family_exits_2(tmp_path, capsys):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"model_type": "whisper"}))
    code, out, err = run_cli(["estimate", "--model", path], capsys)
    assert code == 2 and "model_type 'whisper' is not a supported family" in err


def test_estimate_help_lists_the_presets(capsys):
    from profiler.models import PRESETS

    with pytest.raises(SystemExit):
        cli.main(["estimate", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert all(name in out for name in PRESETS)


def test_non_tty_run_output_lists_every_cell():
    import io

    from rich.console import Console

    console = Console(file=io.StringIO(), width=200)
    assert not console.is_terminal
    observer = cli._LiveObserver(console)
    assert observer.rows.maxlen is None
    for i in range(cli._LiveObserver.ROWS + 5):
        observer.rows.append({"cell_id": f"m/full/B{i}", "status": "estimated", "device": "meta"})
    console.print(observer._table())
    text = console.file.getvalue()
    assert all(f"m/full/B{i} " in text for i in range(cli._LiveObserver.ROWS + 5))
HEAVY_MODULES = ("torch", "transformers", "peft", "pandas", "matplotlib", "wtacrs")


@pytest.mark.parametrize("argv", [["--help"], ["run", "--help"], ["report", "--help"], ["check", "--help"]])
def test_help_imports_no_torch_transformers_or_peft(argv):
    code = (
        "import sys\n"
        "from profiler.cli import main\n"
        "try:\n"
        f"    main({argv!r})\n"
        "except SystemExit as e:\n"
        "    assert e.code == 0, e.code\n"
        f"print(sorted(m for m in {HEAVY_MODULES!r} if m in sys.modules))\n"
    )
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "usage: python -m profiler" in done.stdout
    assert done.stdout.strip().splitlines()[-1] == "[]"
