"""Suites: a YAML file naming models, a grid, methods, training settings, a device and checks.

``load_suite(path)`` reads the file with a ``yaml.SafeLoader``, validates all of it and returns a
frozen ``Suite``; on bad input it raises ``SuiteError`` holding every problem, one line each,
as ``FILE:LINE: KEY: reason``. ``Suite.cells()`` expands the grid into ``Cell``s, each with a
stable ``cell_id`` and the ``params`` of its record (``profiler.records``).

What a file may make the loader and the validator do is capped, so that no file can exhaust
memory or time: at most ``MAX_SUITE_BYTES`` (64 KiB; the shipped suites are under 3 KiB), at
most ``MAX_YAML_VALUES`` (5,000) values with every alias counted as what it expands to, at most
``MAX_YAML_DEPTH`` (32) levels of nesting, and no key given twice in one mapping. A suite of more
than ``MAX_CELLS`` (1,000) cells, counted from the axis lengths before anything is expanded,
needs ``max_cells`` raised (``run --max-cells N``). Every model config is built once per distinct
set of dimensions, on meta, so that a config no model can be built from is a validation error.

A suite file::

    name: t5                          # default: the file stem
    model:                            # one entry or a list
      - {family: t5, preset: t5-base, config: {dropout_rate: 0.1}}
    grid:
      batch_size: [16, 32, 64]
      seq_len: [128, 256]
      target_len: [8]                 # encoder-decoder only; default: seq_len
      d_model: [768]                  # default: the preset's; so are n_head, d_ff, d_head
      n_head: [12]
    methods: [full, lora, checkpointing, wtacrs@0.3, wtacrs-linear@0.3, lora+wtacrs@0.3]
    training: {dtype: float32, optimizer: adamw, warmup_steps: 1, timed_steps: 3,
               attn_implementation: eager, pad_fraction: 0.0, seed: 0,
               threads: 1}                # cpu threads of cpu runs (default: torch's)
    device: auto                      # auto | cpu | cuda | meta
    models_device: cuda               # whose kernels meta estimates model: cuda | cpu
    budgets: {memory_fraction: 0.6, cell_seconds: 60, suite_seconds: 600,
              memory_gib: [80, 40, 24]}    # report: largest batch size within these sizes
    checks:
      - {metric: peak_bytes, numerator: full, denominator: wtacrs@0.3, min: 2.5,
         where: {batch_size: 64, seq_len: 128}}
"""

from __future__ import annotations

import difflib
import itertools
import math
import os
import reprlib
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from profiler import methods as methods_table
from profiler.models import (
    ARCHITECTURES,
    ATTN_IMPLEMENTATIONS,
    DEFAULT_PRESETS,
    DTYPES,
    PRESETS,
    Dims,
    DimsError,
    build_problem,
    config_keys,
    config_problems,
    max_positions,
    one_line,
    resolve_dims,
)

DEVICES = ("auto", "cpu", "cuda", "meta")
MODELS_DEVICES = ("cuda", "cpu")
OPTIMIZERS = ("adamw", "sgd")
CHECK_METRICS = ("peak_bytes", "activation_bytes")
GRID_KEYS = ("batch_size", "seq_len", "target_len", "d_model", "n_head", "d_ff", "d_head")
# keys a check's ``where`` may select on: the record params that vary across cells
WHERE_KEYS = ("model", "family", "batch_size", "seq_len", "target_len", "d_model", "n_head", "d_ff", "d_head")

# Caps on what a file may make the loader and the validator do (module docstring).
MAX_SUITE_BYTES = 64 * 2**10
MAX_YAML_VALUES = 5_000
MAX_YAML_DEPTH = 32
MAX_CELLS = 1_000
MAX_NAME_CHARS = 100  # a suite name is a directory name (reports/<name>), a model name part of cell ids
MAX_SIZE = 2**31 - 1  # grid values and step counts: far beyond any real run, within a tensor's index
MAX_SEED = 2**64 - 1  # torch.Generator.manual_seed's range


class SuiteError(Exception):
    """Bad suite input. ``lines`` holds one line per problem: file, key and reason."""

    def __init__(self, lines: list[str]):
        super().__init__("\n".join(lines))
        self.lines = list(lines)


@dataclass(frozen=True)
class ModelSpec:
    name: str  # label used in cell ids and reports (the preset unless given)
    family: str
    preset: str
    config: tuple[tuple[str, Any], ...] = ()  # transformers config overrides, sorted by key


