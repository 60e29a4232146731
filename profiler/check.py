"""The CI gate: ``run_check(results.jsonl) -> 0 | 1 | 2``.

Two kinds of checks, both on memory ratios ``numerator / denominator`` (``full`` over a method by
default, so higher means the method saves more) computed per grid point: two cells are paired when
all their parameters but ``method`` are equal, and compared through figures of one kind
(``report.comparable``: both measured on one device, or both estimates of one device); a pair
whose figures differ in kind is left out and counted.

- **Bounds**, from the ``checks`` list of the ``suite.json`` beside the results::

      {"metric": "peak_bytes" | "activation_bytes", "numerator": "full", "denominator": "wtacrs@0.3",
       "min": 2.5, "max": 4.0, "where": {"seq_len": 128}}

  Every matched grid point must lie in ``[min, max]``. ``where`` values may be lists (any of).
  A check that matches no usable pair is a regression named "no data".
- **A committed baseline** (``reports/baselines/<suite>.json``, written by ``update_baseline``)::

      {"format": 2, "suite": "...", "metric": "peak_bytes", "numerator": "full", "tolerance": 0.05,
       "ratios": [{"cell": {<grid point>}, "method": "wtacrs@0.3", "figures": "measured (cpu)",
                   "ratio": 2.6134}, ...]}

  ``figures`` is the kind of figures the ratio came from (``report.figures_label``: ``measured
  (cpu)``, ``measured (cuda)``, ``estimated (meta → cuda)``...); a baseline holds every kind its
  run had (a ``device: auto`` CPU run also carries its meta estimates). A ratio is compared with
  the results' ratio of the same kind only: more than ``tolerance`` (relative) below is a
  regression; more than ``tolerance`` above is held and reported "improved". Where the results
  have the cell with figures of other kinds only, the ratio is a **kind mismatch**: not compared,
  neither held nor regressed, and counted in its own row; when nothing at all could be compared
  like with like, the baseline is bad input (exit 2). Cells absent from the results are not run,
  and only counted.

Failed cells: ``error`` on either side of a pair, or ``oom`` of the method under test (the
denominator), is a regression; ``oom`` of the numerator and ``skipped`` cells are left out and
counted. A ratio that is not a finite positive number (a NaN or infinite figure) is a regression
that says so: NaN compares False with every bound, and would hold. Exit codes: 0 all held, 1 a
regression, 2 bad input (one line, no traceback).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from rich.console import Console
from rich.table import Table
from rich.text import Text

from profiler.suite import Check, problem_lines
from profiler.terminal import printable

from profiler.report import (
    BASELINE_METHOD,
    FIGURE_STATUSES,
    METRICS,
    SHORT_NAMES,
    Results,
    ResultsError,
    comparable,
    grid_key,
    grid_point,
    load_results,
    method_of,
    record_figures,
)

BASELINE_FORMAT = 2  # 2: each ratio names its figure kind
DEFAULT_TOLERANCE = 0.05
BASELINE_DIR = Path("reports/baselines")
METRIC_LABELS = {"peak_bytes": "peak", "activation_bytes": "activations"}
MISMATCH = "kind mismatch"


class RatioCheck(Check):
    """One bound on ``metric(numerator) / metric(denominator)`` at every matching grid point: a
    suite's ``Check`` (``where`` values may be lists: any of), with an optional display ``name``."""

    name: str | None = None

    @classmethod
    def parse(cls, raw: Any, where_from: str) -> RatioCheck:
        """Validate one entry of suite.json's ``checks``; ResultsError names what is wrong."""
        try:
            return cls.model_validate(raw)
        except ValidationError as e:
            key, reason = problem_lines(e, cls)[0]
            raise ResultsError(f"{where_from}{'.' + key if key else ''}: {reason}") from None

    def describe(self) -> str:
        if self.name:
            return self.name
        text = f"{METRIC_LABELS[self.metric]} {self.numerator} ÷ {self.denominator}"
        if self.where:
            text += " (" + ", ".join(f"{SHORT_NAMES.get(k, k)}={v}" for k, v in self.where.items()) + ")"
        return text

    def expected(self) -> str:
        if self.min is not None and self.max is not None:
            return f"{self.min:g}–{self.max:g}×"
        return f"≥ {self.min:g}×" if self.min is not None else f"≤ {self.max:g}×"

    def holds(self, ratio: float) -> bool:
        return (self.min is None or ratio >= self.min) and (self.max is None or ratio <= self.max)


