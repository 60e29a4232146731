"""TensorMul-2 (``dropout(P) V``) options: saved bytes per attention call and gradient variance.

    python benchmarks/attention_tm2.py [--seeds 50] [--ratio 0.3]

One attention call of BERT-Base shape (B=4, 12 heads, S=128, head dim 64, attention dropout 0.1)
and of T5-Base shape with a padded batch, run through :func:`wtacrs.attention.wtacrs_attention_forward`:

* ``eager``: the family's eager attention (stores Q, K, P, dropout(P), the dropout mask, V);
* ``P reuse, V stored``: TensorMul-2 saves the softmax's P, the 1-bit mask and V -- exact;
* ``P reuse, V sampled``: V replaced by ``k`` sampled head-dim columns of V -- unbiased;
* ``sampled P rows + V cols``: :func:`wtacrs.functional.matmul` on ``dropout(P) @ V`` (stores k rows
  of dropout(P), which is not the softmax's storage) -- for reference;

each alone (TensorMul-1 exact) and with TensorMul-1 sampled at the same ratio. Saved bytes are
the distinct storages seen by ``saved_tensors_hooks`` (Q, K, V and the output-gradient inputs
are created outside). Gradient quality is the relative mean squared error
``E ||g - g_exact||^2 / ||g_exact||^2`` of dQ, dK and dV over ``--seeds`` independent samples
(also the relative squared bias of their mean, which must shrink like 1/seeds).

In the padded case two more TensorMul-1 rows show the sampling probabilities: ``no mask``
ignores the attention mask (keys no query can see get probability > 0), ``+tokens`` also uses
the queries' token mask (``AttentionSettings.query_stream``) so pad queries get probability 0.

Decision: TensorMul-2 keeps V (``AttentionSettings.tm2_v = "store"``). Reusing P drops
``dropout(P)`` (the largest saved tensor besides P) for free; V costs one Linear input's worth,
and sampling its columns saves only ~1 MiB of 5.5 here (V is d_head/S of P: 1/2 at S=128, 1/8 at S=512)
while multiplying the dQ/dK error by 5-7x -- an error that, unlike a Linear's weight-gradient
error, flows on into every earlier layer's activation gradients.

Latest output (``--seeds 50``, 2 shared CPU threads):

    torch 2.13.0+cpu, ratio 0.3, attention dropout 0.1, 50 seeds, fp32 CPU

    BERT-Base, no padding: B=4, heads=12, S=128, head dim=64; eager saves 13.50 MiB per call
     TensorMul-1                TensorMul-2  saved MiB  vs eager  relMSE dQ  relMSE dK  relMSE dV  bias^2 dQ
           exact          P reuse, V stored       7.59     0.562   0.00e+00   0.00e+00   0.00e+00    1.3e-13
           exact         P reuse, V sampled       6.57     0.486   2.87e+00   3.30e+00   0.00e+00    4.8e-02
     sampled@0.3          P reuse, V stored       5.52     0.409   9.41e-01   1.66e+00   0.00e+00    1.6e-02
     sampled@0.3         P reuse, V sampled       4.49     0.333   6.89e+00   1.03e+01   0.00e+00    1.4e-01
           exact    sampled P rows + V cols       7.49     0.555   3.00e+00   3.30e+00   2.34e+00    5.8e-02

    T5-Base, padded batch: B=4, heads=12, S=128, head dim=64; eager saves 13.50 MiB per call
     TensorMul-1                TensorMul-2  saved MiB  vs eager  relMSE dQ  relMSE dK  relMSE dV  bias^2 dQ
           exact          P reuse, V stored       7.59     0.562   0.00e+00   0.00e+00   0.00e+00    1.3e-13
           exact         P reuse, V sampled       6.57     0.486   2.63e+00   2.96e+00   0.00e+00    4.3e-02
     sampled@0.3          P reuse, V stored       5.52     0.409   4.94e-01   1.74e+00   0.00e+00    8.4e-03
     sampled@0.3         P reuse, V sampled       4.49     0.333   4.68e+00   1.02e+01   0.00e+00    9.1e-02
           exact    sampled P rows + V cols       7.49     0.555   2.75e+00   3.00e+00   2.47e+00    5.3e-02
    @0.3 no mask          P reuse, V stored       5.52     0.409   8.76e-01   1.74e+00   0.00e+00    1.5e-02
    @0.3 +tokens          P reuse, V stored       5.52     0.409   4.94e-01   9.92e-01   0.00e+00    8.4e-03
"""

