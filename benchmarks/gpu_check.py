"""One command for the day a GPU is lent: do the estimates hold on CUDA?

    python benchmarks/gpu_check.py [--preset t5-base] [--batch-sizes 16 32] [--seq-len 128]

For each cell of a small suite (one model, full / lora / checkpointing / wtacrs@0.3 /
lora+wtacrs@0.3 at each batch size) it runs the profiler's cell on cuda and its meta estimate
(modelling cuda kernels, the step time a roofline for this GPU: ``profiler.gpus.detect``, else
the default target, said so), then prints one table:

- peak: the estimate over ``torch.cuda.max_memory_allocated`` (goal: within 5%);
- step: the measured median step and its ratio to full's, the estimated step over the measured;
- op: forward+backward of a WTA-CRS linear over the exact ``nn.Linear`` at the suite's tokens.

Exits 0 when every peak estimate is within 5%, 1 when one is not or a cell fails, and 0 with one
line when CUDA is absent. It has not run on a GPU yet (none was lent).
"""

from __future__ import annotations

import argparse
import statistics
import sys

import torch

GOAL = 0.05  # a meta peak within 5% of max_memory_allocated
METHODS = ("full", "lora", "checkpointing", "wtacrs@0.3", "lora+wtacrs@0.3")


def op_times_ms(tokens: int, d_in: int, d_out: int, repeats: int = 20) -> dict[str, float]:
    """Median forward+backward time (cuda events) of an exact Linear and of WTACRSLinear@0.3."""
    from torch import nn

    from wtacrs import WTACRSLinear

    exact = nn.Linear(d_in, d_out).cuda()
    layers = {"exact": exact, "wtacrs@0.3": WTACRSLinear(exact, ratio=0.3,
                                                          generator=torch.Generator("cuda").manual_seed(0))}
    x = torch.randn(tokens, d_in, device="cuda", requires_grad=True)
    dz = torch.randn(tokens, d_out, device="cuda")
    times: dict[str, list[float]] = {name: [] for name in layers}
    for index in range(repeats + 3):  # 3 warm-ups; methods interleaved so drift hits both alike
        for name, layer in layers.items():
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            layer(x).backward(dz)
            end.record()
            torch.cuda.synchronize()
            if index >= 3:
                times[name].append(start.elapsed_time(end))
    return {name: statistics.median(ts) for name, ts in times.items()}


def check(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from profiler import gpus
    from profiler.runner import CellRunner
    from profiler.suite import parse_suite

    name = torch.cuda.get_device_name()
    target = gpus.detect(name)
    note = "" if target else f" (not in profiler.gpus.GPUS: step estimates for {gpus.DEFAULT_TARGET})"
    suite = parse_suite({
        "name": "gpu-check", "model": args.preset, "methods": list(METHODS),
        "grid": {"batch_size": args.batch_sizes, "seq_len": [args.seq_len]},
        "training": {"warmup_steps": 1, "timed_steps": 5, "target": target or gpus.DEFAULT_TARGET},
        "device": "cuda",
    })
    on_cuda, on_meta = CellRunner(suite, "cuda"), CellRunner(suite, "meta")
    table = Table(title=f"{name}{note}, {args.preset}, S={args.seq_len}, fp32, AdamW")
    for column in ("cell", "peak cuda", "peak est.", "est./cuda", f"within {GOAL:.0%}", "step cuda",
                   "÷ full's", "step est.", "est./cuda"):
        table.add_column(column, justify="left" if column == "cell" else "right")
    missed, full_step = 0, {}
    for cell in suite.cells():
        measured, estimated = on_cuda.run(cell), on_meta.run(cell)
        if measured["status"] != "ok" or estimated["status"] != "estimated":
            table.add_row(cell.cell_id, measured["status"], estimated["status"], *["—"] * 6)
            missed += 1
            continue
        peak, guess = measured["memory"]["peak_bytes"], estimated["memory"]["peak_bytes"]
        step, step_guess = measured["throughput"]["step_time_s"], estimated["throughput"]["step_time_s"]
        if cell.method.name == "full":
            full_step[cell.batch_size] = step
        within = abs(guess / peak - 1) <= GOAL
        missed += not within
        table.add_row(cell.cell_id, f"{peak / 2**30:.2f} GiB", f"{guess / 2**30:.2f} GiB", f"{guess / peak:.3f}",
                      "yes" if within else "NO", f"{step * 1e3:.1f} ms",
                      f"{step / full_step[cell.batch_size]:.2f}×" if cell.batch_size in full_step else "—",
                      f"{step_guess * 1e3:.1f} ms", f"{step_guess / step:.2f}")
    from profiler.models import preset_dims

    dims = preset_dims(args.preset, {})
    ops = op_times_ms(args.batch_sizes[0] * args.seq_len, dims.d_model, dims.d_ff)
    table.caption = (f"op: Linear {dims.d_model}→{dims.d_ff} forward+backward at {args.batch_sizes[0] * args.seq_len} tokens, "
                     f"exact {ops['exact']:.2f} ms, wtacrs@0.3 {ops['wtacrs@0.3']:.2f} ms "
                     f"({ops['wtacrs@0.3'] / ops['exact']:.2f}×)")
    Console(highlight=False).print(table)
    return 1 if missed else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="t5-base")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[16, 32])
    parser.add_argument("--seq-len", type=int, default=128)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print(f"gpu_check: no CUDA device (torch {torch.__version__}, torch.cuda.is_available() is False): nothing to check")
        return 0
    return check(args)


if __name__ == "__main__":
    sys.exit(main())
