"""Suites: a YAML file naming models, a grid, methods, training settings, a device and checks.

``load_suite(path)`` reads the file with a ``yaml.SafeLoader``, validates all of it against the
pydantic models below and returns a frozen ``Suite``; on bad input it raises ``SuiteError``
holding every problem, one line each, as ``FILE:LINE: KEY: reason``. ``Suite.cells()`` expands
the grid once into ``Cell``s, each with a stable ``cell_id``, the ``params`` of its record
(``profiler.records``), its parsed ``Method`` and the ``ModelPoint`` built for its dimensions.

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
               threads: 1,                # cpu threads of cpu runs (default: torch's)
               target: a100-80gb}         # GPU of estimated step times (profiler.gpus.GPUS)
    device: auto                      # auto | cpu | cuda | meta
    models_device: cuda               # whose kernels meta estimates model: cuda | cpu
    budgets: {memory_fraction: 0.6, cell_seconds: 60, suite_seconds: 600,
              memory_gib: [80, 40, 24]}    # report: largest batch size within these sizes
    checks:
      - {metric: peak_bytes, numerator: full, denominator: wtacrs@0.3, min: 2.5,
         where: {batch_size: 64, seq_len: 128}}
    parallel:                         # optional; batch sizes are per GPU (``profiler.parallel``)
      strategy: fsdp                  # none | ddp | fsdp
      world_size: [1, 8, 64]          # a grid axis: one cell per world size
      reshard_after_forward: true     # fsdp
      bucket_cap_mb: 25               # ddp
"""

from __future__ import annotations

import difflib
import itertools
import math
import os
import reprlib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Annotated, Any, get_args

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    PlainValidator,
    PrivateAttr,
    Strict,
    ValidationError,
    model_validator,
)
from pydantic_core import PydanticCustomError

from profiler import methods as methods_table
from profiler.gpus import DEFAULT_TARGET, GPUS
from profiler.limits import MAX_CELLS
from profiler.parallel import STRATEGIES, ParallelSettings
from profiler.models import (
    ARCHITECTURES,
    ATTN_IMPLEMENTATIONS,
    DTYPES,
    PRESETS,
    BuildError,
    Dims,
    DimsError,
    ModelPoint,
    config_keys,
    config_problems,
    max_positions,
    model_point,
    one_line,
    resolve_dims,
)

DEVICES = ("auto", "cpu", "cuda", "meta")
MODELS_DEVICES = ("cuda", "cpu")
OPTIMIZERS = ("adamw", "sgd")
CHECK_METRICS = ("peak_bytes", "activation_bytes")
# keys a check's ``where`` may select on: the record params that vary across cells
WHERE_KEYS = ("model", "family", "batch_size", "seq_len", "target_len", "d_model", "n_head", "d_ff", "d_head",
              "strategy", "world_size")

# Caps on what a file may make the loader and the validator do (module docstring).
MAX_SUITE_BYTES = 64 * 2**10
MAX_YAML_VALUES = 5_000
MAX_YAML_DEPTH = 32
MAX_NAME_CHARS = 100  # a suite name is a directory name (reports/<name>), a model name part of cell ids
MAX_SIZE = 2**31 - 1  # grid values and step counts: far beyond any real run, within a tensor's index
MAX_SEED = 2**64 - 1  # torch.Generator.manual_seed's range


class SuiteError(Exception):
    """Bad suite input. ``lines`` holds one line per problem: file, key and reason."""

    def __init__(self, lines: list[str]):
        super().__init__("\n".join(lines))
        self.lines = list(lines)


# ---------------------------------------------------------------------------------------------
# Field types: pydantic checks the structure; these carry the rules and messages of one value


def _invalid(*problems: tuple[tuple[str | int, ...], str]) -> PydanticCustomError:
    """An error of several problems, each (key path below where it is raised, reason): one line each."""
    return PydanticCustomError("suite", "{problems}", {"problems": list(problems)})