from __future__ import annotations

import argparse
import contextlib

import torch
from torch import nn

from wtacrs import functional as wf
from wtacrs import lossless
from wtacrs.attention import AttentionSettings, wtacrs_attention_forward
from wtacrs.gradnorm import token_mask


class _Attention(nn.Module):
    """Stands in for a family's attention module (plain softmax, no GQA)."""

    is_causal = False

    def __init__(self, settings: AttentionSettings | None):
        super().__init__()
        if settings is not None:
            self.wtacrs_attention = settings


def eager_reference(module, q, k, v, mask, scaling, dropout, position_bias=None):
    scores = torch.matmul(q, k.transpose(2, 3)) * scaling
    if position_bias is not None:
        scores = scores + position_bias
    if mask is not None:
        scores = scores + mask
    p = torch.softmax(scores, dim=-1)
    p = torch.nn.functional.dropout(p, p=dropout, training=True)
    return torch.matmul(p, v).transpose(1, 2).contiguous(), p


def sampled_both_reference(ratio):
    gen = torch.Generator().manual_seed(0)

    def run(module, q, k, v, mask, scaling, dropout, position_bias=None):
        scores = torch.matmul(q, k.transpose(2, 3)) * scaling
        if position_bias is not None:
            scores = scores + position_bias
        if mask is not None:
            scores = scores + mask
        p = torch.softmax(scores, dim=-1)
        p = lossless.dropout(p, dropout)
        out = wf.matmul(p, v, ratio=ratio, generator=gen)
        return out.transpose(1, 2).contiguous(), p

    return run


