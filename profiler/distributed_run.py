"""DDP / FSDP cells: their records, estimated in this process or measured on every rank of torchrun.

``torchrun --nproc_per_node N -m profiler run SUITE`` starts N copies of the CLI. Rank 0 runs the
suite as a plain run does and alone writes the output directory; before each DDP/FSDP cell of
world size N it broadcasts the cell's id, every rank builds, shards and measures the cell on its
own device (``measure_rank``), and rank 0 gathers the per-rank figures into the
record. A cell of another world size cannot be measured by this launch and is recorded
``skipped`` (run without torchrun to estimate it). Other ranks only follow rank 0's broadcasts.

Nothing hangs on a failed rank: the step's collectives run on a group with a timeout
(``PROFILER_RANK_TIMEOUT_S``, default 600 s), so a rank whose peer failed gets an error too; each
rank's exception is caught and sent to rank 0, which records the cell as ``error`` naming the
ranks. The control messages and the gather run on the default group, whose timeout is long
enough for rank 0 to estimate other cells in between.
"""

from __future__ import annotations

import datetime as dt
import os
import traceback

import torch
import torch.distributed as dist

from profiler import records
from profiler.measure import Measurement
from profiler.models import MetaMaskChecks, make_batch, quiet_transformers
from profiler.parallel import RankFigures, estimate_rank, shard_fsdp, tracked_step
from profiler.runner import _is_oom, _prepared_model, _record, _short, build_optimizer

RANK_TIMEOUT_S = float(os.environ.get("PROFILER_RANK_TIMEOUT_S", 600))
CONTROL_TIMEOUT = dt.timedelta(hours=24)
_WORK_GROUP = None  # the group of a torchrun launch's steps (timeout RANK_TIMEOUT_S)


def launched_by_torchrun() -> bool:
    """True in a process torchrun started (it sets RANK, WORLD_SIZE and TORCHELASTIC_RUN_ID)."""
    return "TORCHELASTIC_RUN_ID" in os.environ and "RANK" in os.environ


def _batch(cell) -> dict:
    return make_batch(cell, "cpu", torch.Generator().manual_seed(cell.seed + dist_rank()))


def dist_rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def estimate_cell(cell, models_device: str) -> RankFigures:
    """One rank of ``cell`` traced under the fake process group (``estimate_rank``)."""
    with MetaMaskChecks(cell):  # no values on fake tensors: transformers' mask checks read the cell
        return estimate_rank(lambda: _prepared_model(cell, "cpu"), _batch(cell), lambda m: build_optimizer(m, cell.optimizer),
                             cell.parallel, models_device=models_device, warmup_steps=cell.warmup_steps)


def measure_rank(cell) -> RankFigures:
    """This rank's figures of ``cell`` on its own device, sharded on the launch's work group."""
    from torch.distributed.device_mesh import DeviceMesh
    from torch.nn.parallel import DistributedDataParallel

    device = f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu"
    settings = cell.parallel
    model = _prepared_model(cell, device)
    if settings.strategy == "fsdp":
        shard_fsdp(model, settings, DeviceMesh.from_group(_WORK_GROUP, torch.device(device).type))
    else:
        model = DistributedDataParallel(model, process_group=_WORK_GROUP, bucket_cap_mb=settings.bucket_cap_mb)
    optimizer = build_optimizer(model, cell.optimizer)
    batch = {k: v.to(device) for k, v in _batch(cell).items()}
    # DDP's buckets need no extra: the tracker meets them when the reducer's all-reduce returns
    # them in backward, and counts them from then on (under "Activation"); measured here, the
    # peak equals the estimate's single-device step plus ``ddp_bucket_bytes``
    return tracked_step(model, batch, optimizer, strategy=settings.strategy, models_device=torch.device(device).type,
                        warmup_steps=cell.warmup_steps, rank=dist.get_rank())


def _gathered(cell) -> list[dict]:
    """Every rank measures ``cell``; rank 0 gets ``[{"rank", "figures" | "error"}]``."""
    try:
        with quiet_transformers():
            result = {"rank": dist.get_rank(), "figures": measure_rank(cell)}
    except Exception as e:  # noqa: BLE001 -- a failing rank is reported, not fatal
        result = {"rank": dist.get_rank(), "error": f"{type(e).__name__}: {e}"[:500],
                  "traceback": "".join(traceback.format_exception(e)[-4:])}
    gathered = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(result, gathered, dst=0)
    return gathered


def parallel_record(cell, models_device: str) -> records.Record:
    """The record of a DDP/FSDP ``cell``: measured on every rank under torchrun (its world size
    only), else estimated here under the fake process group. Never raises but for Ctrl-C."""
    measured = dist.is_initialized()
    on = ("cuda" if torch.cuda.is_available() else "cpu") if measured else "meta"
    kind = on if measured else models_device
    try:
        if measured and cell.parallel.world_size != dist.get_world_size():
            return _record(cell, on, kind, status="skipped", message=(
                f"world_size {cell.parallel.world_size} needs torchrun --nproc_per_node {cell.parallel.world_size} "
                f"(this launch has {dist.get_world_size()}); run without torchrun to estimate it"))
        if measured:
            dist.broadcast_object_list([cell.cell_id], src=0)
            ranks = _gathered(cell)
        else:
            with quiet_transformers():
                ranks = [{"rank": 0, "figures": estimate_cell(cell, models_device)}]
    except KeyboardInterrupt:
        raise
    except BaseException as e:  # noqa: BLE001 -- one failing cell must not stop the suite
        return _record(cell, on, kind, status="oom" if _is_oom(e) else "error", message=_short(e),
                       traceback="".join(traceback.format_exception(e)[-6:]))
    return _ranks_record(cell, on, kind, ranks)


def _ranks_record(cell, on: str, kind: str, ranks: list[dict]) -> records.Record:
    failed = [r for r in ranks if "error" in r]
    if failed:
        return _record(cell, on, kind, status="error", traceback=failed[0].get("traceback"),
                       message="; ".join(f"rank {r['rank']}: {r['error']}" for r in failed))
    figures = [r["figures"] for r in ranks]
    worst = max(figures, key=lambda f: f.peak_bytes)
    measurement = Measurement(peak_bytes=worst.peak_bytes, categories=worst.categories, activations=None,
                              estimated=worst.estimated, models_device=kind)
    parallel = {"strategy": cell.parallel.strategy, "world_size": cell.parallel.world_size,
                "ranks": [f.to_json() for f in figures]}
    return _record(cell, on, kind, measurement, parallel=parallel)


# -- the torchrun launch ------------------------------------------------------------------------------
def init_launch() -> None:
    """Join torchrun's process group (nccl on cuda, else gloo) and make the work group."""
    global _WORK_GROUP
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group(backend, timeout=CONTROL_TIMEOUT)
    _WORK_GROUP = dist.new_group(backend=backend, timeout=dt.timedelta(seconds=RANK_TIMEOUT_S))


def follow(suite) -> None:
    """A rank other than 0: measure each cell whose id rank 0 broadcasts, until it sends None."""
    cells = {c.cell_id: c for c in suite.cells()} if suite is not None else {}
    while True:
        message = [None]
        dist.broadcast_object_list(message, src=0)
        if message[0] is None:
            return
        _gathered(cells[message[0]])


def finish() -> None:
    """Rank 0: tell the other ranks the suite is done, then leave the process group."""
    if dist.get_rank() == 0:
        dist.broadcast_object_list([None], src=0)
    dist.destroy_process_group()