def _did_you_mean(word: str, choices: list[str] | tuple[str, ...]) -> str:
    close = difflib.get_close_matches(str(word), list(choices), n=1)
    listed = "expected one of " + ", ".join(choices) if len(choices) <= 8 else ""
    if close:
        return f"did you mean {close[0]!r}?" + (f" ({listed})" if listed else "")
    return listed or "expected one of " + ", ".join(sorted(choices))


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


_REPR = reprlib.Repr()
_REPR.maxstring = _REPR.maxother = 80
_shown = _REPR.repr  # values in messages: a 60 KiB string is not echoed whole


def _bound(value: float) -> str:
    return str(value) if isinstance(value, int) else f"{value:g}"


def _number(kind: type, low: float, high: float | None = None, *, low_open: bool = False) -> Any:
    """A strict int or float (an int is a float too, a bool neither) within the bounds."""
    def check(value):
        if value < low or (low_open and value == low) or (high is not None and value > high):
            bound = f"{'>' if low_open else '>='} {_bound(low)}" + (f" and <= {_bound(high)}" if high is not None else "")
            raise _invalid(((), f"{_bound(value)} must be {bound}"))
        return value

    return Annotated[kind, Strict(), AfterValidator(check)]


def _one_of(choices: Any, what: str | None = None) -> Any:
    """A string in ``choices`` (a live table: a family registered later is a choice too)."""
    def check(value):
        if not isinstance(value, str) or value not in choices:
            said = f"unknown {what} {value!r}" if what else f"{_shown(value)} is not allowed"
            raise _invalid(((), f"{said}; {_did_you_mean(value, tuple(choices))}"))
        return value

    return Annotated[str, BeforeValidator(check)]


def _name(value: Any) -> str:
    """A suite or model name: a directory name and part of cell ids."""
    if not isinstance(value, str) or not value.strip() or "/" in value or value in (".", "..") or not value.isprintable():
        raise _invalid(((), f"expected a non-empty name of printable characters without '/', got {_shown(value)}"))
    if len(value) > MAX_NAME_CHARS:
        raise _invalid(((), f"expected at most {MAX_NAME_CHARS} characters, got {len(value)}"))
    return value


def _nonempty(values: tuple) -> tuple:
    if not values:  # not Field(min_length=1): pydantic would say so too when every item is bad
        raise _invalid(((), "empty list; give at least one value"))
    return values


def _distinct(values: tuple) -> tuple:
    if len(set(values)) != len(values):
        raise _invalid(((), f"repeated values in {list(values)}"))
    return values


def _no_repeats(names: tuple[str, ...], what: str, hint: str = "") -> None:
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise _invalid(*(((), f"{what} {name!r} appears twice{hint}") for name in repeated))


def _methods_once(methods: tuple[methods_table.Method, ...]) -> tuple[methods_table.Method, ...]:
    _no_repeats(tuple(m.name for m in methods), "method")
    return methods


def _unique_names(models: tuple[ModelSpec, ...]) -> tuple[ModelSpec, ...]:
    _no_repeats(tuple(m.name for m in models), "model name", "; give each entry its own `name`")
    return models


def _where_keys(where: dict[str, Any]) -> dict[str, Any]:
    unknown = [k for k in where if k not in WHERE_KEYS]
    if unknown:
        raise _invalid(*(((k,), f"unknown key; {_did_you_mean(k, WHERE_KEYS)}") for k in unknown))
    return where


def _method(name: Any) -> methods_table.Method:
    if not isinstance(name, str):
        raise _invalid(((), f"expected a method name, got {_type_name(name)} {_shown(name)}"))
    try:
        return methods_table.parse(name)
    except methods_table.MethodError as e:
        raise _invalid(((), str(e))) from None


def _listed(value: Any) -> Any:
    return value if isinstance(value, list) else [value]  # `batch_size: 4` is `[4]`


def _or(empty: Any) -> BeforeValidator:
    return BeforeValidator(lambda value: empty if value is None else value)  # `config:` with nothing after


