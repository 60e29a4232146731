"""Records: one JSON object per measured cell, appended to ``results.jsonl``.

A record is a plain dict so it survives any JSON tool. Its keys:

``cell_id``         readable id of the cell (model, method and grid point), unique in a suite
``cell_key``        identity of the cell's figures: a hash of all its settings and the run's device
                    policy (``runner.cell_key``); ``--resume`` reuses a record only under its key,
                    and report and check read only the keys ``suite.json`` lists
``suite``           suite name (user string: escape before rendering)
``params``          the cell parameters: ``model`` (preset name), ``family``, ``method``,
                    ``batch_size``, ``seq_len``, ``target_len`` (None for encoder/decoder-only
                    models), ``d_model``, ``n_head``, ``d_ff``, ``d_head``, ``n_layers``,
                    ``dtype``, ``optimizer``, ``attn_implementation``
``device``          where the step ran: ``cuda`` | ``cpu`` | ``meta``
``models_device``   the device whose kernels the figures model (``cuda`` for meta estimates by
                    default, else the device itself)
``status``          ``ok`` | ``estimated`` | ``oom`` | ``error`` | ``skipped``
``message``         why, for any status but ok/estimated ("" otherwise)
``memory``          ``{"peak_bytes", "reserved_bytes", "nvml_used_bytes", "categories": {
                    "parameters", "gradients", "optimizer_state", "activations",
                    "temporaries", "other"}}`` -- bytes alive at the peak instant; unknown
                    values are None (``activations`` there is what is still saved at the peak:
                    little when the peak falls in the optimizer step)
``activations``     list of ``{"operator", "category", "bytes"}`` (wtacrs.taxonomy names), the
                    deduplicated bytes saved for backward in the forward pass (parameters and
                    buffers excluded); their sum is the "activations" of reports and checks
``throughput``      ``{"step_time_s", "tokens_per_s", "samples_per_s", "timed_steps"}`` or None
                    (None for meta estimates)
``flops``           FLOPs of one training step (matmuls), or None
``env``             ``{"torch", "transformers", "peft", "python", "device_name", "host"}``
``finished_at``     ISO-8601 UTC time the cell ended

Optional keys: ``estimate`` (``device: auto`` cells measured on the CPU after a meta estimate:
``{"peak_bytes", "activation_bytes", "models_device", "flops", "cpu_seconds"}``; reports compare
it with other estimates, never with measured figures), ``traceback`` (the last frames of a
cell with status ``error``/``oom``). For ``estimated`` cells of ``device: auto``, ``message``
says why no CPU run was made. ``results.jsonl`` holds one record per cell (``--resume``
rewrites it without the failed tries it reruns, and moves the records of cells the suite no
longer has to ``superseded.jsonl``).

Bytes are ints. Missing figures are None, never 0.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

STATUSES = ("ok", "estimated", "oom", "error", "skipped")
MEMORY_CATEGORIES = ("parameters", "gradients", "optimizer_state", "activations", "temporaries", "other")
FINISHED_STATUSES = ("ok", "estimated", "oom")  # --resume does not retry these

Record = dict[str, Any]


def append_record(path: str | os.PathLike, record: Record) -> None:
    """Append one record and flush it to disk, so a killed run loses no finished cell."""
    line = json.dumps(record, sort_keys=True, allow_nan=False)
    with open(path, "a", encoding="utf-8") as f:
        f.write(line + "\n")
        f.flush()
        os.fsync(f.fileno())


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


def flatten(record: Record) -> dict[str, Any]:
    """One flat row per record for pandas and spreadsheets (``results.csv``). Keys of a record's
    mappings come in sorted order, as ``results.jsonl`` stores them: a record read back flattens
    to the same columns, in the same order, as the record in memory."""
    row: dict[str, Any] = {"cell_id": record["cell_id"], "cell_key": record.get("cell_key"),
                           "suite": record.get("suite")}
    row.update(sorted(record.get("params", {}).items()))
    for key in ("device", "models_device", "status", "message", "finished_at"):
        row[key] = record.get(key)
    memory = record.get("memory") or {}
    for key in ("peak_bytes", "reserved_bytes", "nvml_used_bytes"):
        row[key] = memory.get(key)
    for key in MEMORY_CATEGORIES:
        row[f"{key}_bytes"] = (memory.get("categories") or {}).get(key)
    for item in record.get("activations") or []:
        column = f"act[{item['operator']}|{item['category']}]_bytes"
        row[column] = row.get(column, 0) + item["bytes"]
    for key, value in sorted((record.get("throughput") or {}).items()):
        row[key] = value
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
