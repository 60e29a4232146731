"""Fine-tune a tiny T5 on a synthetic seq2seq task: full fine-tuning against WTA-CRS@0.3 and @0.1.

    python benchmarks/convergence.py [--steps 400] [--batch-size 32]

The task: the target is the source with every token id mapped by a fixed random permutation,
with 10% of target tokens replaced by random ones, so the loss has a floor (the noise) and
"converged" means near that floor rather than 0. Every method starts from the same weights and sees the same
batches and dropout masks (same seeds). Prints the smoothed loss every 50 steps and the final
loss (mean of the last 50 steps) relative to full fine-tuning.
"""

from __future__ import annotations

import argparse
import time

import torch
import transformers as tf

import wtacrs

VOCAB, SRC_LEN, NOISE = 64, 16, 0.1
PERMUTATION = torch.cat([torch.arange(2), 2 + torch.randperm(VOCAB - 2, generator=torch.Generator().manual_seed(0))])


def make_batch(generator: torch.Generator, batch_size: int) -> dict[str, torch.Tensor]:
    src = torch.randint(2, VOCAB, (batch_size, SRC_LEN), generator=generator)
    tgt = PERMUTATION[src]
    noise = torch.rand(tgt.shape, generator=generator) < NOISE
    tgt = torch.where(noise, torch.randint(2, VOCAB, tgt.shape, generator=generator), tgt)
    return {"input_ids": src, "attention_mask": torch.ones_like(src), "labels": tgt}


def train(method: str, steps: int, batch_size: int, lr: float) -> list[float]:
    config = tf.T5Config(
        vocab_size=VOCAB, d_model=64, d_ff=128, d_kv=16, num_heads=4, num_layers=2, num_decoder_layers=2,
        dropout_rate=0.1, decoder_start_token_id=0, pad_token_id=0, relative_attention_num_buckets=16, use_cache=False,
    )
    torch.manual_seed(0)
    model = tf.T5ForConditionalGeneration._from_config(config, attn_implementation="eager").train()
    if method != "full":
        name, ratio = method.split("@")
        options = {"wtacrs": {}, "wtacrs-linear": {"tm1": False, "tm2": False}, "wtacrs-storev": {"tm2_v": "store"}, "wtacrs-tm2only": {"tm1": False, "tm2_v": "store"}}[name]
        wtacrs.convert(model, wtacrs.WTACRSConfig(ratio=float(ratio), seed=0, **options))
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    data = torch.Generator().manual_seed(1)
    torch.manual_seed(2)  # dropout masks
    losses = []
    for _ in range(steps):
        optimizer.zero_grad(set_to_none=True)
        loss = model(**make_batch(data, batch_size)).loss
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--methods", nargs="+", default=["full", "wtacrs@0.3", "wtacrs@0.1"])
    args = parser.parse_args()

    curves = {}
    for method in args.methods:
        start = time.perf_counter()
        curves[method] = train(method, args.steps, args.batch_size, args.lr)
        print(f"{method}: {args.steps} steps in {time.perf_counter() - start:.1f} s")
    window = 50
    print(f"\nloss (mean of the previous {window} steps)")
    print(f"{'step':>6} " + " ".join(f"{m:>12}" for m in curves))
    for step in range(window, args.steps + 1, window):
        print(f"{step:>6} " + " ".join(f"{sum(c[step - window:step]) / window:>12.4f}" for c in curves.values()))
    final = {m: sum(c[-window:]) / window for m, c in curves.items()}
    base = final.get("full")
    print("\nfinal loss" + (" (relative to full)" if base else ""))
    for method, value in final.items():
        rel = f"  {value / base:.3f}x" if base else ""
        print(f"  {method:>12}: {value:.4f}{rel}")


if __name__ == "__main__":
    main()