Size = _number(int, 1, MAX_SIZE)
Positive = _number(float, 0, low_open=True)
Family = _one_of(ARCHITECTURES, "family")
PresetName = _one_of(PRESETS, "preset")
Name = Annotated[str, BeforeValidator(_name)]
Method = Annotated[methods_table.Method, PlainValidator(_method), PlainSerializer(lambda m: m.name, return_type=str)]
MethodName = Annotated[str, AfterValidator(lambda name: _method(name).name)]  # canonical: `wtacrs@.30` -> `wtacrs@0.3`
Sizes = Annotated[tuple[Size, ...], BeforeValidator(_listed), AfterValidator(_nonempty), AfterValidator(_distinct)]


class _Schema(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class ModelSpec(_Schema):
    """One ``model`` entry: a preset (or a family's default preset) and config overrides."""

    family: Family | None = None
    preset: PresetName | None = None
    config: Annotated[dict[str, Any], _or({})] = {}  # transformers config overrides
    name: Name | None = None  # label used in cell ids and reports (the preset unless given)

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, data: Any) -> Any:
        return {"preset": data} if isinstance(data, str) else data  # `model: t5-base`

    @model_validator(mode="after")
    def _resolve(self) -> ModelSpec:
        if self.preset is None and self.family is None:
            raise _invalid(((), "give a preset (e.g. t5-base) or a family"))
        preset = self.preset or ARCHITECTURES[self.family].default_preset
        family, name = PRESETS[preset].family, self.name or preset
        if self.family not in (None, family):
            raise _invalid((("family",), f"preset {preset!r} is a {family} model, not {self.family}"))
        known = config_keys(family)
        bad = [k for k in self.config if k not in known]
        if bad:
            raise _invalid(*((("config", k), f"not a {family} config key; {_did_you_mean(k, tuple(sorted(known)))}")
                             for k in bad))
        try:
            problems = config_problems(family, {**PRESETS[preset].config, **self.config})
        except Exception as e:  # noqa: BLE001 -- transformers validates values in the config constructor
            raise _invalid((("config",), f"{family} config rejected it: {one_line(e)}")) from None
        if problems:  # keyed where the suite set the key
            raise _invalid(*((("config", k), reason) if k in self.config else
                             (("config",), f"{name}: {reason}" + (f" ({k})" if k else "")) for k, reason in problems))
        return self.model_copy(update={"family": family, "preset": preset, "name": name})


class Grid(_Schema):
    """Swept values; None means "the preset's" (target_len: "seq_len")."""

    batch_size: Sizes = Field(description="give a list of positive integers")
    seq_len: Sizes = Field(description="give a list of positive integers")
    target_len: Sizes | None = None  # encoder-decoder only
    d_model: Sizes | None = None
    n_head: Sizes | None = None
    d_ff: Sizes | None = None
    d_head: Sizes | None = None


class Training(_Schema):
    dtype: _one_of(DTYPES) = "float32"
    optimizer: _one_of(OPTIMIZERS) = "adamw"
    warmup_steps: Size = 1  # peak is taken after warm-up, once optimizer state exists
    timed_steps: Size = 3
    attn_implementation: _one_of(ATTN_IMPLEMENTATIONS) = "eager"
    pad_fraction: _number(float, 0, 0.99) = 0.0
    seed: _number(int, 0, MAX_SEED) = 0
    threads: Size | None = None  # torch.set_num_threads for runs on the cpu; None: torch's default
    target: _one_of(GPUS, "target GPU") = DEFAULT_TARGET  # the GPU (profiler.gpus) estimated step times are for


