"""Lossless activation ops against torch: saved bytes and forward+backward time, side by side.

    python benchmarks/lossless.py [--repeats 15] [--device cpu]

For dropout it compares ``F.dropout`` (CPU: fp32 ``noise`` saved by MulBackward; CUDA: bool mask),
the packed 1-bit mask (:class:`wtacrs.lossless.PackedDropout`) and a regenerated mask
(:class:`RegeneratedDropout` below: only the generator state saved, the mask drawn again in
backward; CPU only, where it replays torch's composite draw bit for bit). For ReLU it
compares ``torch.relu`` (saves its output) with :class:`wtacrs.lossless.PackedReLU`. Times are
medians over interleaved runs; the ratio column is against the torch op. Bytes are the distinct
storages seen by ``torch.autograd.graph.saved_tensors_hooks``.

Latest output (``--repeats 11 --threads 1``, 2026-12-02; the 2-core machine was shared with
other jobs, so absolute times are slow and only the interleaved ratios compare; the script first
checks ``RegeneratedDropout`` against ``F.dropout`` bit for bit):

    torch 2.13.0+cpu, 1 threads, p = 0.1

    dropout, attention probabilities: shape (16, 12, 128, 128) (3.0 Mi elements), torch.float32, cpu
                    method  saved MiB bytes/elem  vs torch  fwd+bwd ms time ratio
                 F.dropout     12.000     4.0000    1.0000      116.43      1.000
               packed mask      0.375     0.1250    0.0312      152.92      1.313
          regenerated mask      0.005     0.0016    0.0004      216.74      1.861

    dropout, FFN activations: shape (4096, 3072) (12.0 Mi elements), torch.float32, cpu
                    method  saved MiB bytes/elem  vs torch  fwd+bwd ms time ratio
                 F.dropout     48.000     4.0000    1.0000      945.33      1.000
               packed mask      1.500     0.1250    0.0312     1252.05      1.324
          regenerated mask      0.005     0.0004    0.0001     1643.52      1.739

    ReLU, FFN activations: shape (4096, 3072) (12.0 Mi elements), torch.float32, cpu
                    method  saved MiB bytes/elem  vs torch  fwd+bwd ms time ratio
                torch.relu     48.000     4.0000    1.0000      322.93      1.000
               packed ReLU      1.500     0.1250    0.0312      599.18      1.855

"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from wtacrs import lossless


class RegeneratedDropout(torch.autograd.Function):
    """CPU dropout that saves the default generator's state (5056 bytes) instead of a mask.

    The forward is torch's composite CPU path (``empty_like(x).bernoulli_(1 - p)``, divided by
    ``1 - p``), so it is bitwise ``F.dropout`` under the same seed; backward restores the state
    into a private generator and draws the same noise again.
    """

    @staticmethod
    def forward(ctx, x, p):
        state = torch.default_generator.get_state()
        noise = torch.empty_like(x).bernoulli_(1.0 - p).div_(1.0 - p)
        ctx.p, ctx.stride = p, noise.stride()
        ctx.save_for_backward(state)
        return x * noise

    @staticmethod
    def backward(ctx, grad):
        (state,) = ctx.saved_tensors
        generator = torch.Generator().set_state(state)
        noise = torch.empty_strided(grad.shape, ctx.stride, dtype=grad.dtype)
        noise.bernoulli_(1.0 - ctx.p, generator=generator).div_(1.0 - ctx.p)
        return grad * noise, None


def saved_bytes(fn, x) -> int:
    seen: dict[int, int] = {}

    def pack(t):
        seen.setdefault(t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(x)
    return sum(seen.values())


def step(fn, x, grad, sync) -> float:
    sync()
    start = time.perf_counter()
    out = fn(x)
    out.backward(grad)
    sync()
    return time.perf_counter() - start


def compare(title: str, methods: dict, shape, repeats: int, device: str, dtype=torch.float32) -> None:
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    x = torch.randn(*shape, device=device, dtype=dtype, requires_grad=True)
    grad = torch.randn(*shape, device=device, dtype=dtype)
    numel = x.numel()
    times = {name: [] for name in methods}
    for _ in range(2):
        for fn in methods.values():
            step(fn, x, grad, sync)
    for _ in range(repeats):
        for name, fn in methods.items():
            times[name].append(step(fn, x, grad, sync))
    base_name = next(iter(methods))
    base_t = statistics.median(times[base_name])
    base_b = saved_bytes(next(iter(methods.values())), x) or 1
    print(f"\n{title}: shape {tuple(shape)} ({numel / 2**20:.1f} Mi elements), {dtype}, {device}")
    print(f"{'method':>22} {'saved MiB':>10} {'bytes/elem':>10} {'vs torch':>9} {'fwd+bwd ms':>11} {'time ratio':>10}")
    for name, fn in methods.items():
        b = saved_bytes(fn, x)
        t = statistics.median(times[name])
        print(
            f"{name:>22} {b / 2**20:>10.3f} {b / numel:>10.4f} {b / base_b:>9.4f} {t * 1e3:>11.2f} {t / base_t:>10.3f}"
        )


def check_regenerated(p: float) -> None:
    """What the docstring of ``RegeneratedDropout`` says, checked before it is timed: bitwise
    ``F.dropout`` under the same seed (output and input gradient, contiguous and permuted inputs),
    and one generator state saved."""
    for x in (torch.randn(64, 96), torch.randn(96, 64).t()):
        grads = []
        for fn in (lambda t: F.dropout(t, p, True), lambda t: RegeneratedDropout.apply(t, p)):
            torch.manual_seed(1)
            leaf = x.detach().requires_grad_()
            out = fn(leaf)
            out.backward(torch.ones_like(out))
            grads.append((out.detach(), leaf.grad))
        assert all(torch.equal(a, b) for a, b in zip(*grads)), "RegeneratedDropout is not F.dropout bit for bit"
    state_bytes = torch.default_generator.get_state().numel()
    assert saved_bytes(lambda t: RegeneratedDropout.apply(t, p), torch.randn(64, 96, requires_grad=True)) == state_bytes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--p", type=float, default=0.1)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, p = {args.p}")
    p = args.p
    dropouts = {
        "F.dropout": lambda x: F.dropout(x, p, True),
        "packed mask": lambda x: lossless.dropout(x, p),
    }
    if args.device == "cpu":
        check_regenerated(p)
        dropouts["regenerated mask"] = lambda x: RegeneratedDropout.apply(x, p)
    compare("dropout, attention probabilities", dropouts, (16, 12, 128, 128), args.repeats, args.device)
    compare("dropout, FFN activations", dropouts, (4096, 3072), args.repeats, args.device)
    relus = {"torch.relu": torch.relu, "packed ReLU": lossless.relu}
    compare("ReLU, FFN activations", relus, (4096, 3072), args.repeats, args.device)


if __name__ == "__main__":
    main()
