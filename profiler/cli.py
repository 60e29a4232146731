"""python -m profiler: run suites, render reports, check memory ratios.

Exit codes: 0 success; 1 a cell failed with status "error" (run), a ratio regressed (check),
or the report could not be rendered; 2 bad input (one line per problem on stderr, nothing
written); 130 interrupted (finished cells are kept: rerun with --resume).
"""

from __future__ import annotations

import argparse
import os
import sys
import textwrap
from collections import deque
from pathlib import Path
from typing import NoReturn

from rich.console import Console, Group
from rich.live import Live
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table
from rich.text import Text

from profiler import records
from profiler.methods import METHOD_NAMES_HELP
from profiler.results import metric_value
from profiler.gpus import DEFAULT_TARGET, GPUS
from profiler.limits import MAX_CELLS
from profiler.terminal import printable
from profiler.units import format_bytes, format_count, format_seconds

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT, EXIT_INTERRUPTED = 0, 1, 2, 130
STATUS_STYLES = {"ok": "green", "estimated": "cyan", "oom": "yellow", "error": "bold red", "skipped": "dim"}


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr (exit 2), like every other bad input."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: error: {printable(message)} (see --help)\n")


def _say(text: object, file=None) -> None:
    """Print one line of plain text; user strings in it are shown inert (``printable``)."""
    print(printable(text), file=file or sys.stdout, flush=True)


def _bad_input(lines: list[str]) -> int:
    for line in lines:
        _say(line, sys.stderr)
    return EXIT_BAD_INPUT