class Parallel(_Schema):
    """How each cell is split over GPUs (``profiler.parallel``): one cell per ``world_size``."""

    strategy: _one_of(STRATEGIES) = "none"
    world_size: Sizes = (1,)
    reshard_after_forward: Annotated[bool, Strict()] = True  # fsdp: free unsharded parameters after forward
    bucket_cap_mb: Positive = 25.0  # ddp gradient bucket size

    @model_validator(mode="after")
    def _one_device(self) -> Parallel:
        if self.strategy == "none" and self.world_size != (1,):
            raise _invalid((("world_size",), f"strategy none runs on one device; give strategy ddp or fsdp "
                                             f"for world sizes {list(self.world_size)}"))
        return self

    def settings(self, world_size: int) -> ParallelSettings | None:
        if self.strategy == "none":
            return None
        return ParallelSettings(self.strategy, world_size, self.reshard_after_forward, float(self.bucket_cap_mb))


def _largest_first(values: tuple[float, ...]) -> tuple[float, ...]:
    return tuple(sorted(values, reverse=True))


class Budgets(_Schema):
    """Limits for ``device: auto`` on a machine without cuda (CPU runs), and the report's memory sizes."""

    memory_fraction: _number(float, 0, 1, low_open=True) = 0.6  # of the RAM available when the run starts
    cell_seconds: _number(float, 0) = 60.0  # estimated CPU time of one cell (warm-up + timed steps)
    suite_seconds: _number(float, 0) = 600.0  # estimated CPU time of all CPU-run cells together
    # accelerator memory sizes (GiB) of the report's "largest batch size within a budget" plot
    memory_gib: Annotated[tuple[Positive, ...], BeforeValidator(_listed), AfterValidator(_nonempty),
                          AfterValidator(_distinct), AfterValidator(_largest_first)] = (80.0, 40.0, 24.0)


class Check(_Schema):
    """Every grid point matching ``where`` must have min <= metric(numerator)/metric(denominator) <= max."""

    metric: _one_of(CHECK_METRICS)
    denominator: MethodName = Field(description="name a method of the suite")
    numerator: MethodName = "full"
    min: Positive | None = None
    max: Positive | None = None
    where: Annotated[dict[str, Any], _or({}), AfterValidator(_where_keys)] = {}  # record params -> value

    @model_validator(mode="after")
    def _bounds(self) -> Check:
        if self.min is None and self.max is None:
            raise _invalid(((), "give a ratio bound: min, max or both"))
        if self.min is not None and self.max is not None and self.min > self.max:
            raise _invalid(((), f"bad ratio bounds: min {self.min:g} > max {self.max:g}"))
        return self


@dataclass(frozen=True)
class Cell:
    """One measured point: a model, a method and one value of every grid axis."""

    suite: str
    model: str
    family: str
    preset: str
    config: tuple[tuple[str, Any], ...]
    method: methods_table.Method
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
    target: str = DEFAULT_TARGET  # ``Training.target``: the GPU an estimated step time is for
    parallel: ParallelSettings | None = None  # strategy and world size (``Suite.parallel``); None: one device
    id_axes: tuple[str, ...] = field(default=(), compare=False)  # optional axes named in the id
    point: ModelPoint | None = field(default=None, compare=False, repr=False)  # built once per model and dims

    def identity(self) -> dict[str, Any]:
        """What the cell's figures depend on: every field but the ``point`` built from them, the
        method by its name. A field added to Cell joins it by itself."""
        identity = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("point", "parallel")}
        if self.parallel is not None:  # absent on one device: the keys of earlier results stay
            identity["parallel"] = vars(self.parallel)
        return {**identity, "method": self.method.name}

    @property
    def cell_id(self) -> str:
        """``MODEL/METHOD/B64-S128-T128-D768-H12`` (+ ``-F3072``/``-K64`` when d_ff/d_head are swept,
        ``-fsdp8`` for a parallel cell)."""
        point = f"B{self.batch_size}-S{self.seq_len}"
        if self.target_len is not None:
            point += f"-T{self.target_len}"
        point += f"-D{self.d_model}-H{self.n_head}"
        if "d_ff" in self.id_axes:
            point += f"-F{self.d_ff}"
        if "d_head" in self.id_axes:
            point += f"-K{self.d_head}"
        if self.parallel is not None:
            point += f"-{self.parallel.strategy}{self.parallel.world_size}"
        return f"{self.model}/{self.method.name}/{point}"

    @property
    def params(self) -> dict[str, Any]:
        """The record's ``params`` (see ``profiler.records``)."""
        return {
            "model": self.model,
            "family": self.family,
            "method": self.method.name,
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
            **({"strategy": self.parallel.strategy, "world_size": self.parallel.world_size} if self.parallel else {}),
        }


