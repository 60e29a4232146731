"""The kernels the step-time roofline counts in one forward and backward, full against WTA-CRS.

    python benchmarks/kernel_count.py [--layers 2] [--batch-size 64] [--seq-len 128] [--ratio 0.3]

A T5-Base with ``--layers`` blocks on each side, built on meta (no memory, a few seconds): per
method, the matmul FLOPs, the bytes read and written and the number of kernels that
``profiler.steptime.OpCostCounter`` counts, as the roofline costs them (unfused, one kernel per
aten op), and the 10 ops that move the most bytes.
"""

from __future__ import annotations

import argparse
from collections import Counter

import torch

from profiler.methods import parse
from profiler.models import MetaMaskChecks, build_model, make_batch
from profiler.steptime import OpCostCounter, op_cost
from profiler.suite import parse_suite


class _ByOp(OpCostCounter):
    """Also the bytes of each aten op."""

    def __init__(self) -> None:
        super().__init__()
        self.bytes_by_op: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = super().__torch_dispatch__(func, types, args, kwargs)
        cost = op_cost(func, args, kwargs or {}, out)
        if cost is not None:
            self.bytes_by_op[func._overloadpacket.__name__] += cost[1]
        return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--ratio", type=float, default=0.3)
    args = parser.parse_args()
    layers = {"num_layers": args.layers, "num_decoder_layers": args.layers}
    suite = parse_suite({"model": {"family": "t5", "preset": "t5-base", "config": layers},
                         "grid": {"batch_size": [args.batch_size], "seq_len": [args.seq_len], "target_len": [args.seq_len]},
                         "methods": ["full", f"wtacrs@{args.ratio:g}"]})
    for cell in suite.cells():
        model = parse(cell.method.name).prepare(build_model(cell, "meta"), cell.family).train()
        batch = make_batch(cell, "meta", torch.Generator().manual_seed(0))
        with MetaMaskChecks(cell), _ByOp() as counter:
            model(**batch).loss.backward()
        cost = counter.cost
        top = ", ".join(f"{name} {nbytes / 1e9:.1f}" for name, nbytes in counter.bytes_by_op.most_common(10))
        print(f"{cell.method.name}: {cost.flops / 1e12:.3f} TFLOP, {cost.bytes_moved / 1e9:.1f} GB, {cost.ops} kernels; "
              f"GB by op: {top}")


if __name__ == "__main__":
    main()