@dataclass
class Outcome:
    """One row of the check table. ``result`` is ``held``, ``improved``, ``regressed`` or
    ``kind mismatch`` (baseline ratios not compared: the results' figures are of another kind)."""

    check: str
    expected: str
    measured: str
    result: str
    detail: str = ""

    @property
    def regressed(self) -> bool:
        return self.result == "regressed"


@dataclass
class Pairing:
    """Ratios of one (numerator, denominator, metric) over the grid, and the pairs left out.

    ``ratios`` holds ``(point, ratio, kind)``: a finite positive ratio and the kind of the figures
    it came from (``report.figures_label``). ``failures`` holds ``(point, why, kind)``, kind None
    when the cells themselves failed (an error, an oom of the method).
    """

    ratios: list[tuple[dict[str, Any], float, str]] = field(default_factory=list)
    failures: list[tuple[dict[str, Any], str, str | None]] = field(default_factory=list)
    left_out: list[tuple[dict[str, Any], str]] = field(default_factory=list)  # not run, skipped, numerator oom

    def describe_failure(self, index: int = 0) -> str:
        point, why, _ = self.failures[index]
        return f"{cell_label(point)}: {why}"


def _matches(point: dict[str, Any], where: dict[str, Any]) -> bool:
    for key, wanted in where.items():
        value = point.get(key)
        if isinstance(wanted, list):
            if value not in wanted:
                return False
        elif value != wanted:
            return False
    return True


def cell_label(point: dict[str, Any]) -> str:
    """A short name of a grid point: model, B, S, T (when it differs from S), and the device."""
    parts = [str(point.get("model", "?"))]
    for key in ("batch_size", "seq_len"):
        if point.get(key) is not None:
            parts.append(f"{SHORT_NAMES[key]}={point[key]}")
    if point.get("target_len") not in (None, point.get("seq_len")):
        parts.append(f"T={point['target_len']}")
    return " ".join(parts)


def common_figures(numerator: Record, denominator: Record, metric: str) -> list[tuple[float, float, str]]:
    """``(numerator's figure, denominator's figure, kind)`` for every kind of figure both records
    have, the numerator's own kind first (the one ``report.comparable`` takes)."""
    bottom = dict(record_figures(denominator, metric))
    return [(value, bottom[kind], kind) for kind, value in record_figures(numerator, metric) if kind in bottom]


