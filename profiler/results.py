"""The results of a run, as the report and the check read them: records, grid points, figure kinds.

Data flows records -> results -> report / check: ``load_results`` reads ``results.jsonl`` and the
``suite.json`` beside it (``profiler.records``), and everything here is plain Python on those
records; the HTML page (``profiler.report``) and the CI gate (``profiler.check``) both build on it.

A memory figure has a kind (``FigureKind``): measured on a device, or estimated on the meta
device for a device's kernels. A ratio of two methods is made of figures of one kind only
(``comparable``): a CPU measurement over a cuda estimate is no ratio of methods.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

from profiler.records import MEMORY_CATEGORIES, Record, read_json_object, read_records

BASELINE_METHOD = "full"
FIGURE_STATUSES = ("ok", "estimated")  # statuses whose memory figures are usable
METRICS = ("peak_bytes", "activation_bytes")

# The cell parameters that place a cell on the grid; everything in ``params`` but ``method``.
GRID_ORDER = ("model", "batch_size", "seq_len", "target_len", "d_model", "n_head", "d_ff", "d_head",
              "n_layers", "dtype", "optimizer", "attn_implementation", "family")
SHORT_NAMES = {"batch_size": "B", "seq_len": "S", "target_len": "T", "d_model": "d_model",
               "n_head": "n_head", "d_ff": "d_ff", "d_head": "d_head", "n_layers": "layers", "world_size": "GPUs"}


class ResultsError(ValueError):
    """Bad input to the report or the check: its message is one line that names the file and why."""


@dataclass
class Results:
    """The records of one results file that are cells of its suite (the last record of each
    cell), the suite, and how many records were left out as cells of no suite here."""

    path: Path
    records: list[Record]
    suite: dict[str, Any] | None
    outside: int = 0

    def outside_note(self) -> str | None:
        if not self.outside:
            return None
        return f"{self.outside} record(s) of {self.path.name} are not cells of suite.json: ignored"

    @property
    def name(self) -> str:
        if self.suite and isinstance(self.suite.get("name"), str):
            return self.suite["name"]
        names = {r.get("suite") for r in self.records if r.get("suite")}
        return ", ".join(sorted(map(str, names))) or self.path.stem


_NUMBER, _INTEGER, _TEXT, _OBJECT, _LIST = "a number", "an integer", "text", "an object", "a list"
# What the report and the check read of a record, by key path, and the JSON type each must have
# (null allowed where the figure may be unknown). ``activations[]`` is every item of the list.
_RECORD_FIELDS: tuple[tuple[str, str, bool], ...] = (
    ("status", _TEXT, False),
    ("message", _TEXT, True),
    ("device", _TEXT, True),
    ("models_device", _TEXT, True),
    ("memory", _OBJECT, True),
    ("memory.peak_bytes", _NUMBER, True),
    ("memory.categories", _OBJECT, True),
    *((f"memory.categories.{c}", _NUMBER, True) for c in MEMORY_CATEGORIES),
    ("activations", _LIST, True),
    ("activations[]", _OBJECT, False),
    ("activations[].operator", _TEXT, False),
    ("activations[].category", _TEXT, False),
    ("activations[].bytes", _INTEGER, False),
    ("throughput", _OBJECT, True),
    ("memory.peak_phase", _TEXT, True),
    *((f"throughput.{k}", _NUMBER, True) for k in ("step_time_s", "tokens_per_s", "samples_per_s",
                                                     "estimate_over_measured")),
    *((f"throughput.{k}", _TEXT, True) for k in ("kind", "target")),
    ("estimate", _OBJECT, True),
    *((f"estimate.{k}", _NUMBER, True) for k in ("peak_bytes", "activation_bytes")),
    ("env", _OBJECT, True),
)
_CHECKS = {
    _NUMBER: lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    _INTEGER: lambda v: isinstance(v, int) and not isinstance(v, bool),
    _TEXT: lambda v: isinstance(v, str),
    _OBJECT: lambda v: isinstance(v, dict),
    _LIST: lambda v: isinstance(v, list),
}


def _record_problem(record: Record) -> str | None:
    """The first field of ``_RECORD_FIELDS`` that has the wrong type, as ``KEY: expected ...``."""
    for path, kind, nullable in _RECORD_FIELDS:
        for key, value in _values_at(record, path):
            if value is None and nullable:
                continue
            if not _CHECKS[kind](value):
                return f"{key}: expected {kind}{' or null' if nullable else ''}, got {type(value).__name__}"
    return None


def _values_at(record: Record, path: str) -> list[tuple[str, Any]]:
    """(key, value) at a key path of ``_RECORD_FIELDS``, for every item at ``[]``; none where a
    parent is missing, null or of the wrong type (that parent's own entry reports it)."""
    found: list[tuple[str, Any]] = [("", record)]
    for part in path.split("."):
        name, every = part.removesuffix("[]"), part.endswith("[]")
        found = [(f"{key}.{name}" if key else name, value[name]) for key, value in found
                 if isinstance(value, dict) and name in value]
        if every:
            found = [(f"{key}[{i}]", item) for key, value in found if isinstance(value, list)
                     for i, item in enumerate(value)]
    return found


def load_results(results_path: str | Path) -> Results:
    """Read ``results_path`` (JSON lines) and ``suite.json`` beside it, if present.

    Only the records of the suite's cells are its results (``suite_membership``); the others are
    counted in ``outside``. A later record of the same cell (a ``--resume`` retry) replaces the
    earlier one. Raises ResultsError, with a one-line message, for a missing or unreadable file, a
    line that is not JSON, a record without ``params``/``status``, a field of a record with the
    wrong type (``_RECORD_FIELDS``), no record of the suite, or a malformed suite.json.
    """
    path = Path(results_path)
    if not path.is_file():
        raise ResultsError(f"{path}: no such results file")
    try:
        raw = read_records(path)
    except (OSError, UnicodeDecodeError) as e:
        raise ResultsError(f"{path}: cannot read ({e.__class__.__name__}: {e})") from None
    except ValueError as e:
        raise ResultsError(str(e)) from None
    suite = None
    suite_path = path.parent / "suite.json"
    if suite_path.exists():
        try:
            suite = read_json_object(suite_path, "suite")
        except ValueError as e:
            raise ResultsError(str(e)) from None
    member = suite_membership(suite, suite_path)
    by_cell: dict[str, Record] = {}
    outside = 0
    for number, record in enumerate(raw, 1):
        if not isinstance(record, dict) or not isinstance(record.get("params"), dict) or "status" not in record:
            raise ResultsError(f"{path}: record {number} is not a cell record (needs 'params' and 'status')")
        problem = _record_problem(record)
        if problem:
            raise ResultsError(f"{path}: record {number}: {problem}")
        if member is not None and not member(record):
            outside += 1
            continue
        by_cell[str(record.get("cell_key") or record.get("cell_id", number))] = record
    if not by_cell:
        raise ResultsError(f"{path}: no records" + (f" of the cells of {suite_path} ({outside} of other cells)"
                                                    if outside else ""))
    return Results(path, list(by_cell.values()), suite, outside)


def suite_membership(suite: dict[str, Any] | None, where: Path) -> Callable[[Record], bool] | None:
    """Which records are cells of ``suite``: those with a ``cell_key`` its ``cell_keys`` lists
    (what the runner writes); for a suite.json without keys (an older runner), those with a
    ``cell_id`` its ``cells`` lists. None, every record, when there is no suite.json."""
    if suite is None:
        return None
    keys = suite.get("cell_keys")
    if keys is not None:
        if not isinstance(keys, dict) or not all(isinstance(k, str) for k in keys.values()):
            raise ResultsError(f"{where}: cell_keys must map cell ids to keys")
        wanted = set(keys.values())
        return lambda record: record.get("cell_key") in wanted
    cells = suite.get("cells")
    if isinstance(cells, list):
        ids = {str(c) for c in cells}
        return lambda record: str(record.get("cell_id")) in ids
    return None


# ---------------------------------------------------------------------------------------------
# Figures of one record


def metric_value(record: Record, metric: str) -> int | None:
    """``peak_bytes`` or ``activation_bytes`` (saved for backward) of a record; None if unknown.

    Activations are every byte saved for backward in the forward pass: the sum of the breakdown
    (``activations``). ``memory.categories.activations`` is only the part still alive at the peak
    instant -- a few KiB when the peak falls in the optimizer step, after backward freed the
    rest -- and is used only for a record without a breakdown.
    """
    memory = record.get("memory") or {}
    if metric == "peak_bytes":
        value = memory.get("peak_bytes")
    elif metric == "activation_bytes":
        items = record.get("activations")
        if isinstance(items, list) and items:
            value = sum(item["bytes"] for item in items)
        else:
            value = (memory.get("categories") or {}).get("activations")
    else:
        raise ValueError(f"unknown metric {metric!r}; expected one of {', '.join(METRICS)}")
    return value if _is_number(value) else None


STEP_TIME_KINDS = ("measured", "estimated")


def step_time(record: Record) -> dict[str, Any]:
    """The step time of a record as the report's columns: ``step_time_s``, ``step_time_kind``
    (measured | estimated), ``step_time_target`` (where it holds: cpu, cuda or a GPU table key)
    and ``estimate_over_measured`` (a CPU-measured cell: its roofline on this CPU over the time).

    A throughput of an older record, which had measured ones only, is measured on its device.
    All None without a usable throughput (a failed cell).
    """
    throughput = record.get("throughput") if record.get("status") in FIGURE_STATUSES else None
    if not isinstance(throughput, dict) or not _is_number(throughput.get("step_time_s")):
        return dict.fromkeys(("step_time_s", "step_time_kind", "step_time_target", "estimate_over_measured"))
    kind = throughput.get("kind") if throughput.get("kind") in STEP_TIME_KINDS else "measured"
    return {
        "step_time_s": throughput["step_time_s"],
        "step_time_kind": kind,
        "step_time_target": throughput.get("target") or record.get("device"),
        "estimate_over_measured": throughput.get("estimate_over_measured"),
    }


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def grid_point(record: Record) -> dict[str, Any]:
    """The cell without its method: every parameter but ``method``.

    Two records are compared (ratio against ``full``) when their grid points are equal, and then
    only through figures of the same kind (``comparable``): with ``device: auto`` the runner
    measures the cells that fit on the CPU and estimates the others, and a CPU measurement over a
    cuda estimate is no ratio of methods.
    """
    return {k: v for k, v in record["params"].items() if k != "method"}


def grid_key(point: dict[str, Any]) -> str:
    """A grid point as a string that is equal for equal points (a dict key)."""
    return json.dumps(point, sort_keys=True, default=str)


def method_of(record: Record) -> str:
    return str(record["params"].get("method"))


class FigureKind(str, Enum):
    """How a memory figure was obtained; the value is what a baseline file stores.

    Figures of one kind make a ratio: both measured on one device, or both estimated on the meta
    device for one device's kernels. ``label`` is the kind as tables and plot legends show it.
    """

    MEASURED_CPU = "measured-cpu"
    """Measured on the CPU: the tracker's exact count of tensor storages."""
    MEASURED_CUDA = "measured-cuda"
    """Measured on a GPU: the caching allocator's peak."""
    ESTIMATED_CUDA = "estimated-meta-cuda"
    """Traced on the meta device, modelling cuda kernels (bool dropout masks, 512-byte blocks)."""
    ESTIMATED_CPU = "estimated-meta-cpu"
    """Traced on the meta device, modelling cpu kernels."""

    @property
    def estimated(self) -> bool:
        return self in (FigureKind.ESTIMATED_CUDA, FigureKind.ESTIMATED_CPU)

    @property
    def label(self) -> str:
        """``measured (cpu)``, ``estimated (meta → cuda)``..."""
        return _LABELS[self]

    @classmethod
    def measured_on(cls, device: Any) -> FigureKind | None:
        return _MEASURED.get(device)

    @classmethod
    def estimate_of(cls, models_device: Any) -> FigureKind | None:
        return _ESTIMATED.get(models_device)

    @classmethod
    def from_label(cls, label: str) -> FigureKind | None:
        """The kind a format-2 baseline names by its label; None for a label of no kind."""
        return next((kind for kind, text in _LABELS.items() if text == label), None)


_MEASURED = {"cpu": FigureKind.MEASURED_CPU, "cuda": FigureKind.MEASURED_CUDA}
_ESTIMATED = {"cuda": FigureKind.ESTIMATED_CUDA, "cpu": FigureKind.ESTIMATED_CPU}
_LABELS = {
    FigureKind.MEASURED_CPU: "measured (cpu)",
    FigureKind.MEASURED_CUDA: "measured (cuda)",
    FigureKind.ESTIMATED_CUDA: "estimated (meta → cuda)",
    FigureKind.ESTIMATED_CPU: "estimated (meta → cpu)",
}


def record_kind(record: Record) -> FigureKind | None:
    """The kind of a record's own figures; None for a record without usable figures."""
    if record.get("status") == "estimated":
        return FigureKind.estimate_of(record.get("models_device"))
    if record.get("status") == "ok":
        return FigureKind.measured_on(record.get("device"))
    return None


def record_figures(record: Record, metric: str) -> dict[FigureKind, float]:
    """The record's figures of ``metric`` by kind, its own first.

    A cell of ``device: auto`` measured on the CPU also carries the meta estimate made before the
    run (``estimate``): its figures are a second kind, ``estimated (meta → cuda)``.
    """
    out: dict[FigureKind, float] = {}
    own = record_kind(record)
    value = metric_value(record, metric) if own is not None else None
    if value is not None:
        out[own] = value
    estimate = record.get("estimate")
    if record.get("status") == "ok" and isinstance(estimate, dict):
        kind = FigureKind.estimate_of(estimate.get("models_device"))
        value = estimate.get(metric)
        if kind is not None and kind not in out and _is_number(value):
            out[kind] = value
    return out


@dataclass(frozen=True)
class FigurePair:
    """The figures of ``metric`` of two records, of one kind: what a ratio divides."""

    numerator: float
    denominator: float
    kind: FigureKind


def common_figures(numerator: Record, denominator: Record, metric: str) -> list[FigurePair]:
    """A pair for every kind of figure both records have, the numerator's own kind first."""
    bottom = record_figures(denominator, metric)
    return [FigurePair(value, bottom[kind], kind) for kind, value in record_figures(numerator, metric).items()
            if kind in bottom]


def comparable(numerator: Record, denominator: Record, metric: str) -> FigurePair | None:
    """The figures a ratio of the two records takes, or None when they have none of one kind.

    The records' own figures come first; when they differ in kind (full estimated, the method
    measured), the estimates both carry are used.
    """
    pairs = common_figures(numerator, denominator, metric)
    return pairs[0] if pairs else None
