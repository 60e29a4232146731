"""What the command line prints: user strings can neither drive the terminal nor inject rich markup."""

from __future__ import annotations

import pytest

from profiler import cli, records
from profiler import methods as methods_table

HOSTILE = "\x1b[2J\x1b[31mboom\r\nsecond line\x07 [bold red]markup[/] \u202eevil"


def test_printable_makes_control_characters_visible():
    from profiler.terminal import printable

    assert printable(HOSTILE) == ("\\x1b[2J\\x1b[31mboom\\r\\nsecond line\\x07 [bold red]markup[/] \\u202eevil")
    assert printable("t5-base/wtacrs@0.3/B64-S128 · 2.6×") == "t5-base/wtacrs@0.3/B64-S128 · 2.6×"
    assert printable(3) == "3"


def _hostile_method(monkeypatch):
    def explode(model, family, ratio, seed):
        raise ValueError(HOSTILE)

    monkeypatch.setattr(methods_table, "METHODS",
                        methods_table.METHODS + (methods_table.MethodEntry("boom", explode, "fails"),))


@pytest.mark.parametrize("quiet", [True, False])
def test_run_output_shows_user_strings_inert(quiet, write_suite, tmp_path, capsys, monkeypatch, fake_measure):
    import profiler.runner as runner

    monkeypatch.setattr(runner, "_default_measure", lambda: fake_measure)
    _hostile_method(monkeypatch)
    text = (write_suite().read_text().replace("methods: [full, lora]", "methods: [boom]").split("checks:")[0]
            .replace("name: tiny", "name: '[bold red]tiny'"))
    out = tmp_path / "[/]out[bold]\x1b[31m"
    code = cli.main(["run", str(write_suite(text)), "--out", str(out), "--no-report"] + (["--quiet"] if quiet else []))
    stdout, stderr = capsys.readouterr()
    assert code == 1  # the cells failed, and said so
    assert records.read_records(out / "results.jsonl")[0]["message"] == f"ValueError: {HOSTILE}"
    shown = stdout + stderr
    assert not set(shown) & {"\x1b", "\r", "\x07", "\u202e"}, shown
    # the header names the suite and the output as the text they are
    shown_out = f"{tmp_path}/[/]out[bold]\\x1b[31m/results.jsonl"
    assert f"[bold red]tiny: 4 cells on meta -> {shown_out}\n" in shown
    assert f"[bold red]tiny: 4 error; results in {shown_out}\n" in shown
    if quiet:  # one line per cell, its message escaped
        lines = [line for line in stdout.splitlines() if "/boom/" in line]
        assert len(lines) == 4 and all(line.endswith("(ValueError: \\x1b[2J\\x1b[31mboom)") for line in lines)


def test_bad_input_lines_show_user_strings_inert(tmp_path, capsys):
    suite = tmp_path / "bad\x1b[31m.yaml"
    code = cli.main(["run", str(suite)])
    _, err = capsys.readouterr()
    assert code == 2 and err == f"{tmp_path}/bad\\x1b[31m.yaml: suite file not found\n"