class Suite(_Schema):
    """A validated suite file (module docstring); ``cells()`` is its grid, expanded once."""

    name: Name
    description: str | None = None
    models: Annotated[tuple[ModelSpec, ...], AfterValidator(_nonempty), AfterValidator(_unique_names)] = Field(
        alias="model")
    grid: Grid
    methods: Annotated[tuple[Method, ...], AfterValidator(_nonempty), AfterValidator(_methods_once)]
    training: Training = Training()
    device: _one_of(DEVICES) = "auto"
    models_device: _one_of(MODELS_DEVICES) = "cuda"
    budgets: Budgets = Budgets()
    checks: Annotated[tuple[Check, ...], _or(())] = ()
    parallel: Parallel = Parallel()
    _source: str = PrivateAttr("<suite>")
    _points: list[list[ModelPoint]] = PrivateAttr(default_factory=list)  # per model, in grid order
    _cells: list[Cell] | None = PrivateAttr(None)

    @property
    def source(self) -> str:
        return self._source

    def cells(self) -> list[Cell]:
        """Every cell, ordered model > dimensions > method > seq_len > target_len > batch_size,
        so that consecutive cells share a model (the runner reuses meta models across them)."""
        if self._cells is None:
            self._cells = _expand(self)
        return self._cells

    @property
    def n_cells(self) -> int:
        """``len(self.cells())``, from the axis lengths: nothing is expanded."""
        grid = self.grid
        dims = math.prod(len(getattr(grid, axis) or (None,)) for axis in ("d_model", "n_head", "d_ff", "d_head"))
        per_target = dims * len(self.methods) * len(grid.seq_len) * len(grid.batch_size) * len(self.parallel.world_size)
        targets = len(grid.target_len or (None,))  # target_len defaults to one value per seq_len
        return sum(per_target * (targets if ARCHITECTURES[m.family].encoder_decoder else 1) for m in self.models)

    def to_json(self) -> dict[str, Any]:
        """The normalised suite, as written to ``suite.json`` beside ``results.jsonl``."""
        data = self.model_dump(mode="json", by_alias=True, exclude={"description"})
        data["grid"] = {k: v for k, v in data["grid"].items() if v is not None}
        return {**data, "source": self.source, "cells": [c.cell_id for c in self.cells()]}

    @model_validator(mode="before")
    @classmethod
    def _defaults(cls, data: Any, info) -> Any:
        context = info.context if info.context is not None else {}
        if isinstance(data, dict):
            data = {"name": context.get("stem", "suite"), **data}
            if "model" in data and not isinstance(data["model"], list):
                data["model"] = [data["model"]]
                context["single_model"] = True  # its key is `model`, not `model[0]`
        return data

    @model_validator(mode="after")
    def _cross_check(self, info) -> Suite:
        """Checks that need several sections: the checks' methods and the grid size, then (once
        those hold) dimensions per model, one meta build of every distinct model config, sequence
        limits, and the grid points of the checks."""
        methods = tuple(m.name for m in self.methods)
        problems = [(("checks", index, role), f"method {name!r} is not in `methods`; {_did_you_mean(name, methods)}")
                    for index, check in enumerate(self.checks)
                    for role, name in (("numerator", check.numerator), ("denominator", check.denominator))
                    if name not in methods]
        max_cells = (info.context or {}).get("max_cells", MAX_CELLS)
        if not problems and self.n_cells > max_cells:
            problems.append((("grid",), f"{self.n_cells} cells, more than the limit of {max_cells} "
                                        "(raise it with --max-cells)"))
        if not problems:
            self._points, problems = _model_points(self)
        if problems:
            raise _invalid(*problems)
        for index, check in enumerate(self.checks):
            matched = {c.method.name for c in self.cells() if all(c.params.get(k) == v for k, v in check.where.items())}
            if not {check.numerator, check.denominator} <= matched:
                shown = ", ".join(f"{k}={v!r}" for k, v in check.where.items())
                problems.append((("checks", index, "where"), f"no grid point matches {{{shown}}}"))
        if problems:
            raise _invalid(*problems)
        return self


