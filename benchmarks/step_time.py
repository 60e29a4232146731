"""Training step time of WTA-CRS against full fine-tuning, same model, same batch, on CPU.

    python benchmarks/step_time.py [--preset t5-base] [--batch-size 8] [--seq-len 128] [--steps 5]

Two copies of one randomly initialised model (identical weights) take interleaved AdamW steps
on the same batch; the script prints the median step time of each and the ratio to full
fine-tuning. Interleaving makes machine noise hit every method alike.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
import transformers as tf

import wtacrs

PRESETS = {
    "t5-small": dict(d_model=512, d_ff=2048, num_layers=6, num_decoder_layers=6, num_heads=8, d_kv=64),
    "t5-base": dict(d_model=768, d_ff=3072, num_layers=12, num_decoder_layers=12, num_heads=12, d_kv=64),
}


def step(model, optimizer, batch) -> float:
    start = time.perf_counter()
    optimizer.zero_grad(set_to_none=True)
    model(**batch).loss.backward()
    optimizer.step()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="t5-base", choices=sorted(PRESETS))
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.3, 0.1])
    args = parser.parse_args()

    config = tf.T5Config(vocab_size=32128, decoder_start_token_id=0, pad_token_id=0, use_cache=False, **PRESETS[args.preset])
    torch.manual_seed(0)
    base = tf.T5ForConditionalGeneration._from_config(config, attn_implementation="eager").train()
    models = {"full": base}
    for r in args.ratios:
        models[f"wtacrs@{r}"] = wtacrs.convert(copy.deepcopy(base), wtacrs.WTACRSConfig(ratio=r, seed=0))
    optimizers = {name: torch.optim.AdamW(m.parameters(), lr=1e-5) for name, m in models.items()}
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(2, 32128, (args.batch_size, args.seq_len), generator=g)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.randint(2, 32128, ids.shape, generator=g)}

    times = {name: [] for name in models}
    for name in models:  # warm-up: optimizer state, allocator
        step(models[name], optimizers[name], batch)
    for _ in range(args.steps):
        for name, model in models.items():
            times[name].append(step(model, optimizers[name], batch))
    print(f"{args.preset}, B={args.batch_size}, S=T={args.seq_len}, fp32, AdamW, CPU, {torch.get_num_threads()} threads")
    full = statistics.median(times["full"])
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"  {name:>12}: median step {med:7.3f} s   ratio to full {med / full:.3f}x")


if __name__ == "__main__":
    main()