def make_case(batch, heads, seq, head_dim, pad, seed=0):
    g = torch.Generator().manual_seed(seed)
    # token norms vary (log-normal), as real activations do; scores have std ~2 (peaked softmax)
    def act():
        scale = torch.exp(0.5 * torch.randn(batch, heads, seq, 1, generator=g))
        return torch.randn(batch, heads, seq, head_dim, generator=g) * scale

    q, k, v = act() * 0.5, act() * 0.5, act()
    d_out = torch.randn(batch, seq, heads, head_dim, generator=g)
    mask = None
    if pad:
        lengths = torch.linspace(seq, seq // 3, batch).long()
        keep = torch.arange(seq)[None, :] < lengths[:, None]
        mask = torch.where(keep[:, None, None, :], 0.0, torch.finfo(torch.float32).min)
        d_out = d_out * keep[:, :, None, None]
    return q, k, v, d_out, mask


def run_once(fn, module, case, scaling, dropout, seed, hooks=False):
    q, k, v, d_out, mask = case
    q, k, v = (t.clone().requires_grad_() for t in (q, k, v))
    storages: dict[int, int] = {}
    inputs = {t.untyped_storage().data_ptr() for t in (q, k, v)}

    def pack(t):
        if t.device.type != "meta":
            storages.setdefault(t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        return t

    torch.manual_seed(seed)
    if hooks:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out, _ = fn(module, q, k, v, mask, scaling, dropout)
    else:
        out, _ = fn(module, q, k, v, mask, scaling, dropout)
    out.backward(d_out)
    # Q, K, V themselves are outputs of the projections; eager stores them, so count them too
    saved = sum(storages.values())
    return (q.grad, k.grad, v.grad), saved, sum(b for p, b in storages.items() if p in inputs)


def wtacrs_fn(module, q, k, v, mask, scaling, dropout):
    return wtacrs_attention_forward(module, q, k, v, mask, scaling=scaling, dropout=dropout)


def evaluate(name, fn, module, case, scaling, dropout, seeds, exact_grads):
    _, saved, _ = run_once(fn, module, case, scaling, dropout, seed=0, hooks=True)
    sq_err = [0.0, 0.0, 0.0]
    mean = [torch.zeros_like(g) for g in exact_grads]
    for s in range(seeds):
        # the dropout draw is the same in every run (seed 0); the sampling generator varies
        grads, _, _ = run_once(fn, module, case, scaling, dropout, seed=0)
        for i, (g, e) in enumerate(zip(grads, exact_grads)):
            sq_err[i] += ((g - e).pow(2).sum() / e.pow(2).sum()).item() / seeds
            mean[i] += g / seeds
        if hasattr(module, "wtacrs_attention"):
            module.wtacrs_attention.generator.manual_seed(1000 + s)
    bias = [((m - e).pow(2).sum() / e.pow(2).sum()).item() for m, e in zip(mean, exact_grads)]
    return saved, sq_err, bias


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=50)
    parser.add_argument("--ratio", type=float, default=0.3)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    r = args.ratio
    dropout = 0.1
    print(f"torch {torch.__version__}, ratio {r}, attention dropout {dropout}, {args.seeds} seeds, fp32 CPU")
    shapes = [("BERT-Base, no padding", (4, 12, 128, 64), False), ("T5-Base, padded batch", (4, 12, 128, 64), True)]
    for title, (b, h, s, d), pad in shapes:
        case = make_case(b, h, s, d, pad)
        scaling = d**-0.5
        module = _Attention(None)
        exact, eager_bytes, _ = run_once(eager_reference, module, case, scaling, dropout, seed=0, hooks=True)
        print(f"\n{title}: B={b}, heads={h}, S={s}, head dim={d}; eager saves {eager_bytes / 2**20:.2f} MiB per call")
        print(f"{'TensorMul-1':>12} {'TensorMul-2':>26} {'saved MiB':>10} {'vs eager':>9} "
              f"{'relMSE dQ':>10} {'relMSE dK':>10} {'relMSE dV':>10} {'bias^2 dQ':>10}")
        variants = []
        for tm1 in (False, True):
            for label, tm2_v in (("P reuse, V stored", "store"), ("P reuse, V sampled", "sample")):
                settings = AttentionSettings(ratio=r, tm1=tm1, tm2=True, tm2_v=tm2_v, generator=torch.Generator().manual_seed(0))
                variants.append((f"sampled@{r}" if tm1 else "exact", label, _Attention(settings), wtacrs_fn))
        variants.append(("exact", "sampled P rows + V cols", _Attention(None), sampled_both_reference(r)))
        if pad:  # TensorMul-1 probabilities: without the mask, and with the queries' token mask
            gen = torch.Generator().manual_seed(0)
            variants.append((f"@{r} no mask", "P reuse, V stored", _Attention(AttentionSettings(ratio=r, mask_aware=False, generator=gen)), wtacrs_fn))
            gen = torch.Generator().manual_seed(0)
            variants.append((f"@{r} +tokens", "P reuse, V stored", _Attention(AttentionSettings(ratio=r, query_stream="default", generator=gen)), wtacrs_fn))
        for tm1_label, label, mod, fn in variants:
            tokens = contextlib.nullcontext()
            if pad and tm1_label.endswith("+tokens"):
                tokens = token_mask(case[3].abs().sum(dim=(2, 3)) > 0)
            with tokens:
                saved, err, bias = evaluate(label, fn, mod, case, scaling, dropout, args.seeds, exact)
            print(f"{tm1_label:>12} {label:>26} {saved / 2**20:>10.2f} {saved / eager_bytes:>9.3f} "
                  f"{err[0]:>10.2e} {err[1]:>10.2e} {err[2]:>10.2e} {bias[0]:>10.1e}")


if __name__ == "__main__":
    main()
