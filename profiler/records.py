"""Records: one JSON object per measured cell, appended to ``results.jsonl``.

A record is a plain dict so it survives any JSON tool; ``CellRecord`` is its schema, and the
runner builds every record through it (``CellRecord(...).to_json()``). ``results.jsonl`` holds
one record per cell (``--resume`` rewrites it without the failed tries it reruns, and moves the
records of cells the suite no longer has to ``superseded.jsonl``).

Bytes are ints. Missing figures are None, never 0.
"""

from __future__ import annotations

import csv
import datetime as dt
import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

STATUSES = ("ok", "estimated", "oom", "error", "skipped")
MEMORY_CATEGORIES = ("parameters", "gradients", "optimizer_state", "activations", "temporaries", "other")
FINISHED_STATUSES = ("ok", "estimated", "oom")  # --resume does not retry these

Record = dict[str, Any]  # a CellRecord as JSON


class _Part(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class Memory(_Part):
    """Bytes alive at the peak instant; unknown values are None (``activations`` there is what is
    still saved at the peak: little when the peak falls in the optimizer step)."""

    peak_bytes: int
    reserved_bytes: int | None = None  # cuda allocator
    nvml_used_bytes: int | None = None  # whole device, every process: context only
    peak_phase: Literal["forward", "backward", "optimizer"] | None = None  # where the (tracked) peak fell
    categories: dict[Literal[MEMORY_CATEGORIES], int | None]


class Activation(_Part):
    """Deduplicated bytes saved for backward in the forward pass by one operator of one category
    (wtacrs.taxonomy names), parameters and buffers excluded."""

    operator: str
    category: str
    bytes: int


class Throughput(_Part):
    """The step time of a cell: measured (median of the timed steps) where the step ran, else the
    roofline estimate of the tracked step (``profiler.steptime``) for a GPU of ``profiler.gpus``.

    Records of older runs have measured throughputs only, without ``kind``, ``target``,
    ``bytes_moved`` and ``estimate_over_measured``.
    """

    step_time_s: float  # measured median, or the roofline estimate
    kind: Literal["measured", "estimated"] = "measured"
    target: str = ""  # where the time holds: "cpu", "cuda" (measured) or a GPU table key (estimated)
    tokens_per_s: float | None
    samples_per_s: float | None
    timed_steps: int  # 0 for an estimate
    bytes_moved: int | None = None  # the roofline's inputs: the bytes the ops read and wrote (and the record's flops)
    estimate_over_measured: float | None = None  # a CPU-timed cell: its roofline on this CPU / measured


class Policy(_Part):
    """What ``device: auto`` chose for a cell and why (``runner.CellRunner.consider_cpu``)."""

    cpu_seconds: float  # planned CPU time: the step's roofline on steptime.NOMINAL_CPU x steps
    choice: Literal["cpu", "estimate"] | None = None
    reason: str = ""


class Estimate(_Part):
    """The meta estimate of a ``device: auto`` cell that then ran on the CPU (reports compare it
    with other estimates, never with measured figures)."""

    peak_bytes: int
    activation_bytes: int
    models_device: str
    flops: int | None


class RankMemory(_Part):
    """One rank's peak and its parts at the peak, by torch's tracker categories ("Sharded Param",
    "All Gather", "Reduce Scatter", "DDP Buckets", ...)."""

    rank: int
    peak_bytes: int
    breakdown: dict[str, int]


class ParallelFigures(_Part):
    """A cell split over ranks (``profiler.parallel``): ``memory.peak_bytes`` is the largest
    per-rank peak, so a fit against a GPU's memory reads per-GPU memory. An estimate traces one
    rank (rank 0); a torchrun measurement lists every rank."""

    strategy: Literal["ddp", "fsdp"]
    world_size: int
    ranks: list[RankMemory]


class Env(_Part):
    torch: str
    transformers: str
    peft: str | None
    python: str
    device_name: str
    host: str


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


class CellRecord(_Part):
    """The record of one cell.

    ``cell_key`` is the identity of the cell's figures (``runner.cell_key``): ``--resume`` reuses a
    record only under its key, and report and check read only the keys ``suite.json`` lists.
    ``activations`` sum to the "activations" of reports and checks. For ``estimated`` cells of
    ``device: auto``, ``message`` says why no CPU run was made, and ``policy`` of every ``auto``
    cell what was chosen and why. ``estimate``, ``policy``, ``traceback`` (the last frames of an
    ``error``/``oom`` cell) and ``parallel`` (per-rank figures of a DDP/FSDP cell) are written
    only where they have a value.
    """

    cell_id: str  # model, method and grid point; unique in a suite
    cell_key: str | None = None  # set when the run writes the record
    suite: str  # user string: escape before rendering
    params: dict[str, Any]  # ``suite.Cell.params``
    device: Literal["cuda", "cpu", "meta"]  # where the step ran
    models_device: Literal["cuda", "cpu"]  # whose kernels the figures model
    status: Literal[STATUSES]
    message: str = ""  # why, for any status but ok/estimated
    memory: Memory | None = None
    activations: list[Activation] | None = None
    throughput: Throughput | None = None  # every ok/estimated one-device cell; None for the others and DDP/FSDP ranks
    flops: int | None = None  # of one training step (matmuls)
    env: Env
    finished_at: str = Field(default_factory=_now)  # ISO-8601 UTC time the cell ended
    estimate: Estimate | None = None
    policy: Policy | None = None  # cells of device: auto
    traceback: str | None = None
    parallel: ParallelFigures | None = None  # DDP / FSDP cells only

    def to_json(self) -> Record:
        optional = ("estimate", "policy", "traceback", "parallel")
        return self.model_dump(exclude={key for key in optional if getattr(self, key) is None})


def append_record(path: str | os.PathLike, record: Record) -> None:
    """Append one record and flush it to disk, so a killed run loses no finished cell."""
    line = json.dumps(record, sort_keys=True, allow_nan=False)
    with open(path, "a", encoding="utf-8") as f:
        f.write(line + "\n")
        f.flush()
        os.fsync(f.fileno())


def read_json_object(path: Path, what: str) -> dict[str, Any]:
    """The JSON object in ``path`` (a ``what``: baseline, suite, config); ValueError, one line
    naming the file, when it is missing, unreadable, not JSON or not an object."""
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(f"{path}: no such {what} file") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not a JSON {what} ({type(e).__name__}: {e})") from None
    if not isinstance(doc, dict):
        raise ValueError(f"{path}: a {what} must be a JSON object")
    return doc


def read_records(path: str | os.PathLike) -> list[Record]:
    """All complete records of a results file. A truncated last line (a killed write) is ignored."""
    return list(iter_records(path))


def iter_records(path: str | os.PathLike) -> Iterator[Record]:
    with open(path, encoding="utf-8") as f:
        lines = f.read().split("\n")
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            if number == len(lines):  # the last line of a killed run: skip it
                continue
            raise ValueError(f"{path}:{number}: not a JSON record ({e.msg})") from None
        if not isinstance(record, dict) or not isinstance(record.get("cell_id"), str):
            raise ValueError(f"{path}:{number}: not a cell record (a JSON object with a 'cell_id')")
        yield record


_THROUGHPUT_COLUMNS = {"kind": "step_time_kind", "target": "step_time_target"}  # plain names say too little


def flatten(record: Record) -> dict[str, Any]:
    """One flat row per record for pandas and spreadsheets (``results.csv``). Keys of a record's
    mappings come in sorted order, as ``results.jsonl`` stores them: a record read back flattens
    to the same columns, in the same order, as the record in memory."""
    row: dict[str, Any] = {"cell_id": record["cell_id"], "cell_key": record.get("cell_key"),
                           "suite": record.get("suite")}
    row.update(sorted(record.get("params", {}).items()))
    for key in ("device", "models_device", "status", "message", "finished_at", "flops"):
        row[key] = record.get(key)
    memory = record.get("memory") or {}
    for key in ("peak_bytes", "reserved_bytes", "nvml_used_bytes", "peak_phase"):
        row[key] = memory.get(key)
    for key in MEMORY_CATEGORIES:
        row[f"{key}_bytes"] = (memory.get("categories") or {}).get(key)
    for item in record.get("activations") or []:
        column = f"act[{item['operator']}|{item['category']}]_bytes"
        row[column] = row.get(column, 0) + item["bytes"]
    for key, value in sorted((record.get("throughput") or {}).items()):
        row[_THROUGHPUT_COLUMNS.get(key, key)] = value
    for key, value in sorted((record.get("policy") or {}).items()):
        row[f"policy_{key}"] = value
    for key, value in sorted((record.get("env") or {}).items()):
        row[f"env_{key}"] = value
    return row


class CsvFile:
    """``results.csv``: one ``flatten``ed row per record, kept in step with ``results.jsonl`` at
    the cost of one row per record, however many the file holds.

    The header is the union of the rows' columns in first-seen order (the columns of
    ``pandas.DataFrame(rows)``). A record with a column the header lacks (an operator no earlier
    cell saved, say) rewrites the file once with the wider header, from its own rows; any other
    record appends one row. Missing values are empty cells.
    """

    def __init__(self, path: str | os.PathLike, records: Iterable[Record] = ()):
        """Start the file afresh with ``records`` (none: no file until the first ``append``)."""
        self.path = Path(path)
        rows = [flatten(r) for r in records]
        self.columns = list(dict.fromkeys(key for row in rows for key in row))
        self._write(rows)

    def append(self, record: Record) -> None:
        row = flatten(record)
        if all(key in self.columns for key in row):
            with open(self.path, "a", encoding="utf-8", newline="") as f:
                csv.DictWriter(f, self.columns).writerow(row)
            return
        rows = []
        if self.columns:  # the file exists: its rows as written (strings, copied unchanged)
            with open(self.path, encoding="utf-8", newline="") as f:
                rows = list(csv.DictReader(f))
        self.columns += [key for key in row if key not in self.columns]
        self._write([*rows, row])

    def _write(self, rows: list[dict[str, Any]]) -> None:
        if not rows:
            self.path.unlink(missing_ok=True)  # nothing to show: no stale file of an earlier run
            return
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        with open(tmp, "w", encoding="utf-8", newline="") as f:
            writer = csv.DictWriter(f, self.columns)
            writer.writeheader()
            writer.writerows(rows)
        os.replace(tmp, self.path)  # a kill mid-rewrite leaves the previous file
