"""Run a suite: for every cell build the model, apply the method, measure one training step and
append the record to ``results.jsonl`` (flushed at once) and its row to ``results.csv``.

Layout of an output directory::

    suite.json        the normalised suite (``Suite.to_json()``) and ``cell_keys``, the identity of
                      each of its cells (``cell_key``); report and check read only those cells
    results.jsonl     one record per finished cell (``profiler.records``)
    results.csv       the same, flattened for pandas and spreadsheets (one row appended per cell)
    superseded.jsonl  records a ``--resume`` set aside: cells the edited suite no longer has

One run at a time writes to a directory: a run holds an exclusive ``flock`` on it from start to
end, and a second run (``--resume``, ``--overwrite`` or not) stops with one line before writing.

Devices:

- ``cuda`` / ``cpu``: the step runs there (status ``ok``).
- ``meta``: an estimate of the step modelling ``suite.models_device``'s kernels (``estimated``).
- ``auto``: cuda when available. Otherwise each cell is first estimated on meta; it then runs on
  the CPU only if the estimated peak fits ``budgets.memory_fraction`` of the machine's RAM
  (MemTotal) and its planned CPU time fits both ``budgets.cell_seconds`` and what the cells
  before it left of ``budgets.suite_seconds``. The planned time is the meta step's roofline on
  ``steptime.NOMINAL_CPU`` (fixed rates, not a probe: the choice is a function of the suite and
  the RAM, whatever the machine's load) times the warm-up, tracked and timed steps. The record's
  ``policy`` says what was chosen and why; an estimate kept says it in ``message`` too.

Every ok/estimated record has a ``throughput``: the measured median step time, or the roofline
estimate for ``training.target`` (``profiler.steptime``). A CPU-measured cell also carries the
roofline of its own step on this CPU's rates, probed once per run (``estimate_over_measured``).

A failing cell (exception, OOM) is recorded with its status and message and the suite goes on.
A method whose library part is missing is recorded as ``skipped``. ``resume=True`` keeps every
finished record (``records.FINISHED_STATUSES``) of a cell whose ``cell_key`` is still in the
suite and runs only the other cells: the key hashes everything that can change a cell's figures,
so a changed config, dimension, method, training setting or device policy runs the cell again.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import fnmatch
import functools
import gc
import hashlib
import json
import os
import platform
import signal
import statistics
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from profiler import records, steptime
from profiler.models import MetaMaskChecks, build_model, make_batch, quiet_transformers, tokens_per_step
from profiler.suite import Cell, Suite

RESULTS = "results.jsonl"
CSV = "results.csv"
SUITE_JSON = "suite.json"
SUPERSEDED = "superseded.jsonl"
MESSAGE_CHARS = 2000


class RunInputError(Exception):
    """Bad run input found before anything is written; ``lines`` holds one line per problem."""

    def __init__(self, lines: list[str]):
        super().__init__("\n".join(lines))
        self.lines = lines


class Observer:
    """Progress callbacks of ``run_suite`` (the CLI shows them; the default shows nothing)."""

    def started(self, plan: "Plan") -> None: ...

    def cell_started(self, cell: Cell, index: int) -> None: ...

    def cell_finished(self, cell: Cell, record: records.Record) -> None: ...


@dataclass
class Plan:
    """What a run will do, computed without writing anything."""

    suite: Suite
    out_dir: Path
    device: str  # cuda | cpu | meta | auto (auto only when cuda is absent)
    cells: list[Cell]  # every selected cell, in suite order
    todo: list[Cell]  # the ones that will run
    resume: bool
    kept: list[records.Record] = field(default_factory=list)  # records a resume keeps
    keys: dict[str, str] = field(default_factory=dict)  # cell_id -> cell_key, every cell of the suite
    superseded: list[records.Record] = field(default_factory=list)  # records a resume sets aside
    stamp: tuple = ()  # the output files as planned from (``_stamp``)

    @property
    def results_path(self) -> Path:
        return self.out_dir / RESULTS

    def superseded_note(self) -> str:
        return (f"{len(self.superseded)} record(s) of {self.results_path} are not cells of this suite "
                f"(its config, grid, methods or settings changed): moved to {self.out_dir / SUPERSEDED}")


def run_policy(suite: Suite, device: str) -> dict[str, Any]:
    """The run settings outside a cell that change its figures: where it runs, whose kernels an
    estimate models, and for ``auto`` the budgets that choose between a CPU run and the estimate
    and the nominal CPU rates it plans CPU time at (``memory_gib`` only sizes the report's plot).
    A DDP / FSDP cell is measured on the ranks of a torchrun launch, else estimated (modelling
    ``models_device`` whatever the device): the launch's world size is part of its policy."""
    import torch.distributed as dist

    policy: dict[str, Any] = {"device": device}
    if device in ("meta", "auto") or suite.parallel.strategy != "none":
        policy["models_device"] = suite.models_device
    if suite.parallel.strategy != "none":
        policy["torchrun_world_size"] = dist.get_world_size() if dist.is_initialized() else None
    if device == "auto":
        policy["budgets"] = suite.budgets.model_dump(exclude={"memory_gib"})
        nominal = steptime.NOMINAL_CPU  # the rates the CPU time is planned at
        policy["nominal_cpu"] = [nominal.matmul["fp32"], nominal.bandwidth, nominal.per_op_s]
    return policy


def cell_key(cell: Cell, policy: dict[str, Any]) -> str:
    """The identity of a cell's figures: a hash of the canonical JSON of the whole cell (model,
    family, preset, config overrides, every dimension, method, training settings) and the run
    ``policy`` (``run_policy``). It is derived from the whole cell (``Cell.identity``), not from a
    list of fields: a field added to ``Cell`` joins the identity by itself."""
    content = {"cell": cell.identity(), "policy": policy}
    text = json.dumps(_canonical(content), sort_keys=True, separators=(",", ":"), default=repr)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def _canonical(value: Any) -> Any:
    """Equal settings, one spelling: a float with an integral value is its int (``60.0`` of a
    default and ``60`` of a YAML file), tuples are lists."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, dict):
        return {str(k): _canonical(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_canonical(v) for v in value]
    return value


@contextlib.contextmanager
def output_lock(out_dir: Path):
    """Hold an exclusive lock on the directory ``out_dir`` for the block (``flock`` on the
    directory itself, so nothing is written). The kernel drops it when the process ends, however
    it ends. Raises RunInputError at once when another holder has it."""
    try:
        fd = os.open(out_dir, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError as e:
        raise RunInputError([f"{out_dir}: cannot open the output directory ({e.strerror})"]) from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RunInputError([f"{out_dir}: another run is writing to this output directory; "
                                 "wait for it to end or choose another --out"]) from None
        yield
    finally:
        os.close(fd)  # closing the last descriptor releases the lock


def _stamp(out_dir: Path) -> tuple:
    """What a plan read from ``out_dir``: size, mtime and inode of its files (None when absent)."""
    stamp = []
    for name in (RESULTS, SUITE_JSON):
        try:
            info = (out_dir / name).stat()
        except OSError:
            stamp.append(None)
            continue
        stamp.append((info.st_size, info.st_mtime_ns, info.st_ino))
    return tuple(stamp)


def default_out_dir(suite: Suite) -> Path:
    return Path("reports") / suite.name


def select(cells: list[Cell], only: str | None) -> list[Cell]:
    """Cells whose id matches ``only``: a glob when it has ``*?[``, else a substring."""
    if not only:
        return cells
    if any(ch in only for ch in "*?["):
        return [c for c in cells if fnmatch.fnmatchcase(c.cell_id, only)]
    return [c for c in cells if only in c.cell_id]


def plan_run(
    suite: Suite,
    out_dir: Path | None = None,
    *,
    device: str | None = None,
    resume: bool = False,
    only: str | None = None,
    overwrite: bool = False,
) -> Plan:
    """Check the run's inputs and work out the cells to run. Writes nothing; RunInputError."""
    out_dir = Path(out_dir) if out_dir is not None else default_out_dir(suite)
    problems = []
    device = device or suite.device
    if device == "cuda" and not torch.cuda.is_available():
        problems.append(f"{suite.source}: device: cuda requested but torch.cuda.is_available() is False")
    if device == "auto" and torch.cuda.is_available():
        device = "cuda"
    every_cell = suite.cells()
    policy = run_policy(suite, device)
    keys = {c.cell_id: cell_key(c, policy) for c in every_cell}
    cells = select(every_cell, only)
    if not cells:
        problems.append(f"--only {only!r}: matches none of the suite's {len(every_cell)} cell ids")
    results_path = out_dir / RESULTS
    if out_dir.exists() and not out_dir.is_dir():
        problems.append(f"{out_dir}: --out is a file, not a directory")
    elif out_dir.is_dir():
        with output_lock(out_dir):  # a run in progress there: say so, and nothing else
            pass
    stamp = _stamp(out_dir)
    kept: list[records.Record] = []
    superseded: list[records.Record] = []
    todo = cells
    if results_path.exists() and not (resume or overwrite):
        problems.append(f"{results_path}: results exist already; pass --resume to continue them or --overwrite")
    elif results_path.exists() and resume:
        try:
            existing = records.read_records(results_path)
        except (ValueError, OSError) as e:
            problems.append(f"{results_path}: cannot resume: {e}")
            existing = []
        todo, kept, superseded = _resume(existing, cells, keys)
    if problems:
        raise RunInputError(problems)
    return Plan(suite=suite, out_dir=out_dir, device=device, cells=cells, todo=todo, resume=resume, kept=kept,
                keys=keys, superseded=superseded, stamp=stamp)


def _resume(existing: list[Any], cells: list[Cell], keys: dict[str, str]):
    """``(todo, kept, superseded)`` of a resume: the selected cells without a finished record of
    their key; one record per key still in the suite, the failed tries of cells that run again
    left out; and the records of keys the suite no longer has (older runs' records, without a
    key, among them), which are not its results."""
    suite_keys = set(keys.values())

    def key_of(record: Any) -> str | None:
        return record.get("cell_key") if isinstance(record, dict) else None

    done = {key_of(r) for r in existing if key_of(r) in suite_keys and r.get("status") in records.FINISHED_STATUSES}
    todo = [c for c in cells if keys[c.cell_id] not in done]
    rerun = {keys[c.cell_id] for c in todo}
    seen: dict[str, records.Record] = {}
    superseded = []
    for record in existing:
        key = key_of(record)
        if key not in suite_keys:
            superseded.append(record)
            continue
        if key in rerun:
            continue
        previous = seen.get(key)
        if previous is None or record.get("status") in records.FINISHED_STATUSES or (
            previous.get("status") not in records.FINISHED_STATUSES
        ):
            seen[key] = record
    return todo, list(seen.values()), superseded


def _atomic_write(path: Path, text: str) -> None:
    """Write via a temporary file and rename, so a kill never leaves a half-written file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    umask = os.umask(0)
    os.umask(umask)
    os.fchmod(fd, 0o666 & ~umask)  # mkstemp makes it private (0600); results are shared files
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------
# The machine


def environment(device: str, models_device: str | None = None) -> dict[str, Any]:
    import transformers

    try:
        import peft

        peft_version = peft.__version__
    except ImportError:
        peft_version = None
    if device == "cuda":
        name = torch.cuda.get_device_name()
    elif device == "meta":
        name = f"meta (estimate of {models_device} kernels)"
    else:
        name = _cpu_name()
    return {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft_version,
        "python": platform.python_version(),
        "device_name": name,
        "host": platform.node(),
    }


def _cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} ({torch.get_num_threads()} threads)"
    return f"{platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)"


def total_memory_bytes() -> int:
    """The machine's RAM: fixed, unlike what is available under the current load."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


@contextlib.contextmanager
def cpu_threads(threads: int | None):
    """``torch.set_num_threads(threads)`` inside the block; None leaves torch's setting alone.

    Tiny models spend a step in many small kernels: on a busy machine, every intra-op parallel
    region of a multi-threaded run waits for a thread another process holds (measured here, a
    t5-tiny step: 1.3 s with 2 threads, 0.02 s with 1).
    """
    if threads is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# ---------------------------------------------------------------------------------------------
# One cell


MeasureFn = Callable[..., Any]


def _default_measure() -> MeasureFn:
    try:
        from profiler.measure import measure_training_step
    except ImportError as e:
        raise RuntimeError(f"profiler.measure is not available: {e}") from None
    return measure_training_step


def build_optimizer(model: torch.nn.Module, name: str) -> torch.optim.Optimizer:
    """AdamW (lr 1e-4, two fp32-or-param-dtype states per trainable parameter) or plain SGD
    (lr 1e-3, no state), over the parameters that require grad."""
    params = [p for p in model.parameters() if p.requires_grad]
    if name == "adamw":
        return torch.optim.AdamW(params, lr=1e-4)
    return torch.optim.SGD(params, lr=1e-3)


def _is_oom(error: BaseException) -> bool:
    if isinstance(error, MemoryError):
        return True
    if getattr(torch.cuda, "OutOfMemoryError", None) and isinstance(error, torch.cuda.OutOfMemoryError):
        return True
    text = str(error)
    return isinstance(error, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


def _short(error: BaseException) -> str:
    text = f"{type(error).__name__}: {error}".strip()
    return text if len(text) <= MESSAGE_CHARS else text[: MESSAGE_CHARS - 3] + "..."


class _ModelCache:
    """Holds the last prepared meta model. Consecutive cells that differ only in batch size or
    sequence length reuse it: on meta a model has no values, so the step it runs is the same
    as on a fresh build (the runner clears gradients and builds a new optimizer per cell)."""

    def __init__(self) -> None:
        self.key: tuple | None = None
        self.model: torch.nn.Module | None = None

    def get(self, cell: Cell) -> torch.nn.Module:
        key = (cell.model, cell.family, cell.preset, cell.config, cell.method, cell.d_model, cell.n_head,
               cell.d_ff, cell.d_head, cell.dtype, cell.attn_implementation, cell.seed)
        if key != self.key:
            self.clear()
            self.model = _prepared_model(cell, "meta")
            self.key = key
        self.model.zero_grad(set_to_none=True)
        return self.model

    def clear(self) -> None:
        # no gc.collect(): a meta model holds no storage, and a full collection costs ~0.3 s
        self.key, self.model = None, None


def _prepared_model(cell: Cell, device: str) -> torch.nn.Module:
    model = build_model(cell, device)
    return cell.method.prepare(model, cell.family, seed=cell.seed).train()


def _measure_on(
    cell: Cell, device: str, models_device: str, measure: MeasureFn, cache: _ModelCache | None
) -> Any:
    model = cache.get(cell) if (device == "meta" and cache is not None) else _prepared_model(cell, device)
    try:
        batch = make_batch(cell, device, torch.Generator().manual_seed(cell.seed))
        optimizer = build_optimizer(model, cell.optimizer)
        with MetaMaskChecks(cell) if device == "meta" else contextlib.nullcontext():
            return measure(
                model, batch, optimizer, device=device, family=cell.point.taxonomy,
                warmup_steps=cell.warmup_steps, timed_steps=cell.timed_steps, models_device=models_device,
            )
    finally:
        del model
        if device != "meta":  # free the real storage before the next cell allocates
            gc.collect()
            if device == "cuda":
                torch.cuda.empty_cache()


def _throughput(cell: Cell, device: str, measurement: Any, cpu_rates: steptime.Rates | None) -> dict[str, Any] | None:
    """``records.Throughput`` of a measurement: the median of its timed steps where it has some,
    else the roofline of its step for ``cell.target``; a CPU-timed step also gets the ratio of its
    roofline on ``cpu_rates`` to the time measured. None with neither times nor a counted step."""
    cost = measurement.cost  # None for a DDP/FSDP rank: nothing to estimate a time from
    times = measurement.step_times_s
    if cost is None:
        if not times:
            return None
        cost = steptime.StepCost()
    step = statistics.median(times) if times else cost.seconds(steptime.gpu_rates(cell.target))
    ratio = None
    if times and device == "cpu" and cpu_rates is not None and step > 0 and cost.ops:
        ratio = cost.seconds(cpu_rates) / step
    return {
        "step_time_s": step, "kind": "measured" if times else "estimated",
        "target": device if times else cell.target,
        "tokens_per_s": tokens_per_step(cell) / step if step > 0 else None,
        "samples_per_s": cell.batch_size / step if step > 0 else None,
        "timed_steps": len(times), "bytes_moved": cost.bytes_moved if cost.ops else None,
        "estimate_over_measured": ratio,
    }


def planned_cpu_seconds(cell: Cell, cost: steptime.StepCost) -> float:
    """What ``device: auto`` plans a CPU run of ``cell`` to take: the step's roofline on
    ``steptime.NOMINAL_CPU`` for each warm-up, tracked and timed step."""
    return cost.seconds(steptime.NOMINAL_CPU) * (cell.warmup_steps + 1 + cell.timed_steps)


def _record(cell: Cell, device: str, models_device: str, measurement: Any = None, *,
            cpu_rates: steptime.Rates | None = None, plan_cpu: bool = False, **fields: Any) -> records.Record:
    """The record of ``cell`` run on ``device``: its ``measurement``, or the status, message and
    traceback of what stopped it; ``estimate`` (in ``fields``): the meta estimate of a CPU run;
    ``plan_cpu``: an estimate that ``device: auto`` decides on (its ``policy`` is begun here)."""
    figures = {}
    if measurement is not None:
        figures = dict(
            status="estimated" if measurement.estimated else "ok",
            models_device=measurement.models_device,
            memory={"peak_bytes": int(measurement.peak_bytes), "reserved_bytes": measurement.reserved_bytes,
                    "nvml_used_bytes": measurement.nvml_used_bytes,
                    "peak_phase": measurement.peak_phase,
                    "categories": {k: measurement.categories.get(k) for k in records.MEMORY_CATEGORIES}},
            activations=measurement.activations,
            throughput=_throughput(cell, device, measurement, cpu_rates),
            flops=measurement.flops,
        )
        if plan_cpu:
            figures["policy"] = {"cpu_seconds": planned_cpu_seconds(cell, measurement.cost)}
    return records.CellRecord(**{
        "cell_id": cell.cell_id, "suite": cell.suite, "params": cell.params, "device": device,
        "models_device": models_device, "env": environment(device, models_device), **fields, **figures,
    }).to_json()


class CellRunner:
    """Runs cells one at a time and turns each into a record (never raises but for Ctrl-C).

    ``plan_cpu``: estimates are for ``device: auto`` (set for ``auto`` itself, and for the meta
    workers of an ``auto`` run), so their records carry the planned CPU time ``consider_cpu``
    decides on.
    """

    def __init__(self, suite: Suite, device: str, measure: MeasureFn | None = None, *, plan_cpu: bool = False):
        self.suite, self.device = suite, device
        self.measure = measure or _default_measure()
        self.cache = _ModelCache()
        self.memory_budget = int(suite.budgets.memory_fraction * total_memory_bytes())
        self.plan_cpu = plan_cpu or device == "auto"
        self.cpu_rates: steptime.Rates | None = None  # probed before the first CPU run
        self.cpu_seconds_planned = 0.0  # of the cells chosen for the CPU so far

    def run(self, cell: Cell) -> records.Record:
        """Measure ``cell`` (on ``auto``: estimate, then maybe run on the CPU) into a record."""
        if cell.parallel is not None:  # DDP / FSDP: per-rank figures (``profiler.distributed_run``)
            from profiler.distributed_run import parallel_record

            self.cache.clear()
            return parallel_record(cell, self.suite.models_device)
        record = self.estimate(cell) if self.device == "auto" else self._run_on(cell, self.device)
        return self.consider_cpu(record, cell) if self.device == "auto" else record

    def estimate(self, cell: Cell) -> records.Record:
        """The meta estimate of ``cell`` (what a worker process computes for ``auto``/``meta``); a
        DDP/FSDP cell's is one rank traced under the fake process group."""
        if cell.parallel is not None:
            from profiler.distributed_run import parallel_record

            return parallel_record(cell, self.suite.models_device)
        return self._run_on(cell, "meta")

    def _run_on(self, cell: Cell, device: str, estimate: dict[str, Any] | None = None) -> records.Record:
        models_device = self.suite.models_device if device == "meta" else device
        if device == "cpu" and self.cpu_rates is None:
            with cpu_threads(cell.threads):
                self.cpu_rates = steptime.measure_cpu_rates()
        record = functools.partial(_record, cell, device, models_device, estimate=estimate, cpu_rates=self.cpu_rates,
                                   plan_cpu=self.plan_cpu and device == "meta")
        # the env names the thread count
        with cpu_threads(cell.threads if device == "cpu" else None):
            try:
                with quiet_transformers():
                    return record(_measure_on(cell, device, models_device, self.measure, self.cache))
            except KeyboardInterrupt:
                raise
            except BaseException as e:  # noqa: BLE001 -- one failing cell must not stop the suite
                self.cache.clear()
                return record(status="oom" if _is_oom(e) else "error", message=_short(e),
                              traceback="".join(traceback.format_exception(e)[-6:]))

    def consider_cpu(self, record: records.Record, cell: Cell) -> records.Record:
        """After the meta estimate: run on the CPU if the budgets allow, else say why not.

        A fixed rule of the estimate and the suite (module docstring); ``policy`` records the
        choice and its reason, and so does ``message`` for an estimate kept. A rank estimate
        (DDP/FSDP) carries no policy, so it stays one.
        """
        if record["status"] != "estimated" or record.get("policy") is None:
            return record
        reason = self._over_budget(record)
        if reason is not None:
            record["message"] = f"estimate kept: {reason}"
            record["policy"].update(choice="estimate", reason=reason)
            return record
        seconds = record["policy"]["cpu_seconds"]
        policy = {**record["policy"], "choice": "cpu", "reason": (
            f"fits: peak {record['memory']['peak_bytes'] / 2**30:.2f} GiB within {self.memory_budget / 2**30:.2f} "
            f"GiB of RAM, planned {seconds:.1f} s within the cell and suite budgets")}
        self.cpu_seconds_planned += seconds
        self.cache.clear()  # the CPU run needs the memory more than the meta model does
        estimate = {"peak_bytes": int(record["memory"]["peak_bytes"]), "models_device": record["models_device"],
                    "activation_bytes": sum(item["bytes"] for item in record["activations"] or []),
                    "flops": record["flops"]}
        measured = self._run_on(cell, "cpu", estimate=estimate)
        measured["policy"] = policy
        return measured

    def _over_budget(self, record: records.Record) -> str | None:
        """Why the estimated cell of ``record`` may not run on the CPU, or None when it may."""
        budgets, peak = self.suite.budgets, int(record["memory"]["peak_bytes"])
        if peak > self.memory_budget:
            return (f"its peak {peak / 2**30:.2f} GiB exceeds the CPU memory budget {self.memory_budget / 2**30:.2f} "
                    f"GiB ({budgets.memory_fraction:g} of the machine's RAM)")
        seconds = record["policy"]["cpu_seconds"]
        left = budgets.suite_seconds - self.cpu_seconds_planned
        if seconds > budgets.cell_seconds:
            return f"a CPU run is planned at {seconds:.0f} s (cell budget {budgets.cell_seconds:g} s)"
        if seconds > left:
            return (f"a CPU run is planned at {seconds:.0f} s ({max(left, 0):.0f} s left of the suite budget "
                    f"{budgets.suite_seconds:g} s)")
        return None

    def close(self) -> None:
        self.cache.clear()


# ---------------------------------------------------------------------------------------------
# The suite


@dataclass
class RunResult:
    out_dir: Path
    results_path: Path
    ran: int
    statuses: dict[str, int]


_WORKER: CellRunner | None = None
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def _die_with_parent(parent: int) -> None:
    """End this worker process when ``parent`` ends, however it ends.

    A killed parent (SIGKILL, the OOM killer) runs no cleanup, and a worker inside an estimate
    reads the pool's queue, and sees it closed, only when the estimate ends: minutes later, or
    never. On Linux the kernel kills the worker at the parent's death (``PR_SET_PDEATHSIG``);
    elsewhere a daemon thread polls the parent's pid.
    """
    armed = sys.platform.startswith("linux") and ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) == 0
    if not armed:
        threading.Thread(target=_watch_parent, args=(parent,), name="parent-watch", daemon=True).start()
    if os.getppid() != parent:  # it died before the death signal was armed
        os._exit(1)


def _watch_parent(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(0.5)
    os._exit(1)


def _start_worker(suite: Suite, measure: MeasureFn | None, parent: int, plan_cpu: bool) -> None:
    global _WORKER
    _die_with_parent(parent)
    torch.set_num_threads(1)  # meta tensors do no arithmetic; one thread per worker process
    _WORKER = CellRunner(suite, "meta", measure, plan_cpu=plan_cpu)


def _estimate_in_worker(cells: list[Cell]) -> list[records.Record]:
    with quiet_transformers():
        return [_WORKER.estimate(cell) for cell in cells]


def _model_groups(cells: list[Cell]) -> list[list[Cell]]:
    """Consecutive cells that share a meta model, so each worker reuses it across its group."""
    groups: list[list[Cell]] = []
    for cell in cells:
        key = _group_key(cell)
        if groups and _group_key(groups[-1][0]) == key:
            groups[-1].append(cell)
        else:
            groups.append([cell])
    return groups


def _group_key(cell: Cell) -> tuple:
    return (cell.model, cell.method, cell.d_model, cell.n_head, cell.d_ff, cell.d_head)


def _records_in_order(plan: Plan, runner: CellRunner, jobs: int, measure: MeasureFn | None):
    """Yield (cell, record) in suite order. With jobs > 1 the meta estimates come from worker
    processes (meta estimation is single-threaded Python); CPU runs stay in this process, one at
    a time. Without workers each cell runs here when its turn comes (so does every cell of a
    torchrun launch, whose ranks follow this process cell by cell)."""
    import torch.distributed as dist

    if jobs <= 1 or plan.device not in ("meta", "auto") or dist.is_initialized():
        for cell in plan.todo:
            yield cell, runner.run(cell)
        return
    import concurrent.futures
    import multiprocessing

    context = multiprocessing.get_context("spawn")  # fork after torch's thread pools can hang
    pool = concurrent.futures.ProcessPoolExecutor(
        max_workers=jobs, mp_context=context, initializer=_start_worker, initargs=(plan.suite, measure, os.getpid(), plan.device == "auto")
    )
    try:
        futures = [(group, pool.submit(_estimate_in_worker, group)) for group in _model_groups(plan.todo)]
        for group, future in futures:
            for cell, record in zip(group, future.result()):
                yield cell, runner.consider_cpu(record, cell) if plan.device == "auto" else record
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


def run_suite(
    plan: Plan, *, observer: Observer | None = None, measure: MeasureFn | None = None, jobs: int = 1
) -> RunResult:
    """Run the cells of ``plan`` (see ``plan_run``), appending one record per cell.

    ``jobs`` > 1 estimates on meta in that many worker processes (``meta`` and ``auto`` without
    cuda); CPU runs of ``auto`` still run one at a time here, but share the CPU with the workers,
    so their throughput is then pessimistic. Memory figures are the same either way.

    The output directory is locked for the whole run (``output_lock``); RunInputError, before
    anything is written, when another run holds it or changed it since ``plan_run``.

    A KeyboardInterrupt stops after the cell in progress is dropped; every finished record is
    already on disk, and so is its row of ``results.csv``.
    """
    observer = observer or Observer()
    out_dir = plan.out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    with output_lock(out_dir):
        if _stamp(out_dir) != plan.stamp:
            raise RunInputError([f"{plan.results_path}: changed since this run was planned (by another run?); "
                                 "start this one again"])
        return _run_locked(plan, observer, measure, jobs)


def _run_locked(plan: Plan, observer: Observer, measure: MeasureFn | None, jobs: int) -> RunResult:
    out_dir, results_path = plan.out_dir, plan.results_path
    runner = CellRunner(plan.suite, plan.device, measure)
    # a resumed run plans the CPU time its kept CPU runs took as they were planned
    runner.cpu_seconds_planned = sum((r.get("policy") or {}).get("cpu_seconds", 0.0) for r in plan.kept
                                     if (r.get("policy") or {}).get("choice") == "cpu")
    suite_json = {**plan.suite.to_json(), "cell_keys": plan.keys}
    _atomic_write(out_dir / SUITE_JSON, json.dumps(suite_json, indent=2, sort_keys=True) + "\n")
    kept = plan.kept if plan.resume else []
    if plan.superseded:  # set aside before results.jsonl drops them: a kill in between loses nothing
        for record in plan.superseded:
            records.append_record(out_dir / SUPERSEDED, record)
    elif not plan.resume:
        (out_dir / SUPERSEDED).unlink(missing_ok=True)  # --overwrite discards every result
    _atomic_write(results_path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in kept))
    csv_file = records.CsvFile(out_dir / CSV, kept)
    statuses: dict[str, int] = {}
    observer.started(plan)
    ran = 0
    try:
        if plan.todo:
            observer.cell_started(plan.todo[0], 0)
        for index, (cell, record) in enumerate(_records_in_order(plan, runner, jobs, measure)):
            record["cell_key"] = plan.keys[cell.cell_id]
            records.append_record(results_path, record)
            csv_file.append(record)
            ran += 1
            statuses[record["status"]] = statuses.get(record["status"], 0) + 1
            observer.cell_finished(cell, record)
            if index + 1 < len(plan.todo):
                observer.cell_started(plan.todo[index + 1], index + 1)
    finally:
        runner.close()
    return RunResult(out_dir=out_dir, results_path=results_path, ran=ran, statuses=statuses)