def pair_cells(results: Results, metric: str, numerator: str, denominator: str,
               where: dict[str, Any] | None = None, every_kind: bool = False) -> Pairing:
    """Pair the numerator's and denominator's cells by grid point and compute their ratios: of
    the first kind of figures both have (``report.comparable``), or of each with ``every_kind``."""
    cells: dict[str, dict[str, Any]] = {}
    for record in results.records:
        method = method_of(record)
        if method not in (numerator, denominator):
            continue
        point = grid_point(record)
        if not _matches(point, where or {}):
            continue
        entry = cells.setdefault(grid_key(point), {"point": point})
        entry[method] = record
    pairing = Pairing()
    for entry in cells.values():
        point = entry["point"]
        num, den = entry.get(numerator), entry.get(denominator)
        if num is None or den is None:
            missing = numerator if num is None else denominator
            pairing.left_out.append((point, f"{missing} not run"))
            continue
        failed = [(m, r) for m, r in ((numerator, num), (denominator, den)) if r.get("status") == "error"]
        if den.get("status") == "oom":
            failed.append((denominator, den))
        if failed:
            method, record = failed[0]
            pairing.failures.append((point, f"{method} {record.get('status')}: {record.get('message') or '-'}", None))
            continue
        if num.get("status") not in FIGURE_STATUSES or den.get("status") not in FIGURE_STATUSES:
            pairing.left_out.append((point, f"{num.get('status')}/{den.get('status')}"))
            continue
        figures = common_figures(num, den, metric)
        if not figures:
            why = comparable(num, den, metric)
            # different kinds (measured vs estimated) are left out; a missing figure is a failure
            if why.startswith("figures of"):
                pairing.left_out.append((point, why))
            else:
                pairing.failures.append((point, why, None))
            continue
        for top, bottom, kind in figures if every_kind else figures[:1]:
            if not bottom:
                pairing.failures.append((point, f"no {metric} figure", kind))
                continue
            ratio = top / bottom
            if not math.isfinite(ratio):  # NaN compares False with every bound: it must not hold
                pairing.failures.append((point, f"not a finite ratio: {top} / {bottom} bytes ({kind})", kind))
            elif ratio <= 0:
                pairing.failures.append((point, f"ratio {ratio:g} is not positive: {top} / {bottom} bytes", kind))
            else:
                pairing.ratios.append((point, ratio, kind))
    return pairing


def _ratio_span(ratios: Iterable[float]) -> str:
    values = sorted(ratios)
    if len(values) == 1:
        return f"{values[0]:.3f}×"
    return f"{values[0]:.3f}–{values[-1]:.3f}× ({len(values)} points)"


def check_bound(check: RatioCheck, results: Results) -> Outcome:
    """Evaluate one bound over every matching grid point."""
    pairing = pair_cells(results, check.metric, check.numerator, check.denominator, check.where)
    measured = _ratio_span(r for _, r, _ in pairing.ratios) if pairing.ratios else "—"
    if pairing.failures:
        return Outcome(check.describe(), check.expected(), measured, "regressed", pairing.describe_failure()
                       + (f" (+{len(pairing.failures) - 1} more)" if len(pairing.failures) > 1 else ""))
    if not pairing.ratios:
        return Outcome(check.describe(), check.expected(), "—", "regressed",
                       "no data: no grid point has both methods with figures"
                       + (f" ({len(pairing.left_out)} left out)" if pairing.left_out else ""))
    outside = [(p, r) for p, r, _ in pairing.ratios if not check.holds(r)]
    if outside:
        point, ratio = min(outside, key=lambda pr: pr[1] if check.min is not None and pr[1] < check.min else -pr[1])
        return Outcome(check.describe(), check.expected(), measured, "regressed",
                       f"{len(outside)} point(s) outside, e.g. {cell_label(point)}: {ratio:.3f}×")
    detail = f"{len(pairing.left_out)} point(s) left out" if pairing.left_out else ""
    return Outcome(check.describe(), check.expected(), measured, "held", detail)


# ---------------------------------------------------------------------------------------------
# Baselines


def default_baseline_path(suite_name: str) -> Path:
    """``reports/baselines/<suite name, as a file name>.json`` (relative to the working directory)."""
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", suite_name).strip("-.") or "suite"
    return BASELINE_DIR / f"{slug}.json"


def baseline_from_results(results: Results, metric: str = "peak_bytes", tolerance: float = DEFAULT_TOLERANCE,
                          numerator: str = BASELINE_METHOD) -> dict[str, Any]:
    """The baseline document of the current results: every method's ratio at every grid point
    where it and ``numerator`` have figures, one per kind of figures, rounded to 4 decimals,
    sorted for stable diffs."""
    methods = sorted({method_of(r) for r in results.records} - {numerator})
    ratios = []
    for method in methods:
        for point, ratio, kind in pair_cells(results, metric, numerator, method, every_kind=True).ratios:
            ratios.append({"cell": point, "method": method, "figures": kind, "ratio": round(ratio, 4)})
    ratios.sort(key=lambda entry: (grid_key(entry["cell"]), entry["method"], entry["figures"]))
    return {"format": BASELINE_FORMAT, "suite": results.name, "metric": metric, "numerator": numerator,
            "tolerance": tolerance, "ratios": ratios}