@dataclass(frozen=True)
class Grid:
    """Swept values; None means "the preset's" (target_len: "seq_len")."""

    batch_size: tuple[int, ...]
    seq_len: tuple[int, ...]
    target_len: tuple[int, ...] | None = None
    d_model: tuple[int, ...] | None = None
    n_head: tuple[int, ...] | None = None
    d_ff: tuple[int, ...] | None = None
    d_head: tuple[int, ...] | None = None


@dataclass(frozen=True)
class Training:
    dtype: str = "float32"
    optimizer: str = "adamw"
    warmup_steps: int = 1
    timed_steps: int = 3
    attn_implementation: str = "eager"
    pad_fraction: float = 0.0
    seed: int = 0
    threads: int | None = None  # torch.set_num_threads for runs on the cpu; None: torch's default


@dataclass(frozen=True)
class Budgets:
    """Limits for ``device: auto`` on a machine without cuda (CPU runs), and the report's memory sizes."""

    memory_fraction: float = 0.6  # of the RAM available when the run starts
    cell_seconds: float = 60.0  # estimated CPU time of one cell (warm-up + timed steps)
    suite_seconds: float = 600.0  # estimated CPU time of all CPU-run cells together
    # accelerator memory sizes (GiB) of the report's "largest batch size within a budget" plot
    memory_gib: tuple[float, ...] = (80.0, 40.0, 24.0)


@dataclass(frozen=True)
class Check:
    """Every grid point matching ``where`` must have min <= metric(numerator)/metric(denominator) <= max."""

    metric: str
    denominator: str
    numerator: str = "full"
    min: float | None = None
    max: float | None = None
    where: tuple[tuple[str, Any], ...] = ()


@dataclass(frozen=True)
class Cell:
    """One measured point: a model, a method and one value of every grid axis."""

    suite: str
    model: str
    family: str
    preset: str
    config: tuple[tuple[str, Any], ...]
    method: str
    batch_size: int
    seq_len: int
    target_len: int | None
    d_model: int
    n_head: int
    d_ff: int
    d_head: int
    n_layers: int
    dtype: str
    optimizer: str
    attn_implementation: str
    pad_fraction: float
    warmup_steps: int
    timed_steps: int
    seed: int
    threads: int | None = None  # cpu threads (``Training.threads``); not part of the cell's identity
    id_axes: tuple[str, ...] = field(default=(), compare=False)  # optional axes named in the id

    @property
    def cell_id(self) -> str:
        """``MODEL/METHOD/B64-S128-T128-D768-H12`` (+ ``-F3072``/``-K64`` when d_ff/d_head are swept)."""
        point = f"B{self.batch_size}-S{self.seq_len}"
        if self.target_len is not None:
            point += f"-T{self.target_len}"
        point += f"-D{self.d_model}-H{self.n_head}"
        if "d_ff" in self.id_axes:
            point += f"-F{self.d_ff}"
        if "d_head" in self.id_axes:
            point += f"-K{self.d_head}"
        return f"{self.model}/{self.method}/{point}"

    @property
    def params(self) -> dict[str, Any]:
        """The record's ``params`` (see ``profiler.records``)."""
        return {
            "model": self.model,
            "family": self.family,
            "method": self.method,
            "batch_size": self.batch_size,
            "seq_len": self.seq_len,
            "target_len": self.target_len,
            "d_model": self.d_model,
            "n_head": self.n_head,
            "d_ff": self.d_ff,
            "d_head": self.d_head,
            "n_layers": self.n_layers,
            "dtype": self.dtype,
            "optimizer": self.optimizer,
            "attn_implementation": self.attn_implementation,
        }


