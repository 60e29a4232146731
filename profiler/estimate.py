"""``python -m profiler estimate``: does a fine-tuning step fit a GPU? No suite file needed.

``estimate_fits(model, batch_sizes, seq_len, methods, budgets)`` builds a ``Suite`` from its
arguments (``suite.parse_suite``, so every value is validated as a suite's would be), runs each
cell's meta estimate through the suite runner's ``CellRunner`` (the same code as ``device: meta``
in ``python -m profiler run``), and turns the records into rows through the report's frames
(``report.cells_frame``) and the fits rule of ``profiler.fits``.

``model`` is a preset name (``profiler.models.PRESETS``) or the path of a local Hugging Face
``config.json``: its ``model_type`` picks the family, and every key that family's config class
accepts overrides the family's default preset (so the model is the file's, with random weights;
bookkeeping keys such as ``architectures`` and keys the class does not know are left out).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from profiler.fits import ALLOCATOR_RESERVE, CUDA_CONTEXT_BYTES, budget_label, fits, needed_bytes
from profiler.records import read_json_object
from profiler.units import GiB

# config.json keys that describe the checkpoint, not the model built from it
_BOOKKEEPING_KEYS = frozenset({"_name_or_path", "architectures", "model_type", "transformers_version", "dtype",
                               "torch_dtype", "id2label", "label2id", "auto_map"})


class EstimateInputError(ValueError):
    """Bad input to ``estimate``: its message is one line naming the argument and why."""


def model_spec(model: str) -> dict[str, Any]:
    """The suite ``model`` entry of a preset name or a config.json path (module docstring)."""
    from profiler.models import PRESETS

    if model in PRESETS:
        return {"preset": model}
    path = Path(model)
    if not path.suffix == ".json" and not path.exists():
        raise EstimateInputError(f"--model {model!r}: not a preset (python -m profiler estimate --help lists them) "
                                 "nor a config.json file")
    try:
        config = read_json_object(path, "config")
    except ValueError as e:
        raise EstimateInputError(f"--model {e}") from None
    family = family_of_model_type(config.get("model_type"))
    if family is None:
        raise EstimateInputError(f"--model {model}: model_type {config.get('model_type')!r} is not a supported family")
    from profiler.models import config_keys

    known = config_keys(family) - _BOOKKEEPING_KEYS
    overrides = {k: v for k, v in config.items() if k in known}
    return {"family": family, "config": overrides, "name": path.stem if path.stem != "config" else family}


def family_of_model_type(model_type: Any) -> str | None:
    """The profiler family (``models.ARCHITECTURES`` key) of a config's ``model_type``: the family
    whose config class has it, else the first whose wtacrs family lists it (``mt5`` -> t5)."""
    from profiler.models import ARCHITECTURES

    exact = [name for name, arch in ARCHITECTURES.items() if arch.config_class.model_type == model_type]
    listed = [name for name, arch in ARCHITECTURES.items() if model_type in arch.family.model_types]
    return next(iter(exact + listed), None)


def estimate_suite(model: str, batch_sizes: list[int], seq_len: int, methods: list[str], budgets: list[int], *,
                   target: str | None = None, target_len: int | None = None, dtype: str = "float32",
                   optimizer: str = "adamw", attn_implementation: str = "eager"):
    """The validated ``Suite`` of an estimate (``device: meta``, modelling cuda kernels).

    ``target`` names the GPU of estimated step times (``training.target``; None: the default).
    Raises EstimateInputError with the suite validator's first problem.
    """
    from profiler.suite import SuiteError, parse_suite

    training: dict[str, Any] = {"dtype": dtype, "optimizer": optimizer, "attn_implementation": attn_implementation,
                                "warmup_steps": 1, "timed_steps": 1}
    if target is not None:
        training["target"] = target
    grid: dict[str, Any] = {"batch_size": batch_sizes, "seq_len": [seq_len]}
    if target_len is not None:
        grid["target_len"] = [target_len]
    data = {"name": "estimate", "model": model_spec(model), "grid": grid, "methods": methods, "training": training,
            "device": "meta", "models_device": "cuda", "budgets": {"memory_gib": [b / GiB for b in budgets]}}
    try:
        return parse_suite(data, "estimate")
    except SuiteError as e:
        raise EstimateInputError(e.lines[0].removeprefix("estimate: ")) from None


@dataclass
class Estimate:
    """The rows of an estimate (one per method and batch size) and what they were made with."""

    model: str
    rows: list[dict[str, Any]]
    budgets: list[int]

    def to_json(self) -> dict[str, Any]:
        return {"model": self.model, "margin": {"cuda_context_bytes": CUDA_CONTEXT_BYTES,
                                                "allocator_reserve": ALLOCATOR_RESERVE},
                "budgets": [{"bytes": b, "label": budget_label(b)} for b in self.budgets], "rows": self.rows}


def estimate_fits(model: str, batch_sizes: list[int], seq_len: int, methods: list[str], budgets: list[int],
                  **settings: Any) -> Estimate:
    """Estimate every (method, batch size) on meta and say which budgets each fits."""
    from profiler.report import cells_frame
    from profiler.results import Results
    from profiler.runner import CellRunner

    suite = estimate_suite(model, batch_sizes, seq_len, methods, budgets, **settings)
    runner = CellRunner(suite, "meta")
    try:
        records = [runner.run(cell) for cell in suite.cells()]
    finally:
        runner.close()
    cells = cells_frame(Results(Path("estimate"), records, suite.to_json()))
    rows = [_row(cell, budgets) for _, cell in cells.iterrows()]
    return Estimate(suite.models[0].name, rows, sorted(budgets, reverse=True))


def _row(cell, budgets: list[int]) -> dict[str, Any]:
    """One JSON row: the cell's figures and, per budget label, whether it fits."""
    def value(key: str) -> Any:
        item = cell.get(key)
        return None if item is None or (isinstance(item, float) and item != item) else item

    peak = value("peak_bytes")
    return {
        "method": str(cell["method"]), "batch_size": int(cell["batch_size"]), "seq_len": int(cell["seq_len"]),
        "status": cell["status"], "message": cell["message"],
        "peak_bytes": None if peak is None else int(peak),
        "needed_bytes": None if peak is None else int(needed_bytes(peak)),
        "peak_ratio": value("peak_ratio"), "step_time_s": value("step_time_s"),
        "step_time_kind": value("step_time_kind"), "step_time_target": value("step_time_target"),
        "time_ratio": value("time_ratio"),
        "fits": {} if peak is None else {budget_label(b): fits(peak, b) for b in sorted(budgets, reverse=True)},
    }
