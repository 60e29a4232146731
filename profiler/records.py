"""Records: one JSON object per measured cell, appended to ``results.jsonl``.

A record is a plain dict so it survives any JSON tool. Its keys:

``cell_id``         stable id of the cell (model, method and grid point), used by ``--resume``
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
rewrites it without the failed tries it reruns).

Bytes are ints. Missing figures are None, never 0.
"""

from __future__ import annotations

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


def finished_cell_ids(path: str | os.PathLike) -> set[str]:
    if not Path(path).exists():
        return set()
    return {r["cell_id"] for r in iter_records(path) if r.get("status") in FINISHED_STATUSES}


def flatten(record: Record) -> dict[str, Any]:
    """One flat row per record for pandas and spreadsheets (``results.csv``)."""
    row: dict[str, Any] = {"cell_id": record["cell_id"], "suite": record.get("suite")}
    row.update(record.get("params", {}))
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
    for key, value in (record.get("throughput") or {}).items():
        row[key] = value
    for key, value in (record.get("env") or {}).items():
        row[f"env_{key}"] = value
    return row


def write_csv(records: Iterable[Record], path: str | os.PathLike) -> None:
    import pandas as pd

    pd.DataFrame([flatten(r) for r in records]).to_csv(path, index=False)