def write_baseline(path: str | Path, baseline: dict[str, Any]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(baseline, indent=1, sort_keys=True, allow_nan=False) + "\n", encoding="utf-8")


def read_baseline(path: str | Path, any_format: bool = False) -> dict[str, Any]:
    """Read and validate a baseline; ResultsError (one line) when it is missing or malformed.

    ``any_format`` accepts an older format too (its tolerance and metric, which an update keeps).
    """
    path = Path(path)
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ResultsError(f"{path}: no such baseline file") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ResultsError(f"{path}: not a JSON baseline ({e})") from None
    if not isinstance(doc, dict):
        raise ResultsError(f"{path}: a baseline must be a JSON object")
    missing = [k for k in ("suite", "metric", "tolerance", "ratios") if k not in doc]
    if missing:
        raise ResultsError(f"{path}: missing key(s) {', '.join(missing)}")
    if doc.get("format", 1) == 1 and not any_format:
        raise ResultsError(f"{path}: a format 1 baseline records no figure kinds; regenerate it with --update-baseline")
    if doc.get("format", 1) not in (1, BASELINE_FORMAT):
        raise ResultsError(f"{path}: format {doc.get('format')!r} is not {BASELINE_FORMAT}")
    if doc["metric"] not in METRICS:
        raise ResultsError(f"{path}: metric must be one of {', '.join(METRICS)}, got {doc['metric']!r}")
    tolerance = doc["tolerance"]
    if isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)) or not 0 <= tolerance < 1:
        raise ResultsError(f"{path}: tolerance must be a fraction in [0, 1), got {tolerance!r}")
    if not isinstance(doc.get("numerator", BASELINE_METHOD), str):
        raise ResultsError(f"{path}: numerator must be a method name")
    if not isinstance(doc["ratios"], list):
        raise ResultsError(f"{path}: ratios must be a list")
    for number, entry in enumerate(doc["ratios"]):
        ok = (isinstance(entry, dict) and isinstance(entry.get("cell"), dict) and isinstance(entry.get("method"), str)
              and isinstance(entry.get("ratio"), (int, float)) and not isinstance(entry.get("ratio"), bool)
              and math.isfinite(entry["ratio"]) and entry["ratio"] > 0
              and (any_format or isinstance(entry.get("figures"), str)))
        if not ok:
            raise ResultsError(f"{path}: ratios[{number}] needs a 'cell' object, a 'method', its 'figures' kind "
                               "and a positive 'ratio'")
    return doc


@dataclass
class _RatiosByPoint:
    """A ``Pairing`` indexed by grid point (``grid_key``), for baseline lookups."""

    ratios: dict[tuple[str, str], float]  # (point, kind) -> ratio
    kinds: dict[str, list[str]]  # point -> the kinds of its ratios
    failures: dict[str, list[tuple[str, str | None]]]  # point -> (why, kind)

    @classmethod
    def of(cls, pairing: Pairing) -> _RatiosByPoint:
        index = cls({}, {}, {})
        for point, ratio, kind in pairing.ratios:
            index.ratios[(grid_key(point), kind)] = ratio
            index.kinds.setdefault(grid_key(point), []).append(kind)
        for point, why, kind in pairing.failures:
            index.failures.setdefault(grid_key(point), []).append((why, kind))
        return index