def _non_negative(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected 0 or more, got {value}")
    return value


def _positive(text: str) -> int:
    value = _non_negative(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected 1 or more, got {value}")
    return value


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"expected a fraction in [0, 1), got {value:g}")
    return value


def _out_dir_problem(out: Path) -> str | None:
    """Why ``out`` cannot be made the output directory, or None; creates nothing.

    Walks up to the nearest existing path: it must be a directory that this process may write to
    (``os.access``: a read-only mount or mode, as the kernel answers for this user).
    """
    if "\0" in str(out):
        return f"{out!r}: --out cannot be created: it holds a NUL byte"
    probe = out
    while True:
        try:
            probe.stat()
            break
        except (FileNotFoundError, NotADirectoryError) as e:  # missing, or under a file: look further up
            if probe.parent == probe:  # a vanished working directory
                return f"{out}: --out cannot be created: {e.strerror}"
            probe = probe.parent
        except OSError as e:  # a name too long, a loop of links, ...
            return f"{out}: --out cannot be created: {e.strerror}"
    if not probe.is_dir():
        return f"{out}: --out is a file, not a directory" if probe == out else \
            f"{out}: --out cannot be created: {probe} is a file"
    if not os.access(probe, os.W_OK | os.X_OK):
        return f"{out}: --out cannot be created: {probe} is not writable"
    return None


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m profiler", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser, metavar="COMMAND")

    run = commands.add_parser(
        "run", help="measure every cell of a suite", description=(
            "Measure every cell of a suite (models x grid x methods) and append one record per cell to "
            "OUT/results.jsonl, then render the report. Methods: " + METHOD_NAMES_HELP + ". Every single-device "
            "cell gets a step time: measured where it ran, else a roofline estimate for the suite's training.target GPU "
            f"(default {DEFAULT_TARGET}; one of {', '.join(GPUS)})."
        ),
    )
    run.add_argument("suite", type=Path, metavar="SUITE.yaml", help="the suite file (see suites/)")
    run.add_argument("--device", choices=("auto", "cpu", "cuda", "meta"),
                     help="override the suite's device (auto: cuda if present, else CPU where the meta "
                          "estimate fits the budgets at fixed nominal CPU rates, else the estimate)")
    run.add_argument("--out", type=Path, metavar="DIR", help="output directory (default: reports/<suite name>/)")
    existing = run.add_mutually_exclusive_group()
    existing.add_argument("--resume", action="store_true",
                          help="keep the finished cells of OUT/results.jsonl whose settings are unchanged, run the rest")
    existing.add_argument("--overwrite", action="store_true", help="discard existing results in OUT")
    run.add_argument("--max-cells", type=_positive, default=MAX_CELLS, metavar="N",
                     help=f"run a suite of up to N cells (default {MAX_CELLS}: a larger grid is refused before "
                          "anything is expanded, as most likely a typo)")
    run.add_argument("--only", metavar="FILTER",
                     help="run the cells whose id contains FILTER (or matches it as a glob, e.g. 't5-base/*/B64-*')")
    run.add_argument("--quiet", action="store_true", help="one plain line per cell (for CI logs) instead of the live view")
    run.add_argument("--jobs", type=_non_negative, default=1, metavar="N",
                     help="estimate on meta in N worker processes (0: one per CPU core; default 1)")
    run.add_argument("--no-report", action="store_true", help="do not render the report at the end")
    run.set_defaults(handler=_run)

    report = commands.add_parser("report", help="render the HTML report of a results file",
                                 description="Render one self-contained HTML page and PNG plots from results.jsonl.")
    report.add_argument("results", type=Path, metavar="RESULTS.jsonl")
    report.add_argument("--out", type=Path, metavar="DIR", help="output directory (default: beside RESULTS)")
    report.set_defaults(handler=_report)

    check = commands.add_parser("check", help="check memory ratios against the suite's bounds or a baseline",
                                description="Exit 0 if every ratio held, 1 on a regression, 2 on bad input.")
    check.add_argument("results", type=Path, metavar="RESULTS.jsonl")
    check.add_argument("--baseline", type=Path, metavar="reports/baselines/NAME.json", help="committed baseline ratios")
    check.add_argument("--update-baseline", action="store_true", help="write the baseline from these results")
    check.add_argument("--tolerance", type=_fraction, metavar="F",
                       help="with --update-baseline: the relative drop of a ratio that counts as a regression "
                            "(default: the existing baseline's, else 0.05)")
    check.set_defaults(handler=_check)
    _add_estimate(commands)
    return parser


def _sizes(text: str) -> list[int]:
    """``8,16,32`` -> [8, 16, 32]: positive whole numbers, comma-separated."""
    return [_positive(part.strip()) for part in text.split(",")]  # repeats: the suite's grid says so


def _budget_list(text: str) -> list[int]:
    from profiler.fits import parse_budget

    try:
        return [parse_budget(part) for part in text.split(",")]
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _method_list(text: str) -> list[str]:
    names = [part.strip() for part in text.split(",")]
    if not all(names):
        raise argparse.ArgumentTypeError(f"an empty method name in {text!r}")
    return names


def _add_estimate(commands) -> None:
    from profiler.fits import MARGIN_NOTE
    from profiler.presets import PRESETS

    # wrapped here, not by argparse, so that no preset name is split at its hyphens
    description = "\n\n".join(textwrap.fill(text, 90, break_on_hyphens=False) for text in (
        "Estimate the peak memory (and, where available, the step time) of one training step per method and "
        "batch size on the meta device, modelling cuda kernels, and say which memory budgets each fits.",
        MARGIN_NOTE, "Presets: " + ", ".join(PRESETS) + "."))
    estimate = commands.add_parser(
        "estimate", help="does a fine-tuning step fit a GPU? (meta estimates, no suite file)",
        description=description, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    estimate.add_argument("--model", required=True, metavar="PRESET|config.json",
                          help="a preset (listed above) or a local Hugging Face config.json (model_type picks the family)")
    estimate.add_argument("-B", "--batch-sizes", type=_sizes, default=[8, 16, 32], metavar="8,16,32",
                          help="batch sizes (default 8,16,32)")
    estimate.add_argument("-S", "--seq-len", type=_positive, default=512, metavar="N", help="sequence length (default 512)")
    estimate.add_argument("-T", "--target-len", type=_positive, metavar="N",
                          help="target length of encoder-decoder models (default: the sequence length)")
    estimate.add_argument("--methods", type=_method_list, default=["full", "lora", "wtacrs@0.3"], metavar="LIST",
                          help="comma-separated methods (default full,lora,wtacrs@0.3): " + METHOD_NAMES_HELP)
    estimate.add_argument("--budget", type=_budget_list, default=None, metavar="24GB",
                          help="memory budgets, comma-separated: 24GB (10^9 bytes) or 22.35GiB (2^30 bytes); "
                               "default 80GiB,40GiB,24GiB")
    estimate.add_argument("--target", metavar="GPU", help="the GPU estimated step times are for (e.g. h100-80gb)")
    estimate.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    estimate.add_argument("--optimizer", choices=("adamw", "sgd"), default="adamw")
    estimate.add_argument("--attn", choices=("eager", "sdpa"), default="eager", help="attention implementation")
    estimate.add_argument("--json", action="store_true", help="print the rows as JSON instead of a table")
    estimate.set_defaults(handler=_estimate)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.handler(args)


# ---------------------------------------------------------------------------------------------
# run


def _peak(record: records.Record) -> str:
    return format_bytes(metric_value(record, "peak_bytes"), missing="-")


def _saved(record: records.Record) -> str:
    """Bytes saved for backward (the breakdown's total; the peak's category may be lower)."""
    return format_bytes(metric_value(record, "activation_bytes"), missing="-")


def _tokens_per_s(record: records.Record) -> str:
    return format_count((record.get("throughput") or {}).get("tokens_per_s"), missing="-")


def _summary_line(index: int, total: int, record: records.Record) -> str:
    width = len(str(total))
    line = (
        f"[{index:>{width}}/{total}] {printable(record['cell_id'])}  {record['status']}  "
        f"peak {_peak(record)}  saved {_saved(record)}  tok/s {_tokens_per_s(record)}"
    )
    step = (record.get("throughput") or {}).get("step_time_s")
    if step is not None:
        kind = (record.get("throughput") or {}).get("kind") == "estimated"
        line += f"  step {format_seconds(step)}" + (f" (estimated, {printable(record['throughput'].get('target'))})" if kind else "")
    if record.get("message") and record["status"] not in ("ok",):
        line += f"  ({printable(record['message'].splitlines()[0])})"
    elif (record.get("policy") or {}).get("choice") == "cpu":
        line += f"  (CPU run: {printable(record['policy'].get('reason'))})"
    return line


class _QuietObserver:
    def __init__(self, console: Console):
        self.console, self.done, self.total = console, 0, 0

    def started(self, plan) -> None:
        skipped = len(plan.cells) - len(plan.todo)
        note = f", {skipped} already finished" if skipped else ""
        self.total = len(plan.todo)
        _say(f"{plan.suite.name}: {len(plan.todo)} cells on {plan.device}{note} -> {plan.results_path}")
        if plan.superseded:
            _say(plan.superseded_note())

    def cell_started(self, cell, index) -> None:
        pass

    def cell_finished(self, cell, record) -> None:
        self.done += 1
        _say(_summary_line(self.done, self.total, record))


class _LiveObserver:
    """A progress bar over the cells and a table of the latest results (rich.live): the last
    ``ROWS`` cells on a terminal, every cell when the output is not one."""

    ROWS = 12

    def __init__(self, console: Console):
        self.console = console
        # the suite name and the cell ids are user strings: no markup in these columns
        self.progress = Progress(
            TextColumn("{task.description}", style="bold", markup=False), BarColumn(), MofNCompleteColumn(),
            TimeElapsedColumn(), TextColumn("{task.fields[current]}", markup=False), console=console,
        )
        # a terminal shows the latest ROWS cells live; anything else (a file, a CI log) gets the
        # table once, at the end, so it holds every cell
        self.rows: deque[records.Record] = deque(maxlen=self.ROWS if console.is_terminal else None)
        self.counts: dict[str, int] = {}
        self.live: Live | None = None
        self.task = None

    def _table(self) -> Table:
        table = Table(expand=False, title_justify="left")
        for column, justify in (("cell", "left"), ("status", "left"), ("device", "left"), ("peak", "right"),
                                ("saved for backward", "right"), ("tokens/s", "right")):
            # the cell id is what a reader scans for: fold it rather than cut it
            table.add_column(column, justify=justify, overflow="fold" if column == "cell" else "ellipsis",
                             no_wrap=column != "cell")
        for record in self.rows:
            style = STATUS_STYLES.get(record["status"], "")
            table.add_row(
                Text(printable(record["cell_id"])), Text(record["status"], style=style),
                Text(printable(record.get("device"))),
                _peak(record), _saved(record), _tokens_per_s(record),
            )
        table.caption = "  ".join(f"{status}: {n}" for status, n in sorted(self.counts.items())) or None
        return table

    def _render(self) -> Group:
        return Group(self.progress, self._table())

    def started(self, plan) -> None:
        skipped = len(plan.cells) - len(plan.todo)
        note = f" ({skipped} already finished)" if skipped else ""
        self.console.print(Text.assemble((printable(plan.suite.name), "bold"), printable(
            f": {len(plan.todo)} cells on {plan.device}{note} -> {plan.results_path}")), soft_wrap=True)
        if plan.superseded:
            self.console.print(Text(printable(plan.superseded_note()), style="dim"), soft_wrap=True)
        self.task = self.progress.add_task(printable(plan.suite.name), total=len(plan.todo), current="")
        self.live = Live(self._render(), console=self.console, refresh_per_second=4, transient=False)
        self.live.start()

    def cell_started(self, cell, index) -> None:
        self.progress.update(self.task, current=printable(cell.cell_id))

    def cell_finished(self, cell, record) -> None:
        self.rows.append(record)
        self.counts[record["status"]] = self.counts.get(record["status"], 0) + 1
        self.progress.update(self.task, advance=1, current="")
        self.live.update(self._render())

    def stop(self) -> None:
        if self.live is not None:
            self.live.stop()


def _run_launch(args: argparse.Namespace) -> int:
    """``torchrun ... -m profiler run``: rank 0 runs and writes the suite, the others follow it
    (``profiler.distributed_run``)."""
    from profiler import distributed_run
    from profiler.suite import SuiteError, load_suite

    distributed_run.init_launch()
    try:
        if distributed_run.dist_rank() == 0:
            args.jobs, args.quiet = 1, True
            return _run(args, launched=True)
        try:
            suite = load_suite(args.suite, max_cells=args.max_cells)
        except SuiteError:  # rank 0 says why, once
            suite = None
        distributed_run.follow(suite)
        return EXIT_OK
    finally:
        distributed_run.finish()


def _run(args: argparse.Namespace, launched: bool = False) -> int:
    from profiler.runner import RunInputError, default_out_dir, plan_run, run_suite
    from profiler.suite import SuiteError, load_suite

    if not launched:
        from profiler.distributed_run import launched_by_torchrun

        if launched_by_torchrun():
            return _run_launch(args)

    try:
        suite = load_suite(args.suite, max_cells=args.max_cells)
        problem = _out_dir_problem(args.out or default_out_dir(suite))
        if problem:
            return _bad_input([problem])
        plan = plan_run(suite, args.out, device=args.device, resume=args.resume, only=args.only,
                        overwrite=args.overwrite)
    except (SuiteError, RunInputError) as e:
        return _bad_input(e.lines)
    console = Console(highlight=False)
    observer = _QuietObserver(console) if args.quiet else _LiveObserver(console)
    try:
        result = run_suite(plan, observer=observer, jobs=args.jobs or os.cpu_count() or 1)
    except RunInputError as e:  # the output directory, checked again under its lock
        return _bad_input(e.lines)
    except KeyboardInterrupt:
        _say(f"interrupted: finished cells are in {plan.results_path}; rerun with --resume", sys.stderr)
        return EXIT_INTERRUPTED
    except RuntimeError as e:  # the runner's own setup (e.g. no measurement backend)
        _say(f"python -m profiler run: {e}", sys.stderr)
        return EXIT_FAILED
    finally:
        if isinstance(observer, _LiveObserver):
            observer.stop()
    summary = ", ".join(f"{n} {status}" for status, n in sorted(result.statuses.items())) or "nothing to run"
    _say(f"{plan.suite.name}: {summary}; results in {result.results_path}")
    code = EXIT_FAILED if result.statuses.get("error") else EXIT_OK
    if not args.no_report:
        from profiler.report import render_report

        try:
            html = render_report(result.results_path, result.out_dir)
        except Exception as e:  # noqa: BLE001 -- the measurements are safe; say why the page is not
            _say(f"{result.results_path}: report not rendered: {type(e).__name__}: {e}", sys.stderr)
            return EXIT_FAILED
        _say(f"report: {html}")
    return code


# ---------------------------------------------------------------------------------------------
# report / check


def _results_problem(path: Path) -> str | None:
    if not path.exists():
        return f"{path}: results file not found"
    if not path.is_file():
        return f"{path}: not a results file"
    try:
        records.read_records(path)
    except (ValueError, OSError, UnicodeDecodeError) as e:
        return f"{path}: unreadable results: {e}"
    return None


def _report(args: argparse.Namespace) -> int:
    problem = _results_problem(args.results) or _out_dir_problem(args.out or args.results.parent)
    if problem:
        return _bad_input([problem])
    from profiler.report import render_report
    from profiler.results import ResultsError

    try:
        html = render_report(args.results, args.out)
    except ResultsError as e:  # its message names the file and the problem
        return _bad_input([str(e)])
    except (ValueError, KeyError) as e:
        return _bad_input([f"{args.results}: cannot render: {e}"])
    _say(f"report: {html}")
    return EXIT_OK


def _check(args: argparse.Namespace) -> int:
    problem = _results_problem(args.results)
    if problem:
        return _bad_input([problem])
    from profiler.check import run_check

    if args.tolerance is not None and not args.update_baseline:
        return _bad_input(["--tolerance applies with --update-baseline only"])
    return run_check(args.results, args.baseline, args.update_baseline, Console(highlight=False),
                     tolerance=args.tolerance)


# ---------------------------------------------------------------------------------------------
# estimate


def _estimate(args: argparse.Namespace) -> int:
    import json

    from profiler.estimate import EstimateInputError, estimate_fits
    from profiler.report import DEFAULT_BUDGETS_GIB
    from profiler.units import GiB

    budgets = args.budget or [int(b * GiB) for b in DEFAULT_BUDGETS_GIB]
    try:
        result = estimate_fits(args.model, args.batch_sizes, args.seq_len, args.methods, budgets, target=args.target,
                               target_len=args.target_len, dtype=args.dtype, optimizer=args.optimizer,
                               attn_implementation=args.attn)
    except EstimateInputError as e:
        return _bad_input([f"python -m profiler estimate: {e}"])
    if args.json:
        print(json.dumps(result.to_json(), indent=2, ensure_ascii=False))
    else:
        console = Console(highlight=False)
        console.print(_estimate_table(result))
    return EXIT_FAILED if any(row["status"] == "error" for row in result.rows) else EXIT_OK


def _estimate_table(result) -> Table:
    """A rich table of an ``Estimate``: per method and batch size, peak, memory needed, step time
    and whether each budget fits."""
    from profiler.fits import MARGIN_NOTE, budget_label

    table = Table(title=Text(printable(f"{result.model}: estimated on meta for cuda")), title_justify="left",
                  caption=MARGIN_NOTE, caption_justify="left")
    for column in ("method", "B", "peak", "needed", "step time", "time ÷ full"):
        table.add_column(column, justify="left" if column == "method" else "right")
    for budget in result.budgets:
        table.add_column(budget_label(budget), justify="center")
    for row in result.rows:
        step = row["step_time_s"]
        step_text = "-" if step is None else format_seconds(step) + (" est." if row["step_time_kind"] == "estimated" else "")
        ratio = "-" if row["time_ratio"] is None else f"{row['time_ratio']:.2f}×"
        fits = [Text("fits", style="green") if row["fits"].get(budget_label(b)) else
                Text("no", style="red") if budget_label(b) in row["fits"] else Text(row["status"], style="yellow")
                for b in result.budgets]
        table.add_row(Text(printable(row["method"])), str(row["batch_size"]),
                      format_bytes(row["peak_bytes"], missing="-"), format_bytes(row["needed_bytes"], missing="-"),
                      step_text, ratio, *fits)
    return table
