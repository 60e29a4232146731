"""Time of a meta-device estimate of one training step (target: T5-3B in < 30 s on 2 cores).

Builds T5 models from ``transformers.T5Config`` on the meta device (random weights, nothing
downloaded), runs ``profiler.measure.measure_training_step`` with AdamW at B=64, S=128 (target
128), eager attention, modelling cuda kernels, and prints side by side, in one process:

- the wall time of the whole estimate (warm-up step + tracked step);
- the time of one plain (untracked) meta step, so the tracking overhead is a ratio;
- the figures the estimate produced (peak, categories, saved activations by operator).

``--memtracker`` also times torch's MemTracker on the same step for comparison (slow).

Usage: python benchmarks/meta_estimate.py [--models t5-base,t5-large,t5-3b] [--memtracker]
"""

from __future__ import annotations

import argparse
import time

import torch
from transformers import T5Config, T5ForConditionalGeneration

from profiler.measure import CudaKernelBehaviour, measure_training_step, training_step
from wtacrs.taxonomy import family_of

GIB = 1024**3
PRESETS = {
    "t5-base": {"d_model": 768, "d_ff": 3072, "num_layers": 12, "num_decoder_layers": 12, "num_heads": 12, "d_kv": 64},
    "t5-large": {"d_model": 1024, "d_ff": 4096, "num_layers": 24, "num_decoder_layers": 24, "num_heads": 16, "d_kv": 64},
    "t5-3b": {"d_model": 1024, "d_ff": 16384, "num_layers": 24, "num_decoder_layers": 24, "num_heads": 32, "d_kv": 128},
}


def build(preset: str, batch_size: int, seq_len: int, target_len: int | None = None):
    config = T5Config(vocab_size=32128, decoder_start_token_id=0, pad_token_id=0, **PRESETS[preset])
    with torch.device("meta"):
        model = T5ForConditionalGeneration._from_config(config, attn_implementation="eager")
    model.train()
    batch = {
        # attention_mask is left out: transformers' mask helpers read mask values, which meta has not.
        "input_ids": torch.zeros(batch_size, seq_len, dtype=torch.long, device="meta"),
        "labels": torch.zeros(batch_size, target_len or seq_len, dtype=torch.long, device="meta"),
    }
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    return model, batch, optimizer


def time_plain_step(*cell) -> float:
    """One untracked meta step with the same cuda kernel behaviour as the estimate."""
    model, batch, optimizer = build(*cell)
    with CudaKernelBehaviour(optimizer):
        training_step(model, batch, optimizer)  # optimizer state, as in the estimate
        start = time.perf_counter()
        training_step(model, batch, optimizer)
        return time.perf_counter() - start


def time_memtracker(*cell) -> tuple[float, int]:
    from torch.distributed._tools.mem_tracker import MemTracker

    model, batch, optimizer = build(*cell)
    training_step(model, batch, optimizer)
    tracker = MemTracker()
    tracker.track_external(model, optimizer)
    start = time.perf_counter()
    with tracker:
        training_step(model, batch, optimizer)
    elapsed = time.perf_counter() - start
    return elapsed, tracker.get_tracker_snapshot("peak")[torch.device("meta")]["Total"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="t5-base,t5-3b")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--target-len", type=int, default=None, help="decoder length (default: --seq-len)")
    parser.add_argument(
        "--memtracker", action="store_true", help="also run torch's MemTracker and an estimate modelling cpu kernels, as it does"
    )
    args = parser.parse_args()
    target = args.target_len or args.seq_len
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, B={args.batch_size} S={args.seq_len} "
          f"target={target}, AdamW, eager, estimates model cuda kernels")
    for preset in args.models.split(","):
        if preset not in PRESETS:
            parser.error(f"--models: unknown preset {preset!r}; known: {', '.join(PRESETS)}")
        cell = (preset, args.batch_size, args.seq_len, target)
        plain = time_plain_step(*cell)
        model, batch, optimizer = build(*cell)
        start = time.perf_counter()
        m = measure_training_step(model, batch, optimizer, device="meta", family=family_of(model), models_device="cuda")
        estimate = time.perf_counter() - start
        saved = sum(a["bytes"] for a in m.activations)
        print(f"\n{preset}: estimate {estimate:.1f} s (warm-up + tracked step), plain meta step {plain:.1f} s, "
              f"estimate/plain step {estimate / plain:.2f}x (2 steps: >= 2x)")
        print(f"  peak {m.peak_bytes / GIB:.2f} GiB; " + ", ".join(f"{k} {v / GIB:.2f}" for k, v in m.categories.items()))
        print(f"  saved activations {saved / GIB:.2f} GiB; FLOPs/step {m.flops / 1e12:.1f} T")
        for a in m.activations:
            print(f"    {a['operator']:<12} {a['category']:<13} {a['bytes'] / GIB:7.3f} GiB {100 * a['bytes'] / saved:5.1f}%")
        # the runner estimates one meta model at several batch sizes: later estimates make the
        # warm-up's gradients and optimizer state directly instead of running the step
        model.zero_grad(set_to_none=True)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        start = time.perf_counter()
        again = measure_training_step(model, batch, optimizer, device="meta", family=family_of(model), models_device="cuda")
        repeat = time.perf_counter() - start
        same = (again.peak_bytes, again.categories, again.activations) == (m.peak_bytes, m.categories, m.activations)
        print(f"  repeat estimate of the same model {repeat:.1f} s ({estimate / repeat:.2f}x faster), "
              f"figures identical: {same}")
        # activation checkpointing (non-reentrant, as profiler.methods applies it)
        model, batch, optimizer = build(*cell)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        start = time.perf_counter()
        ckpt = measure_training_step(model, batch, optimizer, device="meta", family=family_of(model), models_device="cuda")
        print(f"  checkpointing: estimate {time.perf_counter() - start:.1f} s, peak {ckpt.peak_bytes / GIB:.2f} GiB "
              f"(full over checkpointing {m.peak_bytes / ckpt.peak_bytes:.2f}x), saved "
              f"{sum(a['bytes'] for a in ckpt.activations) / GIB:.2f} GiB")
        if args.memtracker:
            # MemTracker sees cpu-style kernels on meta (fp32 dropout masks, for-loop AdamW, no rounding).
            model, batch, optimizer = build(*cell)
            start = time.perf_counter()
            cpu_style = measure_training_step(model, batch, optimizer, device="meta", family=None, models_device="cpu")
            ours = time.perf_counter() - start
            elapsed, peak = time_memtracker(*cell)
            difference = cpu_style.peak_bytes - peak
            print(f"  modelling cpu kernels: ours {ours:.1f} s (warm-up + tracked step), peak {cpu_style.peak_bytes} B; "
                  f"MemTracker {elapsed:.1f} s (tracked step only), peak {peak} B; "
                  f"difference {difference} B ({1e6 * difference / peak:.1f} ppm; ours also counts the batch "
                  f"and AdamW's cpu step counters)")


if __name__ == "__main__":
    main()