def check_baseline(baseline: dict[str, Any], results: Results) -> tuple[list[Outcome], list[str]]:
    """One outcome per baseline ratio whose cells are in the results, compared with the results'
    ratio of the same figure kind; one ``kind mismatch`` outcome per (baseline kind, results kind)
    counting the ratios whose cells have figures of another kind only; notes on the rest."""
    metric, tolerance = baseline["metric"], float(baseline["tolerance"])
    numerator = baseline.get("numerator", BASELINE_METHOD)
    label = METRIC_LABELS[metric]
    outcomes: list[Outcome] = []
    notes: list[str] = []
    not_run = 0
    mismatches: dict[tuple[str, str], int] = {}
    seen: set[tuple[str, str, str]] = set()
    indexes: dict[str, _RatiosByPoint] = {}
    for entry in baseline["ratios"]:
        method, point, kind, expected = entry["method"], entry["cell"], entry["figures"], float(entry["ratio"])
        key = grid_key(point)
        seen.add((key, method, kind))
        index = indexes.get(method)
        if index is None:
            index = indexes[method] = _RatiosByPoint.of(pair_cells(results, metric, numerator, method, every_kind=True))
        name = f"{label} {numerator} ÷ {method} · {cell_label(point)} · {kind}"
        floor = expected * (1 - tolerance)
        wanted = f"≥ {floor:.3f}×"
        measured = index.ratios.get((key, kind))
        if measured is None:
            failure = next((why for why, k in index.failures.get(key, ()) if k in (None, kind)), None)
            if failure is not None:
                outcomes.append(Outcome(name, wanted, "—", "regressed", failure))
            elif key in index.kinds:
                found = index.kinds[key][0]
                mismatches[(kind, found)] = mismatches.get((kind, found), 0) + 1
            else:
                not_run += 1
            continue
        change = f"{measured / expected - 1:+.1%} against baseline {expected:.3f}×"
        if measured < floor:
            result, detail = "regressed", change
        elif measured > expected * (1 + tolerance):
            result, detail = "improved", change + " (--update-baseline keeps it)"
        else:
            result, detail = "held", ""
        outcomes.append(Outcome(name, wanted, f"{measured:.3f}×", result, detail))
    for (kind, found), count in sorted(mismatches.items()):
        outcomes.append(Outcome(f"baseline {label} ratios of {kind} figures", kind, found, MISMATCH,
                                f"baseline {kind}, results {found}: {count} ratio(s) not compared"))
    if not_run:
        notes.append(f"{not_run} baseline ratio(s) have no cells in these results (not run)")
    new = sum(1 for method, index in indexes.items() for key, kind in index.ratios if (key, method, kind) not in seen)
    if new:
        notes.append(f"{new} ratio(s) of these results have no baseline entry (--update-baseline adds them)")
    if not outcomes:
        outcomes.append(Outcome(f"baseline {label} ({baseline['suite']})", "its ratios", "—", "regressed",
                                "no data: no baseline cell is in these results"))
    return outcomes, notes


# ---------------------------------------------------------------------------------------------
# Entry point


def _parse_checks(results: Results) -> list[RatioCheck]:
    raw = (results.suite or {}).get("checks") or []
    source = results.path.parent / "suite.json"
    if not isinstance(raw, list):
        raise ResultsError(f"{source}: checks must be a list")
    return [RatioCheck.parse(item, f"{source}: checks[{i}]") for i, item in enumerate(raw)]


def _table(sections: list[list[Outcome]]) -> Table:
    table = Table(title="memory ratio checks", title_justify="left", show_lines=False)
    table.add_column("check", overflow="fold", ratio=3)
    table.add_column("expected", justify="right", no_wrap=True)
    table.add_column("measured", justify="right", no_wrap=True)
    table.add_column("result", no_wrap=True)
    table.add_column("detail", overflow="fold", ratio=2)
    styles = {"held": "green", "improved": "cyan", "regressed": "bold red", MISMATCH: "yellow"}
    for section in sections:
        for o in section:
            # Text, not markup: method names and messages are user strings ("[...]" is rich markup)
            table.add_row(Text(printable(o.check)), Text(printable(o.expected)), Text(printable(o.measured)),
                          Text(o.result, style=styles[o.result]), Text(printable(o.detail)))
        if section:
            table.add_section()
    return table