def _expand(suite: Suite) -> list[Cell]:
    grid = suite.grid
    id_axes = tuple(axis for axis in ("d_ff", "d_head") if getattr(grid, axis) is not None)
    training = suite.training.model_dump()
    cells = []
    for spec, points in zip(suite.models, suite._points):
        config = tuple(sorted(spec.config.items()))
        encoder_decoder = ARCHITECTURES[spec.family].encoder_decoder
        for point, method, seq_len in itertools.product(points, suite.methods, grid.seq_len):
            dims = point.dims
            targets = (grid.target_len or (seq_len,)) if encoder_decoder else (None,)
            for target_len, batch_size, world_size in itertools.product(
                targets, grid.batch_size, suite.parallel.world_size
            ):
                cells.append(Cell(
                    suite=suite.name, model=spec.name, family=spec.family, preset=spec.preset, config=config,
                    method=method, batch_size=batch_size, seq_len=seq_len, target_len=target_len,
                    d_model=dims.d_model, n_head=dims.n_head, d_ff=dims.d_ff, d_head=dims.d_head,
                    n_layers=dims.n_layers, id_axes=id_axes, point=point,
                    parallel=suite.parallel.settings(world_size), **training,
                ))
    return cells


def _model_points(suite: Suite) -> tuple[list[list[ModelPoint]], list[tuple[tuple[str | int, ...], str]]]:
    """Every model's points, in grid order (each distinct one built once), and what stops a
    model: its dimensions, its meta build, its sequence limit."""
    grid, points, problems = suite.grid, [], []
    if grid.target_len is not None and not any(ARCHITECTURES[m.family].encoder_decoder for m in suite.models):
        problems.append((("grid", "target_len"), "applies to encoder-decoder models (t5) only; none is in `model`"))
    swept = grid.d_model or grid.n_head or grid.d_ff or grid.d_head
    axis = ("grid", "n_head" if grid.n_head else "d_model" if grid.d_model else "d_head")
    for index, spec in enumerate(suite.models):
        built: dict[Dims, ModelPoint] = {}
        points.append([])
        for d_model, n_head, d_ff, d_head in itertools.product(
            grid.d_model or (None,), grid.n_head or (None,), grid.d_ff or (None,), grid.d_head or (None,)
        ):
            try:
                dims = resolve_dims(spec.preset, spec.config, d_model=d_model, n_head=n_head, d_ff=d_ff, d_head=d_head)
                if dims not in built:
                    built[dims] = model_point(spec.preset, spec.config, dims, suite.training.attn_implementation)
            except DimsError as e:
                problems.append((axis, f"{spec.name}: {e}"))
                continue
            except BuildError as e:
                at = f" at d_model {dims.d_model}, n_head {dims.n_head}, d_ff {dims.d_ff}, d_head {dims.d_head}"
                problems.append((axis if swept else ("model", index, "config"), f"{spec.name}{at if swept else ''}: {e}"))
                break  # the model's other grid points would say the same
            points[-1].append(built[dims])
        limit = max_positions(spec.family, spec.preset, spec.config)
        if limit is not None and max(grid.seq_len) > limit:
            problems.append((("grid", "seq_len"), f"{max(grid.seq_len)} exceeds {spec.name}'s {limit} positions "
                                                  f"(raise {ARCHITECTURES[spec.family].max_positions} under model.config)"))
    return points, problems


