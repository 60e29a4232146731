"""Saved activations and peak memory of T5 fine-tuning methods, estimated on the meta device.

    python benchmarks/memory.py [--preset t5-base] [--batch-size 64] [--seq-len 128] [--target-len 128]
                                [--methods full lora wtacrs@0.3 wtacrs@0.1 lora+wtacrs@0.3 lora+wtacrs@0.1]
                                [--chunked-loss [TOKENS]]

Every figure models CUDA kernels (bool dropout masks, fp32 weights, AdamW) and comes from
`profiler.profile_step` on the meta device: the tracker and breakdown `python -m profiler run` uses. Prints the
saved activation bytes per operator and method, then totals, peaks and the ratios to full
fine-tuning. Nothing is downloaded; weights do not exist on meta. ``--chunked-loss`` applies
``wtacrs.chunked_loss`` (chunks of TOKENS tokens, default 1024) to every method, full included,
so the ratios compare like with like.
"""

from __future__ import annotations

import argparse
from collections import defaultdict

import torch
import transformers as tf

from profiler import prepare_method, profile_step
from wtacrs.loss import DEFAULT_CHUNK_TOKENS, chunked_loss

GIB = 2**30
PRESETS = {
    "t5-base": dict(d_model=768, d_ff=3072, num_layers=12, num_decoder_layers=12, num_heads=12, d_kv=64),
    "t5-large": dict(d_model=1024, d_ff=4096, num_layers=24, num_decoder_layers=24, num_heads=16, d_kv=64),
}


def measure(preset: str, method: str, batch_size: int, seq_len: int, target_len: int, chunk_tokens: int | None = None):
    config = tf.T5Config(vocab_size=32128, decoder_start_token_id=0, pad_token_id=0, use_cache=False, **PRESETS[preset])
    with torch.device("meta"):
        model = tf.T5ForConditionalGeneration._from_config(config, attn_implementation="eager")
    model = prepare_method(method, model.train(), "t5", 0)
    if chunk_tokens is not None:
        model = chunked_loss(model, chunk_tokens)
    batch = {
        "input_ids": torch.zeros(batch_size, seq_len, dtype=torch.long, device="meta"),
        "labels": torch.zeros(batch_size, target_len, dtype=torch.long, device="meta"),
    }
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    training_step(model, batch, optimizer)  # warm-up: the tracked step starts with optimizer state
    with profile_step(model, optimizer, inputs=batch, models_device="cuda") as prof:
        training_step(model, batch, optimizer)
    return prof


def training_step(model, batch, optimizer) -> None:
    optimizer.zero_grad(set_to_none=True)
    loss = model(**batch).loss
    loss.backward()
    del loss  # not alive in the optimizer step
    optimizer.step()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="t5-base", choices=sorted(PRESETS))
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--target-len", type=int, default=128)
    parser.add_argument("--methods", nargs="+", default=["full", "lora", "wtacrs@0.3", "wtacrs@0.1", "lora+wtacrs@0.3", "lora+wtacrs@0.1"])
    parser.add_argument("--chunked-loss", type=int, nargs="?", const=DEFAULT_CHUNK_TOKENS, default=None, metavar="TOKENS",
                        help=f"wtacrs.chunked_loss on every method, TOKENS tokens per chunk (default {DEFAULT_CHUNK_TOKENS})")
    args = parser.parse_args()

    results = {m: measure(args.preset, m, args.batch_size, args.seq_len, args.target_len, args.chunked_loss) for m in args.methods}
    by_operator: dict[str, dict[str, int]] = defaultdict(dict)
    for method, r in results.items():
        for item in r.activations_by_operator():
            key = f"{item['operator']} ({item['category']})"
            by_operator[key][method] = by_operator[key].get(method, 0) + item["bytes"]

    loss = "stock loss" if args.chunked_loss is None else f"chunked loss ({args.chunked_loss} tokens)"
    print(f"{args.preset}, B={args.batch_size}, S={args.seq_len}, T={args.target_len}, fp32, eager, AdamW, {loss}, "
          "meta estimate of cuda kernels; GiB")
    width = max(len(k) for k in by_operator) + 2
    print(f"{'saved for backward':<{width}}" + "".join(f"{m:>17}" for m in results))
    for key in sorted(by_operator, key=lambda k: -max(by_operator[k].values())):
        if max(by_operator[key].values()) < GIB // 2000:  # under 0.5 MiB in every method
            continue
        print(f"{key:<{width}}" + "".join(f"{by_operator[key].get(m, 0) / GIB:>17.3f}" for m in results))
    rows = {
        "activations total": {m: r.saved_bytes for m, r in results.items()},
        "peak": {m: r.peak_bytes for m, r in results.items()},
    }
    for name, values in rows.items():
        print(f"{name:<{width}}" + "".join(f"{v / GIB:>17.3f}" for v in values.values()))
        if "full" in values:
            print(f"{'  full / method':<{width}}" + "".join(f"{values['full'] / v:>16.2f}x" for v in values.values()))


if __name__ == "__main__":
    main()