@dataclass(frozen=True)
class Suite:
    name: str
    source: str
    models: tuple[ModelSpec, ...]
    grid: Grid
    methods: tuple[str, ...]
    training: Training = Training()
    device: str = "auto"
    models_device: str = "cuda"
    budgets: Budgets = Budgets()
    checks: tuple[Check, ...] = ()

    def cells(self) -> list[Cell]:
        """Every cell, ordered model > dimensions > method > seq_len > target_len > batch_size,
        so that consecutive cells share a model (the runner reuses meta models across them)."""
        return _expand(self)

    @property
    def n_cells(self) -> int:
        """``len(self.cells())``, from the axis lengths: nothing is expanded."""
        return _cell_count(self.models, self.grid, self.methods)

    def to_json(self) -> dict[str, Any]:
        """The normalised suite, as written to ``suite.json`` beside ``results.jsonl``."""
        grid = {k: list(v) for k, v in asdict(self.grid).items() if v is not None}
        return {
            "name": self.name,
            "source": self.source,
            "model": [
                {"name": m.name, "family": m.family, "preset": m.preset, "config": dict(m.config)} for m in self.models
            ],
            "grid": grid,
            "methods": list(self.methods),
            "training": asdict(self.training),
            "device": self.device,
            "models_device": self.models_device,
            "budgets": asdict(self.budgets),
            "checks": [{**asdict(c), "where": dict(c.where)} for c in self.checks],
            "cells": [c.cell_id for c in self.cells()],
        }


def _cell_count(models: tuple[ModelSpec, ...], grid: Grid, methods: tuple[str, ...]) -> int:
    dims = math.prod(len(getattr(grid, axis) or (None,)) for axis in ("d_model", "n_head", "d_ff", "d_head"))
    per_target = dims * len(methods) * len(grid.seq_len) * len(grid.batch_size)
    targets = len(grid.target_len or (None,))  # target_len defaults to one value per seq_len
    return sum(per_target * (targets if ARCHITECTURES[m.family].encoder_decoder else 1) for m in models)


def _expand(suite: Suite) -> list[Cell]:
    grid = suite.grid
    id_axes = tuple(axis for axis in ("d_ff", "d_head") if getattr(grid, axis) is not None)
    cells = []
    for spec in suite.models:
        overrides = dict(spec.config)
        encoder_decoder = ARCHITECTURES[spec.family].encoder_decoder
        for d_model, n_head, d_ff, d_head in itertools.product(
            grid.d_model or (None,), grid.n_head or (None,), grid.d_ff or (None,), grid.d_head or (None,)
        ):
            dims = resolve_dims(spec.preset, overrides, d_model=d_model, n_head=n_head, d_ff=d_ff, d_head=d_head)
            for method, seq_len in itertools.product(suite.methods, grid.seq_len):
                targets = (grid.target_len or (seq_len,)) if encoder_decoder else (None,)
                for target_len, batch_size in itertools.product(targets, grid.batch_size):
                    cells.append(
                        Cell(
                            suite=suite.name, model=spec.name, family=spec.family, preset=spec.preset,
                            config=spec.config, method=method, batch_size=batch_size, seq_len=seq_len,
                            target_len=target_len, d_model=dims.d_model, n_head=dims.n_head, d_ff=dims.d_ff,
                            d_head=dims.d_head, n_layers=dims.n_layers, id_axes=id_axes,
                            **asdict(suite.training),
                        )
                    )
    return cells


# ---------------------------------------------------------------------------------------------
# Loading and validation


class _Problems:
    """Collects error lines; knows the YAML line of every key path it was given."""

    def __init__(self, path: Path, lines: dict[str, int]):
        self.path, self.lines, self.items = path, lines, []

    def add_key(self, key: str, reason: str) -> None:
        line = self._line(key)
        where = f"{self.path}:{line}" if line else f"{self.path}"
        shown = key if key.isprintable() else _shown(key)  # a key from the file must not break the line
        self.items.append((line or 0, where, f"{shown}: {reason}" if key else reason))

    def _line(self, key: str) -> int | None:
        while key:
            if key in self.lines:
                return self.lines[key]
            key = key.rsplit(".", 1)[0] if "." in key else ""
        return None

    def result(self) -> list[str]:
        # in file order, as an editor would show them (sorted() is stable within a line)
        return [f"{where}: {reason}" for _, where, reason in sorted(self.items, key=lambda item: item[0])]


class _YAMLLimit(yaml.MarkedYAMLError):
    """A document past one of the loader's caps; ``problem`` says which."""