# ---------------------------------------------------------------------------------------------
# Loading, and pydantic's errors as one line per problem


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


def problem_lines(error: ValidationError, root: type[BaseModel], *, single_model: bool = False
                  ) -> list[tuple[str, str]]:
    """Each problem of ``error`` as (key path, reason), e.g. ("grid.batch_size[0]", "expected an
    integer, got str 'two'"); ``single_model``: the suite's ``model`` was one entry, not a list."""
    items = []
    for e in error.errors(include_url=False):
        for below, reason in _reasons(e, root):
            items.append((_key_path((*e["loc"], *below), single_model), reason))
    return items


def _reasons(e: dict[str, Any], root: type[BaseModel]) -> list[tuple[tuple[str | int, ...], str]]:
    kind, loc, value = e["type"], e["loc"], e.get("input")
    if kind == "suite":
        return e["ctx"]["problems"]
    if kind in ("extra_forbidden", "missing"):
        schema = _schema_at(root, loc[:-1])
        fields = {f.alias or name: f for name, f in schema.model_fields.items()}
        if kind == "extra_forbidden":
            return [((), f"unknown key; {_did_you_mean(loc[-1], tuple(fields))}")]
        hint = fields[loc[-1]].description if loc[-1] in fields else None
        return [((), f"missing; {hint}" if hint else "missing (required)")]
    reason = {
        "int_type": f"expected an integer, got {_type_name(value)} {_shown(value)}",
        "float_type": f"expected a number, got {_type_name(value)} {_shown(value)}",
        "finite_number": f"expected a finite number, got {value!r}",
        "string_type": f"expected text, got {_type_name(value)} {_shown(value)}",
        "model_type": f"expected a mapping, got {_type_name(value)}",
        "dict_type": f"expected a mapping, got {_type_name(value)}",
        "tuple_type": f"expected a list, got {_type_name(value)}",
    }.get(kind, e["msg"])
    return [((), reason)]


def _schema_at(root: type[BaseModel], loc: tuple[str | int, ...]) -> type[BaseModel]:
    """The model class that validates the mapping at ``loc``."""
    schema = root
    for step in loc:
        fields = {f.alias or name: f for name, f in schema.model_fields.items()}
        if step in fields:
            schema = _model_in(fields[step].annotation) or schema
    return schema


def _model_in(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    return next((m for m in map(_model_in, get_args(annotation)) if m is not None), None)


def _key_path(loc: tuple[str | int, ...], single_model: bool) -> str:
    key = ""
    for index, step in enumerate(loc):
        if isinstance(step, int):
            key += "" if single_model and loc[:index] == ("model",) else f"[{step}]"
        else:
            key += f".{step}" if key else str(step)
    return key


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
    path, lines = Path(path), lines or {}
    if data is None:
        raise SuiteError([f"{path}: empty suite file; it needs at least model, grid and methods"])
    context = {"stem": path.stem, "max_cells": max_cells}
    try:
        suite = Suite.model_validate(data, context=context)
    except ValidationError as error:
        problems = problem_lines(error, Suite, single_model=context.get("single_model", False))
        raise SuiteError(_located(path, lines, problems)) from None
    suite._source = str(path)
    return suite


def _located(path: Path, lines: dict[str, int], problems: list[tuple[str, str]]) -> list[str]:
    """``FILE:LINE: KEY: reason`` per problem, in file order, as an editor would show them."""
    located = []
    for key, reason in problems:
        probe = key
        while probe and probe not in lines:
            probe = probe.rsplit(".", 1)[0] if "." in probe else ""
        line = lines.get(probe)
        shown = key if key.isprintable() else _shown(key)  # a key from the file must not break the line
        located.append((line or 0, f"{path}:{line}" if line else f"{path}", f"{shown}: {reason}" if key else reason))
    return [f"{where}: {reason}" for _, where, reason in sorted(located, key=lambda item: item[0])]
