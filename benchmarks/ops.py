"""Forward+backward time of the WTA-CRS linear against an exact nn.Linear, side by side.

    python benchmarks/ops.py [--tokens 4096] [--repeats 30]

Prints the median time per shape and method and the ratio to the exact layer. The FLOP bound of
the ratio is (2 + r) / 3: forward and grad_input stay exact, grad_weight costs r of its FLOPs.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

from wtacrs import WTACRSLinear


def step_time(layer: nn.Module, x: torch.Tensor, dz: torch.Tensor) -> float:
    start = time.perf_counter()
    layer(x).backward(dz)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.3, 0.1])
    args = parser.parse_args()

    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, n = {args.tokens} tokens, fp32, CPU")
    print(f"{'shape':>12} {'method':>12} {'median ms':>10} {'ratio':>7} {'FLOP bound':>10}")
    for d_in, d_out in [(768, 3072), (3072, 768)]:
        exact = nn.Linear(d_in, d_out)
        layers = {"exact": exact}
        for r in args.ratios:
            layers[f"wtacrs@{r}"] = WTACRSLinear(exact, ratio=r, generator=torch.Generator().manual_seed(0))
        x = torch.randn(args.tokens, d_in, requires_grad=True)
        dz = torch.randn(args.tokens, d_out)
        times = {name: [] for name in layers}
        for _ in range(3):  # warm-up
            for layer in layers.values():
                step_time(layer, x, dz)
        for _ in range(args.repeats):  # interleaved so drift hits every method alike
            for name, layer in layers.items():
                times[name].append(step_time(layer, x, dz))
        base = statistics.median(times["exact"])
        for name, ts in times.items():
            med = statistics.median(ts)
            r = 1.0 if name == "exact" else float(name.split("@")[1])
            print(f"{f'{d_in}->{d_out}':>12} {name:>12} {med * 1e3:>10.2f} {med / base:>7.3f} {(2 + r) / 3:>10.3f}")


if __name__ == "__main__":
    main()