class _SuiteLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses, while composing, a document nested deeper than
    ``MAX_YAML_DEPTH`` or holding more than ``MAX_YAML_VALUES`` values, each alias counted as the
    size of the node it names: the composer shares aliased nodes, but every walk over the result
    (key lines, validation, messages) meets them once per reference ("billion laughs")."""

    def __init__(self, stream: str):
        super().__init__(stream)
        self.depth, self.values = 0, 0
        self.expanded: dict[int, int] = {}  # id(node) -> its values, aliases expanded

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node:
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent):
            node = self.anchors.get(event.anchor)  # an undefined alias is the composer's own error
            if node is not None:
                if id(node) not in self.expanded:  # its anchor is still open: the alias is inside it
                    raise _YAMLLimit(problem=f"YAML alias *{event.anchor} refers to itself", problem_mark=event.start_mark)
                self._count(self.expanded[id(node)], event.start_mark)
            return super().compose_node(parent, index)
        self.depth += 1
        if self.depth > MAX_YAML_DEPTH:
            raise _YAMLLimit(problem=f"YAML nested deeper than {MAX_YAML_DEPTH} levels", problem_mark=event.start_mark)
        before = self.values
        self._count(1, event.start_mark)
        node = super().compose_node(parent, index)
        self.depth -= 1
        self.expanded[id(node)] = self.values - before
        return node

    def _count(self, values: int, mark: yaml.Mark) -> None:
        self.values += values
        if self.values > MAX_YAML_VALUES:
            raise _YAMLLimit(problem=f"more than {MAX_YAML_VALUES} YAML values once aliases are expanded",
                             problem_mark=mark)


_MERGE_TAG = "tag:yaml.org,2002:merge"


def _key_lines(root: yaml.Node | None) -> tuple[dict[str, int], list[tuple[int, str, int]]]:
    """The YAML line (1-based) of every key path, e.g. ``grid.batch_size`` or ``model[1].preset``,
    and every key a mapping gives twice, as (line, key path, line of its first occurrence).

    Reads the composed nodes, before construction flattens merge keys: a key after ``<<: *base``
    overrides the merged one and is no repeat.
    """
    lines: dict[str, int] = {}
    repeats: dict[int, tuple[int, str, int]] = {}  # by line: an aliased mapping is walked once per path

    def walk(node: yaml.Node, prefix: str) -> None:
        if isinstance(node, yaml.MappingNode):
            first: dict[tuple[str, Any], int] = {}
            for key_node, value_node in node.value:
                if key_node.tag == _MERGE_TAG:
                    continue
                key = f"{prefix}.{key_node.value}" if prefix else str(key_node.value)
                line = key_node.start_mark.line + 1
                if isinstance(key_node, yaml.ScalarNode):
                    seen = first.setdefault((key_node.tag, key_node.value), line)
                    if seen != line:
                        repeats.setdefault(line, (line, key, seen))
                lines.setdefault(key, line)
                walk(value_node, key)
        elif isinstance(node, yaml.SequenceNode):
            for index, item in enumerate(node.value):
                key = f"{prefix}[{index}]"
                lines[key] = item.start_mark.line + 1
                walk(item, key)

    if root is not None:
        walk(root, "")
    return lines, sorted(repeats.values())


def _load_yaml(path: Path, text: str) -> tuple[Any, dict[str, int]]:
    """``text`` loaded by ``_SuiteLoader``, and the line of every key path; SuiteError on bad YAML."""
    loader = _SuiteLoader(text)
    try:
        node = loader.get_single_node()
        lines, repeats = _key_lines(node)
        if repeats:
            raise SuiteError([f"{path}:{line}: {key}: repeated key (first on line {first})"
                              for line, key, first in repeats])
        return (loader.construct_document(node) if node is not None else None), lines
    except _YAMLLimit as e:
        raise SuiteError([f"{path}:{e.problem_mark.line + 1}: {e.problem}"]) from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else f"{path}"
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise SuiteError([f"{where}: YAML syntax error: {problem}"]) from None
    finally:
        loader.dispose()


def _did_you_mean(word: str, choices: list[str] | tuple[str, ...]) -> str:
    close = difflib.get_close_matches(str(word), list(choices), n=1)
    listed = "expected one of " + ", ".join(choices) if len(choices) <= 8 else ""
    if close:
        return f"did you mean {close[0]!r}?" + (f" ({listed})" if listed else "")
    return listed or "expected one of " + ", ".join(sorted(choices))


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


_REPR = reprlib.Repr()
_REPR.maxstring = _REPR.maxother = 80
_shown = _REPR.repr  # values in messages: a 60 KiB string is not echoed whole


def _bound(value: float) -> str:
    return str(value) if isinstance(value, int) else f"{value:g}"


def _name_problem(name: Any) -> str | None:
    """Why ``name`` cannot name a suite or a model (a directory name, part of cell ids), or None."""
    if not isinstance(name, str) or not name.strip() or "/" in name or name in (".", "..") or not name.isprintable():
        return f"expected a non-empty name of printable characters without '/', got {_shown(name)}"
    if len(name) > MAX_NAME_CHARS:
        return f"expected at most {MAX_NAME_CHARS} characters, got {len(name)}"
    return None


class _Parser:
    def __init__(self, path: Path, problems: _Problems):
        self.path, self.p = path, problems

    def mapping(self, key: str, value: Any, allowed: tuple[str, ...]) -> dict[str, Any] | None:
        if not isinstance(value, dict):
            self.p.add_key(key, f"expected a mapping, got {_type_name(value)}")
            return None
        for name in value:
            if name not in allowed:
                self.p.add_key(f"{key}.{name}" if key else str(name), f"unknown key; {_did_you_mean(name, allowed)}")
        return value

    def choice(self, key: str, value: Any, choices: tuple[str, ...]) -> str | None:
        if not isinstance(value, str) or value not in choices:
            self.p.add_key(key, f"{_shown(value)} is not allowed; {_did_you_mean(value, choices)}")
            return None
        return value

    def number(self, key: str, value: Any, *, integer: bool, low: float, low_open: bool = False,
               high: float | None = None) -> Any:
        """A finite int (``integer``) or int/float within the bounds; integers are at most MAX_SIZE
        unless ``high`` says otherwise."""
        if not (_is_int(value) if integer else _is_number(value)):
            self.p.add_key(key, f"expected {'an integer' if integer else 'a number'}, got {_type_name(value)} "
                                f"{_shown(value)}")
            return None
        if isinstance(value, float) and not math.isfinite(value):  # NaN passes every comparison
            self.p.add_key(key, f"expected a finite number, got {value!r}")
            return None
        high = MAX_SIZE if high is None and integer else high
        if value < low or (low_open and value == low) or (high is not None and value > high):
            bound = f"{'>' if low_open else '>='} {_bound(low)}" + (f" and <= {_bound(high)}" if high is not None else "")
            self.p.add_key(key, f"{_shown(value)} must be {bound}")
            return None
        return value

    def positive_list(self, key: str, value: Any) -> tuple[float, ...] | None:
        """A number or a non-empty list of distinct positive numbers, largest first."""
        items = value if isinstance(value, list) else [value]
        if not items:
            self.p.add_key(key, "empty list; give at least one value")
            return None
        parsed = [self.number(f"{key}[{i}]" if isinstance(value, list) else key, v, integer=False, low=0,
                              low_open=True) for i, v in enumerate(items)]
        if any(v is None for v in parsed):
            return None
        if len(set(parsed)) != len(parsed):
            self.p.add_key(key, f"repeated values in {parsed}")
            return None
        return tuple(sorted((float(v) for v in parsed), reverse=True))

    def int_list(self, key: str, value: Any) -> tuple[int, ...] | None:
        items = value if isinstance(value, list) else [value]
        if isinstance(value, list) and not value:
            self.p.add_key(key, "empty list; give at least one value")
            return None
        parsed = [self.number(f"{key}[{i}]", v, integer=True, low=1) for i, v in enumerate(items)]
        if any(v is None for v in parsed):
            return None
        if len(set(parsed)) != len(parsed):
            self.p.add_key(key, f"repeated values in {parsed}")
            return None
        return tuple(parsed)


def _parse_models(parser: _Parser, value: Any) -> tuple[ModelSpec, ...] | None:
    p = parser.p
    entries = value if isinstance(value, list) else [value]
    if isinstance(value, list) and not value:
        p.add_key("model", "empty list; give at least one model")
        return None
    specs = []
    for index, entry in enumerate(entries):
        key = f"model[{index}]" if isinstance(value, list) else "model"
        if isinstance(entry, str):  # `model: t5-base` is shorthand for {preset: t5-base}
            entry = {"preset": entry}
        entry = parser.mapping(key, entry, ("family", "preset", "config", "name"))
        if entry is None:
            continue
        family, preset = entry.get("family"), entry.get("preset")
        if family is not None and family not in ARCHITECTURES:
            p.add_key(f"{key}.family", f"unknown family {family!r}; {_did_you_mean(family, tuple(ARCHITECTURES))}")
            continue
        if preset is None:
            if family is None:
                p.add_key(key, "give a preset (e.g. t5-base) or a family")
                continue
            preset = DEFAULT_PRESETS[family]
        if preset not in PRESETS:
            p.add_key(f"{key}.preset", f"unknown preset {preset!r}; {_did_you_mean(preset, tuple(PRESETS))}")
            continue
        if family is not None and PRESETS[preset].family != family:
            p.add_key(f"{key}.family", f"preset {preset!r} is a {PRESETS[preset].family} model, not {family}")
            continue
        family = PRESETS[preset].family
        config = entry.get("config") or {}
        if not isinstance(config, dict):
            p.add_key(f"{key}.config", f"expected a mapping of {family} config keys, got {_type_name(config)}")
            continue
        known = config_keys(family)
        bad = [k for k in config if k not in known]
        for k in bad:
            p.add_key(f"{key}.config.{k}", f"not a {family} config key; {_did_you_mean(k, tuple(sorted(known)))}")
        if bad:
            continue
        try:
            problems = config_problems(family, {**PRESETS[preset].config, **config})
        except Exception as e:  # noqa: BLE001 -- transformers validates values in the config constructor
            p.add_key(f"{key}.config", f"{family} config rejected it: {one_line(e)}")
            continue
        for k, reason in problems:  # keyed where the suite set the key
            if k in config:
                p.add_key(f"{key}.config.{k}", reason)
            else:
                p.add_key(f"{key}.config", f"{entry.get('name', preset)}: {reason}" + (f" ({k})" if k else ""))
        if problems:
            continue
        name = entry.get("name", preset)
        problem = _name_problem(name)
        if problem:
            p.add_key(f"{key}.name", problem)
            continue
        specs.append(ModelSpec(name, family, preset, tuple(sorted(config.items()))))
    names = [s.name for s in specs]
    for name in sorted({n for n in names if names.count(n) > 1}):
        p.add_key("model", f"model name {name!r} appears twice; give each entry its own `name`")
    return tuple(specs) if len(specs) == len(entries) else None


def _parse_grid(parser: _Parser, value: Any) -> Grid | None:
    grid = parser.mapping("grid", value, GRID_KEYS)
    if grid is None:
        return None
    ok = True
    values: dict[str, tuple[int, ...] | None] = {}
    for axis in GRID_KEYS:
        if axis not in grid:
            if axis in ("batch_size", "seq_len"):
                parser.p.add_key(f"grid.{axis}", "missing; give a list of positive integers")
                ok = False
            values[axis] = None
            continue
        values[axis] = parser.int_list(f"grid.{axis}", grid[axis])
        ok &= values[axis] is not None
    return Grid(**values) if ok and set(grid) <= set(GRID_KEYS) else None


def _parse_methods(parser: _Parser, value: Any) -> tuple[str, ...] | None:
    if not isinstance(value, list) or not value:
        parser.p.add_key("methods", f"expected a non-empty list of methods ({methods_table.METHOD_NAMES_HELP})")
        return None
    names = []
    for index, name in enumerate(value):
        key = f"methods[{index}]"
        if not isinstance(name, str):
            parser.p.add_key(key, f"expected a method name, got {_type_name(name)} {name!r}")
            continue
        try:
            names.append(methods_table.canonical(name))
        except methods_table.MethodError as e:
            parser.p.add_key(key, str(e))
    for name in sorted({n for n in names if names.count(n) > 1}):
        parser.p.add_key("methods", f"method {name!r} appears twice")
    return tuple(names) if len(names) == len(value) else None


def _parse_section(parser: _Parser, key: str, value: Any, cls: type, rules: dict[str, Callable[[str, Any], Any]]):
    section = parser.mapping(key, value, tuple(rules))
    if section is None:
        return None
    parsed = {name: rule(f"{key}.{name}", section[name]) for name, rule in rules.items() if name in section}
    if None in parsed.values() or not set(section) <= set(rules):
        return None
    return cls(**parsed)


def _parse_checks(parser: _Parser, value: Any, methods: tuple[str, ...] | None) -> tuple[Check, ...] | None:
    p = parser.p
    if not isinstance(value, list):
        p.add_key("checks", f"expected a list of ratio bounds, got {_type_name(value)}")
        return None
    checks = []
    for index, entry in enumerate(value):
        key = f"checks[{index}]"
        entry = parser.mapping(key, entry, ("metric", "numerator", "denominator", "min", "max", "where"))
        if entry is None:
            continue
        ok = True
        metric = parser.choice(f"{key}.metric", entry.get("metric"), CHECK_METRICS)
        ok &= metric is not None
        roles = {}
        for role, default in (("numerator", "full"), ("denominator", None)):
            name = entry.get(role, default)
            if name is None:
                p.add_key(f"{key}.{role}", "missing; name a method of the suite")
                ok = False
                continue
            try:
                name = methods_table.canonical(str(name))
            except methods_table.MethodError as e:
                p.add_key(f"{key}.{role}", str(e))
                ok = False
                continue
            if methods is not None and name not in methods:
                p.add_key(f"{key}.{role}", f"method {name!r} is not in `methods`; {_did_you_mean(name, methods)}")
                ok = False
            roles[role] = name
        bounds = {}
        for bound in ("min", "max"):
            if bound in entry:
                bounds[bound] = parser.number(f"{key}.{bound}", entry[bound], integer=False, low=0, low_open=True)
                ok &= bounds[bound] is not None
        if not bounds:
            p.add_key(key, "give a ratio bound: min, max or both")
            ok = False
        elif bounds.get("min") is not None and bounds.get("max") is not None and bounds["min"] > bounds["max"]:
            p.add_key(key, f"bad ratio bounds: min {bounds['min']:g} > max {bounds['max']:g}")
            ok = False
        where = entry.get("where") or {}
        if parser.mapping(f"{key}.where", where, WHERE_KEYS) is None or not set(where) <= set(WHERE_KEYS):
            ok = False
        if ok:
            checks.append(Check(metric=metric, where=tuple(sorted(where.items())), **roles, **bounds))
    return tuple(checks) if len(checks) == len(value) else None


def _cross_check(p: _Problems, suite: Suite, model_keys: list[str]) -> None:
    """Checks that need every section: dimensions per model, one meta build of every distinct
    model config, sequence limits, checks' cells."""
    grid = suite.grid
    encoder_decoder = any(ARCHITECTURES[m.family].encoder_decoder for m in suite.models)
    if grid.target_len is not None and not encoder_decoder:
        p.add_key("grid.target_len", "applies to encoder-decoder models (t5) only; none is in `model`")
    swept = grid.d_model or grid.n_head or grid.d_ff or grid.d_head
    axis = "grid.n_head" if grid.n_head else "grid.d_model" if grid.d_model else "grid.d_head"
    for spec, model_key in zip(suite.models, model_keys):
        overrides = dict(spec.config)
        built: set[Dims] = set()
        for d_model, n_head, d_ff, d_head in itertools.product(
            grid.d_model or (None,), grid.n_head or (None,), grid.d_ff or (None,), grid.d_head or (None,)
        ):
            try:
                dims = resolve_dims(spec.preset, overrides, d_model=d_model, n_head=n_head, d_ff=d_ff, d_head=d_head)
            except DimsError as e:
                p.add_key(axis, f"{spec.name}: {e}")
                continue
            if dims in built:
                continue
            built.add(dims)
            problem = build_problem(spec.preset, overrides, dims, suite.training.attn_implementation)
            if problem:
                at = f" at d_model {dims.d_model}, n_head {dims.n_head}, d_ff {dims.d_ff}, d_head {dims.d_head}"
                p.add_key(axis if swept else f"{model_key}.config", f"{spec.name}{at if swept else ''}: {problem}")
                break  # the model's other grid points would say the same
        limit = max_positions(spec.family, spec.preset, overrides)
        if limit is not None and max(grid.seq_len) > limit:
            p.add_key(
                "grid.seq_len",
                f"{max(grid.seq_len)} exceeds {spec.name}'s {limit} positions "
                f"(raise {ARCHITECTURES[spec.family].max_positions} under model.config)",
            )
    if p.items or not suite.checks:
        return
    cells = suite.cells()
    for index, check in enumerate(suite.checks):
        where = dict(check.where)
        matched = [c for c in cells if all(c.params.get(k) == v for k, v in where.items())]
        methods_seen = {c.method for c in matched}
        if not {check.numerator, check.denominator} <= methods_seen:
            shown = ", ".join(f"{k}={v!r}" for k, v in where.items())
            p.add_key(f"checks[{index}].where", f"no grid point matches {{{shown}}}")


