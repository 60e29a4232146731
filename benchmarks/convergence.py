"""Fine-tune a tiny T5 on a synthetic seq2seq task: full fine-tuning against WTA-CRS variants.

    python benchmarks/convergence.py [--steps 300] [--seq-len 16] [--methods full wtacrs@0.3 ...]

The task: the target is the source with every token id mapped by a fixed random permutation,
with 10% of target tokens replaced by random ones, so the loss has a floor (the noise) and
"converged" means near that floor rather than 0 (uniform guessing is ln 62 = 4.13). Every method
starts from the same weights and sees the same batches and dropout masks (same seeds). Prints
the smoothed loss every 50 steps and the final loss (mean of the last 50 steps) relative to full
fine-tuning.

Methods (``name@ratio``; see ``METHODS``):

* ``full``: no conversion;
* ``wtacrs``: the default conversion (linears, TensorMul-1 with P-aware probabilities, TensorMul-2
  reusing P with k sampled V columns);
* ``wtacrs-storev``: the same with V stored (exact dP);
* ``wtacrs-tm2only``: TensorMul-1 exact, V stored (attention gradients exact);
* ``wtacrs-linear``: only the linears sampled (attention untouched);
* ``wtacrs-actp``: ``wtacrs`` with ``probability="activation"``: TensorMul-1/V-column
  probabilities from activation norms only (the first version, for comparison; the linears'
  probabilities are the same here, whose batches have no padding).
"""

from __future__ import annotations

import argparse
import time

import torch
import transformers as tf

import wtacrs

VOCAB, NOISE = 64, 0.1
PERMUTATION = torch.cat([torch.arange(2), 2 + torch.randperm(VOCAB - 2, generator=torch.Generator().manual_seed(0))])

# name -> WTACRSConfig options; None: full fine-tuning
METHODS: dict[str, dict | None] = {
    "full": None,
    "wtacrs": {},
    "wtacrs-storev": {"tm2_v": "store"},
    "wtacrs-tm2only": {"tm1": False, "tm2_v": "store"},
    "wtacrs-linear": {"tm1": False, "tm2": False},
    "wtacrs-actp": {"probability": "activation"},
}


def make_batch(generator: torch.Generator, batch_size: int, seq_len: int) -> dict[str, torch.Tensor]:
    src = torch.randint(2, VOCAB, (batch_size, seq_len), generator=generator)
    tgt = PERMUTATION[src]
    noise = torch.rand(tgt.shape, generator=generator) < NOISE
    tgt = torch.where(noise, torch.randint(2, VOCAB, tgt.shape, generator=generator), tgt)
    return {"input_ids": src, "attention_mask": torch.ones_like(src), "labels": tgt}


def make_model(method: str) -> torch.nn.Module:
    config = tf.T5Config(
        vocab_size=VOCAB, d_model=64, d_ff=128, d_kv=16, num_heads=4, num_layers=2, num_decoder_layers=2,
        dropout_rate=0.1, decoder_start_token_id=0, pad_token_id=0, relative_attention_num_buckets=16, use_cache=False,
    )
    torch.manual_seed(0)
    model = tf.T5ForConditionalGeneration._from_config(config, attn_implementation="eager").train()
    name, _, ratio = method.partition("@")
    if name not in METHODS or (METHODS[name] is not None and not ratio):
        raise SystemExit(f"unknown method {method!r}; expected one of {', '.join(METHODS)} (with @ratio except full)")
    if METHODS[name] is not None:
        wtacrs.convert(model, wtacrs.WTACRSConfig(ratio=float(ratio), seed=0, **METHODS[name]))
    return model


def train(model: torch.nn.Module, steps: int, batch_size: int, lr: float, seq_len: int) -> list[float]:
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    data = torch.Generator().manual_seed(1)
    torch.manual_seed(2)  # dropout masks
    losses = []
    for _ in range(steps):
        optimizer.zero_grad(set_to_none=True)
        loss = model(**make_batch(data, batch_size, seq_len)).loss
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=16)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--methods", nargs="+", default=["full", "wtacrs@0.3", "wtacrs-storev@0.3", "wtacrs-linear@0.3"])
    args = parser.parse_args()
    if args.steps < 50:
        raise SystemExit("--steps must be at least 50 (the loss is averaged over 50 steps)")
    models = {method: make_model(method) for method in args.methods}  # validates every name first

    curves = {}
    for method, model in models.items():
        start = time.perf_counter()
        curves[method] = train(model, args.steps, args.batch_size, args.lr, args.seq_len)
        print(f"{method}: {args.steps} steps in {time.perf_counter() - start:.1f} s")
    window = 50
    print(f"\nseq len {args.seq_len}, batch {args.batch_size}; loss (mean of the previous {window} steps)")
    print(f"{'step':>6} " + " ".join(f"{m:>18}" for m in curves))
    for step in range(window, args.steps + 1, window):
        print(f"{step:>6} " + " ".join(f"{sum(c[step - window:step]) / window:>18.4f}" for c in curves.values()))
    final = {m: sum(c[-window:]) / window for m, c in curves.items()}
    base = final.get("full")
    print("\nfinal loss" + (" (relative to full)" if base else ""))
    for method, value in final.items():
        rel = f"  {value / base:.3f}x" if base else ""
        print(f"  {method:>18}: {value:.4f}{rel}")


if __name__ == "__main__":
    main()