def _only_mismatches(path: Path, outcomes: list[Outcome]) -> ResultsError | None:
    """A baseline none of whose ratios could be compared like with like is the wrong baseline."""
    if not outcomes or any(o.result != MISMATCH for o in outcomes):
        return None
    ours = ", ".join(sorted({o.expected for o in outcomes}))
    theirs = ", ".join(sorted({o.measured for o in outcomes}))
    return ResultsError(f"{path}: its ratios are {ours} figures, these results {theirs} ones; nothing to compare "
                        "like with like (check against a baseline of a run of the same kind, or --update-baseline)")


def run_check(results_path: Path, baseline: Path | None = None, update_baseline: bool = False,
              console: Console | None = None, tolerance: float | None = None) -> int:
    """Check the results' memory ratios; print a table; return 0 (held), 1 (regressed), 2 (bad input).

    ``baseline`` defaults to ``reports/baselines/<suite>.json`` when that file exists.
    ``update_baseline`` writes the baseline (with ``tolerance``, else an existing file's, else
    5%) from the current results instead of comparing against it; the suite's bounds are still
    checked.
    """
    out = console or Console()
    baseline_outcomes: list[Outcome] = []
    notes: list[str] = []
    try:
        results = load_results(results_path)
        checks = _parse_checks(results)
        path = Path(baseline) if baseline is not None else default_baseline_path(results.name)
        if update_baseline:
            kept, metric = DEFAULT_TOLERANCE, "peak_bytes"
            if path.exists():
                old = read_baseline(path, any_format=True)
                kept, metric = float(old["tolerance"]), old["metric"]
            doc = baseline_from_results(results, metric=metric, tolerance=kept if tolerance is None else tolerance)
            if not doc["ratios"]:
                raise ResultsError(f"{results.path}: no method has figures next to '{BASELINE_METHOD}'; "
                                   "nothing to write as a baseline")
            reference = None
        else:
            reference = read_baseline(path) if baseline is not None or path.exists() else None
            if reference is not None and reference["suite"] != results.name:
                raise ResultsError(f"{path}: baseline of suite {reference['suite']!r}, "
                                   f"but the results are suite {results.name!r}")
            if reference is None and not checks:
                raise ResultsError(f"{results.path}: nothing to check: suite.json has no checks and there is no "
                                   f"baseline ({path} does not exist)")
            if reference is not None:
                baseline_outcomes, notes = check_baseline(reference, results)
                notes.insert(0, f"baseline: {path} (tolerance {float(reference['tolerance']):.0%})")
                wrong_kind = _only_mismatches(path, baseline_outcomes)
                if wrong_kind is not None:
                    raise wrong_kind
    except ResultsError as e:
        (console or Console(stderr=True)).print(Text(printable(f"error: {e}"), style="red"), soft_wrap=True)
        return 2

    if update_baseline:
        try:
            write_baseline(path, doc)
        except OSError as e:
            (console or Console(stderr=True)).print(Text(printable(f"error: {path}: cannot write ({e})"), style="red"),
                                                    soft_wrap=True)
            return 2
        out.print(Text(printable(f"wrote baseline {path}: {len(doc['ratios'])} {METRIC_LABELS[doc['metric']]} "
                                 f"ratios, tolerance {doc['tolerance']:.0%}")))

    if results.outside:
        notes.insert(0, results.outside_note())
    bound_outcomes = [check_bound(check, results) for check in checks]
    outcomes = bound_outcomes + baseline_outcomes
    if not outcomes:
        return 0
    out.print(_table([bound_outcomes, baseline_outcomes]))
    for note in notes:
        out.print(Text(printable(note), style="dim"))
    regressed = sum(o.regressed for o in outcomes)
    improved = sum(o.result == "improved" for o in outcomes)
    mismatched = sum(o.result == MISMATCH for o in outcomes)
    summary = f"{len(outcomes) - regressed - mismatched} held" + (f" ({improved} improved)" if improved else "")
    summary += f", {regressed} regressed" + (f", {mismatched} {MISMATCH}" if mismatched else "")
    out.print(Text(summary, style="bold red" if regressed else "bold green"))
    return 1 if regressed else 0