def load_suite(path: str | Path, *, max_cells: int = MAX_CELLS) -> Suite:
    """Read and validate a suite file; raise SuiteError with every problem found.

    A suite of more than ``max_cells`` cells is refused (counted, not expanded).
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:  # read no more than the cap: the file may be huge, or /dev/zero
            raw = f.read(MAX_SUITE_BYTES + 1)
            size = os.fstat(f.fileno()).st_size
        text = raw.decode("utf-8")
    except FileNotFoundError:
        raise SuiteError([f"{path}: suite file not found"]) from None
    except (OSError, UnicodeDecodeError) as e:
        raise SuiteError([f"{path}: cannot read suite file: {getattr(e, 'strerror', None) or e}"]) from None
    if len(raw) > MAX_SUITE_BYTES:
        shown = f"{size} bytes" if size > MAX_SUITE_BYTES else f"more than {MAX_SUITE_BYTES} bytes"
        raise SuiteError([f"{path}: {shown}; a suite file may have at most {MAX_SUITE_BYTES // 2**10} KiB "
                          f"({MAX_SUITE_BYTES} bytes)"])
    data, lines = _load_yaml(path, text)
    return parse_suite(data, path, lines, max_cells=max_cells)


def parse_suite(data: Any, path: str | Path = "<suite>", lines: dict[str, int] | None = None, *,
                max_cells: int = MAX_CELLS) -> Suite:
    """Validate an already-loaded suite mapping (``load_suite`` without the file)."""
    path = Path(path)
    p = _Problems(path, lines or {})
    parser = _Parser(path, p)
    top = ("name", "description", "model", "grid", "methods", "training", "device", "models_device", "budgets", "checks")
    data = parser.mapping("", data, top) if data is not None else None
    if data is None:
        if not p.items:
            p.add_key("", "empty suite file; it needs at least model, grid and methods")
        raise SuiteError(p.result())
    for required in ("model", "grid", "methods"):
        if required not in data:
            p.add_key(required, "missing (required)")
    name = data.get("name", path.stem)
    problem = _name_problem(name)
    if problem:
        p.add_key("name", problem)
        name = None
    models = _parse_models(parser, data["model"]) if "model" in data else None
    grid = _parse_grid(parser, data["grid"]) if "grid" in data else None
    methods = _parse_methods(parser, data["methods"]) if "methods" in data else None

    def integer(low: int, high: int | None = None) -> Callable[[str, Any], Any]:
        return lambda key, v: parser.number(key, v, integer=True, low=low, high=high)

    training = _parse_section(parser, "training", data.get("training", {}), Training, {
        "dtype": lambda key, v: parser.choice(key, v, tuple(DTYPES)),
        "optimizer": lambda key, v: parser.choice(key, v, OPTIMIZERS),
        "warmup_steps": integer(1),  # peak is taken after warm-up, once optimizer state exists
        "timed_steps": integer(1),
        "attn_implementation": lambda key, v: parser.choice(key, v, ATTN_IMPLEMENTATIONS),
        "pad_fraction": lambda key, v: parser.number(key, v, integer=False, low=0, high=0.99),
        "seed": integer(0, MAX_SEED),
        "threads": integer(1),
    })
    budgets = _parse_section(parser, "budgets", data.get("budgets", {}), Budgets, {
        "memory_fraction": lambda key, v: parser.number(key, v, integer=False, low=0, low_open=True, high=1),
        "cell_seconds": lambda key, v: parser.number(key, v, integer=False, low=0),
        "suite_seconds": lambda key, v: parser.number(key, v, integer=False, low=0),
        "memory_gib": parser.positive_list,
    })
    device = parser.choice("device", data.get("device", "auto"), DEVICES)
    models_device = parser.choice("models_device", data.get("models_device", "cuda"), MODELS_DEVICES)
    description = data.get("description")
    if description is not None and not isinstance(description, str):
        p.add_key("description", f"expected text, got {_type_name(description)}")
    checks = _parse_checks(parser, data.get("checks") or [], methods)
    if None not in (models, grid, methods) and (n_cells := _cell_count(models, grid, methods)) > max_cells:
        p.add_key("grid", f"{n_cells} cells, more than the limit of {max_cells} (raise it with --max-cells)")
    if p.items or None in (name, models, grid, methods, training, budgets, device, models_device, checks):
        raise SuiteError(p.result() or [f"{path}: invalid suite"])
    suite = Suite(
        name=name, source=str(path), models=models, grid=grid, methods=methods, training=training,
        device=device, models_device=models_device, budgets=budgets, checks=checks,
    )
    model_keys = [f"model[{i}]" for i in range(len(models))] if isinstance(data["model"], list) else ["model"]
    _cross_check(p, suite, model_keys)
    if p.items:
        raise SuiteError(p.result())
    return suite
