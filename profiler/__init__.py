"""The WTA-CRS memory profiler: suites of training-step measurements, their report and CI gate.

The public API (``python -m profiler run|report|check`` is the same pipeline)::

    import profiler

    suite = profiler.load_suite("suites/smoke.yaml")
    result = profiler.run_suite(profiler.plan_run(suite, "reports/smoke"))
    page = profiler.render_report(result.results_path)
    code = profiler.run_check(result.results_path)       # 0 held, 1 regressed, 2 bad input

    with profiler.profile_step(model, optimizer) as prof:  # one step of your own code
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
    prof.peak_bytes, prof.activations_by_operator(), prof.flops

``prepare_method(name, model, family)`` applies a suite method (``lora``, ``wtacrs@0.3``...).
Names are imported on first use, so ``import profiler`` (and ``python -m profiler --help``)
loads none of torch, pandas or matplotlib.
"""

from __future__ import annotations

import importlib
from typing import Any

# public name -> (module, attribute)
_EXPORTS = {
    "load_suite": ("profiler.suite", "load_suite"),
    "plan_run": ("profiler.runner", "plan_run"),
    "run_suite": ("profiler.runner", "run_suite"),
    "render_report": ("profiler.report", "render_report"),
    "run_check": ("profiler.check", "run_check"),
    "profile_step": ("profiler.step", "profile_step"),
    "prepare_method": ("profiler.methods", "prepare"),
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'profiler' has no attribute {name!r}")
    module, attribute = _EXPORTS[name]
    value = getattr(importlib.import_module(module), attribute)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
