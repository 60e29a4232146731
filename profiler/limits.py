"""Limits the CLI's help names, importable without torch (``python -m profiler --help`` stays fast)."""

MAX_CELLS = 1_000  # a larger suite needs ``run --max-cells N`` (``profiler.suite``)
