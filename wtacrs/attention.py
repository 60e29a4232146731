"""The ``"wtacrs"`` attention function for Hugging Face ``transformers``.

:func:`register` adds it to ``transformers.AttentionInterface`` (and a matching mask builder to
``AttentionMaskInterface``) under the name ``"wtacrs"``; no modeling file is forked. A model uses
it once every config its attention modules read says ``_attn_implementation == "wtacrs"``
(``model.set_attn_implementation("wtacrs")`` does that for every sub-config; assigning
``model.config._attn_implementation`` alone does not reach T5's encoder/decoder copies) and each
attention module carries ``module.wtacrs_attention = AttentionSettings(...)``. :func:`enable` and
:func:`disable` do both.

What it computes
----------------
With grad enabled, ``module.training`` and ``tm1 or tm2``, the forward is the family's eager
attention, bit for bit under the same dropout seed; only what is saved for backward changes:

* **TensorMul-1** ``Q K^T`` goes through :func:`wtacrs.functional.SampledMatmul`: per (batch, head)
  it stores ``k`` sampled query rows (for ``dK``) and ``k`` sampled key rows (for ``dQ``),
  ``k = budget(S, ratio, min_k)``. A key that no query may attend to (padding) has an exactly
  zero score gradient, so its sampling probability is 0 (and a key seen by ``c`` queries gets
  ``sqrt(c)``); see :func:`key_visibility`.
* **Softmax** is exact and stores ``P``, as eager does, in the family's dtype handling (LLaMA:
  fp32 softmax then a cast; GPT-2: a cast to V's dtype).
* **Dropout** on ``P`` is :func:`wtacrs.lossless.dropout` (same bits as ``F.dropout``), 1-bit mask.
* **TensorMul-2** ``dropout(P) V`` (:class:`ReusedPV`) stores **no** copy of ``dropout(P)``: it saves
  the softmax's own output ``P`` (the same storage, so byte accounting counts it once) and the
  dropout's packed mask (the same storage as the dropout node's), and rebuilds ``dropout(P)``
  bitwise in backward for ``dV = dropout(P)^T dO`` (exact). For ``dP = dO V^T`` it stores V
  (``tm2_v="store"``, the default: exact) or ``k`` sampled head-dim columns of V
  (``tm2_v="sample"``: unbiased). For GQA models V is stored before ``repeat_kv``.

``python benchmarks/attention_tm2.py`` measures the two TensorMul-2 options on one attention
call of BERT-Base shape (B=4, 12 heads, S=128, head dim 64, dropout 0.1), ratio 0.3, 50 seeds
(relative MSE of the gradients; eager saves 13.5 MiB):

=====================  ======================  =========  =========  =========
TensorMul-1            TensorMul-2             saved MiB  relMSE dQ  relMSE dK
=====================  ======================  =========  =========  =========
exact                  P reuse, V stored       7.59       0          0
exact                  P reuse, V sampled      6.57       2.9        3.3
sampled                P reuse, V stored       5.52       0.94       1.7
sampled                P reuse, V sampled      4.49       6.9        10.3
=====================  ======================  =========  =========  =========

**Storing V wins** (``tm2_v="store"``, the default): it keeps ``dP``, the softmax gradient, T5's
relative position bias gradient and ``dV`` exact. Sampling V's head-dim columns saves about
1 MiB in 5.5 (V is ``d_head / S`` of P: 1/2 at S=128, 1/8 at S=512) but raises the dQ/dK error
5-7x, and that error, unlike a sampled Linear's weight-gradient error, enters every earlier
layer's activation gradients. Mask-aware key probabilities halve the dQ error on a padded batch
(0.88 -> 0.49) and the queries' token mask (``query_stream``) halves the dK error (1.74 -> 0.99).

Otherwise -- eval mode, ``torch.no_grad()``, or ``tm1`` and ``tm2`` both False -- it calls the
implementation the model had before (``fallback``: the family's own ``eager_attention_forward``,
or transformers' ``sdpa``), so the output is bitwise the unconverted model's.

Masks
-----
transformers builds one mask per forward from the name in the config; for ``"wtacrs"`` the
registered builder is :func:`wtacrs_mask`, which returns exactly what the ``sdpa`` builder
returns (a bool mask, or ``None`` where SDPA would use ``is_causal``). The ``sdpa`` fallback gets
it unchanged; the eager fallback and the sampled path turn it into eager's additive float mask
with eager's own formula (``where(mask, 0, finfo.min)``), re-creating the causal mask when SDPA
would have skipped it. Additive float masks (e.g. a user's 4D mask) are used as they are.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from wtacrs import lossless
from wtacrs.estimator import budget, sample_rows
from wtacrs.functional import SampledMatmul, _gather_rows

NAME = "wtacrs"
Tm2Mode = Literal["store", "sample"]
DEFAULT_TM2_V: Tm2Mode = "store"


@dataclass
class AttentionSettings:
    """Per-attention-module settings of the ``"wtacrs"`` attention function.

    Attach as ``module.wtacrs_attention``. An attention module without it runs the family's
    eager attention (on the ``"wtacrs"`` mask), exactly as an unconverted eager model.
    """

    ratio: float = field(default=0.3, metadata={"help": "Fraction of query/key positions (and V columns when sampled) kept per (batch, head): k = max(min_k, ceil(ratio * n))."})
    min_k: int = field(default=1, metadata={"help": "Lower bound on the number of kept rows per (batch, head)."})
    tm1: bool = field(default=True, metadata={"help": "Sample TensorMul-1 (Q K^T): store k query rows and k key rows per (batch, head) instead of Q and K."})
    tm2: bool = field(default=True, metadata={"help": "TensorMul-2 (P V) reuses the softmax's P and the dropout mask instead of storing dropout(P); V per tm2_v."})
    lossless_dropout: bool = field(default=True, metadata={"help": "Attention dropout keeps a 1-bit packed mask (wtacrs.lossless.dropout), same output bits as F.dropout."})
    fallback: str = field(default="eager", metadata={"help": "The implementation the model used before conversion ('eager' or 'sdpa'); used in eval / no_grad and when tm1 and tm2 are both off."})
    generator: torch.Generator | None = field(default=None, metadata={"help": "Generator for the row sampling (not for dropout, which uses torch's default generator like eager). None: a private per-device generator, so sampling never shifts the global RNG stream."})
    tm2_v: Tm2Mode = field(default=DEFAULT_TM2_V, metadata={"help": "'store': keep V for dP = dO V^T (exact); 'sample': keep k sampled head-dim columns of V (unbiased)."})
    dropout_mode: lossless.DropoutMode | None = field(default=None, metadata={"help": "'packed' or 'regenerate' (see wtacrs.lossless); None: the library default."})
    mask_aware: bool = field(default=True, metadata={"help": "TensorMul-1 key sampling probabilities are 0 for keys no query can see, sqrt(#queries) otherwise."})
    query_stream: str | None = field(default=None, metadata={"help": "Token-mask stream of the queries (wtacrs.token_mask): pad queries, whose output gradient is 0, get sampling probability 0 for dK. None: not used. T5 cross-attention queries are 'decoder' tokens."})

    def __post_init__(self) -> None:
        if not 0.0 < self.ratio <= 1.0:
            raise ValueError(f"ratio must be in (0, 1], got {self.ratio}")
        if self.min_k < 1:
            raise ValueError(f"min_k must be >= 1, got {self.min_k}")
        if self.fallback not in ("eager", "sdpa"):
            raise ValueError(f"fallback must be 'eager' or 'sdpa', got {self.fallback!r}")
        if self.tm2_v not in ("store", "sample"):
            raise ValueError(f"tm2_v must be 'store' or 'sample', got {self.tm2_v!r}")


# ---------------------------------------------------------------------------------------------
# registration
# ---------------------------------------------------------------------------------------------


def wtacrs_mask(*args: Any, **kwargs: Any):
    """The mask builder registered as ``"wtacrs"``: exactly transformers' ``sdpa_mask``."""
    from transformers.masking_utils import sdpa_mask

    kwargs.pop("config", None)
    return sdpa_mask(*args, **kwargs)


def register() -> None:
    """Register ``"wtacrs"`` with transformers' attention and mask interfaces (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(NAME, wtacrs_attention_forward)
    AttentionMaskInterface.register(NAME, wtacrs_mask)


def enable(model: nn.Module, settings_for) -> list[nn.Module]:
    """Switch ``model`` to ``"wtacrs"`` attention.

    ``settings_for(name, module)`` returns the :class:`AttentionSettings` of an attention module
    (or None to leave it alone); it is called for every module that matches the family's
    attention pattern in :mod:`wtacrs.taxonomy`. ``fallback`` is set to the implementation in
    use before (``eager`` or ``sdpa``). Every config object the modules read is switched to
    ``"wtacrs"``. Returns the modules given settings.
    """
    from wtacrs.taxonomy import family_of

    register()
    family = family_of(model)
    before = _current_implementation(model)
    changed = []
    for name, module in model.named_modules():
        if family.is_attention(name) and hasattr(module, "config"):
            settings = settings_for(name, module)
            if settings is None:
                continue
            if settings.fallback != before and before in ("eager", "sdpa"):
                settings.fallback = before
            module.wtacrs_attention = settings
            changed.append(module)
    _set_implementation(model, NAME)
    return changed


def disable(model: nn.Module) -> None:
    """Undo :func:`enable`: back to the recorded fallback implementation, settings removed."""
    fallback = "eager"
    for module in model.modules():
        settings = module.__dict__.get("wtacrs_attention")
        if settings is not None:
            fallback = settings.fallback
            del module.wtacrs_attention
    _set_implementation(model, fallback)


def _current_implementation(model: nn.Module) -> str:
    for module in model.modules():
        cfg = getattr(module, "config", None)
        impl = getattr(cfg, "_attn_implementation", None)
        if impl is not None:
            return impl
    return "eager"


def _set_implementation(model: nn.Module, name: str) -> None:
    """Set ``_attn_implementation`` on every config object the model's modules read."""
    seen: set[int] = set()
    for module in model.modules():
        cfg = getattr(module, "config", None)
        if cfg is not None and hasattr(cfg, "_attn_implementation") and id(cfg) not in seen:
            seen.add(id(cfg))
            cfg._attn_implementation = name


# ---------------------------------------------------------------------------------------------
# helpers shared by the sampled path and the fallbacks
# ---------------------------------------------------------------------------------------------


def _family_module(module: nn.Module):
    return sys.modules.get(type(module).__module__)


def _eager_function(module: nn.Module):
    fn = getattr(_family_module(module), "eager_attention_forward", None)
    if fn is None:
        raise NotImplementedError(
            f"no eager_attention_forward next to {type(module).__qualname__} ({type(module).__module__}); "
            "the 'wtacrs' attention supports the t5, bert, gpt2 and llama families"
        )
    return fn


def _softmax_policy(module: nn.Module) -> str:
    """How the family's eager code runs the softmax: 'plain' (T5, BERT), 'fp32' (LLaMA: fp32
    softmax, then cast to the query dtype), 'to_value' (GPT-2: cast to V's dtype)."""
    name = type(module).__module__
    if name.endswith("modeling_gpt2"):
        return "to_value"
    if any(name.endswith(f"modeling_{m}") for m in ("llama", "mistral", "qwen2")):
        return "fp32"
    return "plain"


def _contiguous_output(module: nn.Module) -> bool:
    return not type(module).__module__.endswith("modeling_gpt2")


def _n_rep(module: nn.Module) -> int:
    return int(getattr(module, "num_key_value_groups", 1) or 1)


def repeat_kv(x: Tensor, n_rep: int) -> Tensor:
    """transformers' ``repeat_kv``: ``[B, Hkv, S, d]`` -> ``[B, Hkv * n_rep, S, d]``."""
    if n_rep == 1:
        return x
    b, h, s, d = x.shape
    return x[:, :, None, :, :].expand(b, h, n_rep, s, d).reshape(b, h * n_rep, s, d)


def _mask_dtype(module: nn.Module, query: Tensor) -> torch.dtype:
    """The dtype eager's mask builder would use (the embeddings' dtype): the module's parameter
    dtype, else the query's."""
    for p in module.parameters(recurse=True):
        if p.is_floating_point():
            return p.dtype
    return query.dtype


def _is_causal(module: nn.Module, kwargs: dict) -> bool:
    is_causal = kwargs.get("is_causal")
    return bool(is_causal if is_causal is not None else getattr(module, "is_causal", True))


def bool_mask(attention_mask: Tensor | None, module: nn.Module, query: Tensor, key: Tensor, kwargs: dict) -> Tensor | None:
    """The mask as bool (True = attend), re-creating the causal mask SDPA would get from
    ``is_causal`` (top-left aligned, as SDPA); None when every position is visible. Additive
    float masks give None here (they are used as they are)."""
    if attention_mask is not None:
        return attention_mask if attention_mask.dtype == torch.bool else None
    q_len, kv_len = query.shape[-2], key.shape[-2]
    if q_len > 1 and _is_causal(module, kwargs):
        return torch.ones(q_len, kv_len, dtype=torch.bool, device=query.device).tril()[None, None]
    return None


def additive_mask(attention_mask: Tensor | None, module: nn.Module, query: Tensor, key: Tensor, kwargs: dict) -> Tensor | None:
    """The mask eager attention adds to the scores: eager's ``where(mask, 0, finfo.min)``."""
    if attention_mask is not None and attention_mask.dtype != torch.bool:
        return attention_mask
    mask = bool_mask(attention_mask, module, query, key, kwargs)
    if mask is None:
        return None
    dtype = _mask_dtype(module, query)
    return torch.where(mask, torch.zeros((), device=mask.device, dtype=dtype), torch.finfo(dtype).min)


def key_visibility(attention_mask: Tensor | None, module: nn.Module, query: Tensor, key: Tensor, kwargs: dict) -> Tensor | None:
    """Gradient-norm proxies for the key positions, ``[B or 1, 1, kv]`` fp32, or None (all 1).

    ``dS[:, j]`` is exactly 0 for a key no query may attend to (its probability underflows to
    exactly 0), so it gets 0; a key seen by ``c`` queries gets ``sqrt(c)`` (the norm of ``c``
    comparable entries). A query row with every key masked has a uniform softmax in eager, so
    it counts as seeing every key; the estimate stays unbiased."""
    if attention_mask is not None and attention_mask.dtype != torch.bool:
        visible = attention_mask > torch.finfo(attention_mask.dtype).min / 2
    else:
        visible = bool_mask(attention_mask, module, query, key, kwargs)
    if visible is None:
        return None
    dead_rows = ~visible.any(dim=-1, keepdim=True)
    counts = (visible | dead_rows).sum(dim=-2, dtype=torch.float32)  # [B|1, H|1, kv]
    return counts.sqrt()


def _autocast_dtype(t: Tensor) -> torch.dtype | None:
    """The dtype autocast gives ``matmul`` on ``t``'s device, or None when autocast is off."""
    device = t.device.type
    if device not in ("cpu", "cuda", "xpu") or not torch.is_autocast_enabled(device):
        return None
    return torch.get_autocast_dtype(device)


def _query_norm(stream: str | None, query: Tensor) -> Tensor | None:
    """``[B, 1, q]`` 0/1 from the token mask of ``stream`` (0: pad query, exactly zero gradient)."""
    if stream is None:
        return None
    from wtacrs.gradnorm import current_token_mask

    b, _, q, _ = query.shape
    mask, _ = current_token_mask(stream, b * q)
    if mask is None:
        return None
    return mask.to(device=query.device, dtype=torch.float32).reshape(b, 1, q)


_PRIVATE_GENERATORS: dict[tuple[str, int | None], torch.Generator] = {}


def _generator(settings: AttentionSettings, device: torch.device) -> torch.Generator | None:
    if settings.generator is not None:
        return settings.generator
    if device.type not in ("cpu", "cuda"):
        return None
    key = (device.type, device.index)
    gen = _PRIVATE_GENERATORS.get(key)
    if gen is None:
        gen = torch.Generator(device=device)
        gen.manual_seed(torch.initial_seed() + 0x5EED)
        _PRIVATE_GENERATORS[key] = gen
    return gen


# ---------------------------------------------------------------------------------------------
# TensorMul-1 and TensorMul-2
# ---------------------------------------------------------------------------------------------


def _sample(x: Tensor, ratio: float, min_k: int, grad_norm: Tensor | None, generator) -> tuple[Tensor, Tensor | None]:
    """``(rows, indices)`` of ``x`` ``[..., n, d]``: k sampled rows per leading index, or ``(x, None)``."""
    n = x.shape[-2]
    k = budget(n, ratio, min_k)
    if k >= n:
        return x, None
    if grad_norm is not None:
        grad_norm = grad_norm.expand(*x.shape[:-1])
    return sample_rows(x, k, grad_norm=grad_norm, generator=generator)


def sampled_scores(
    query: Tensor,
    key: Tensor,
    settings: AttentionSettings,
    key_norm: Tensor | None,
    generator,
    query_norm: Tensor | None = None,
) -> Tensor:
    """``query @ key^T`` (exact forward) storing sampled query and key rows for backward.

    The same op and saved layout as :func:`wtacrs.functional.matmul` (``SampledMatmul``), with
    the key rows drawn with ``key_norm`` and the query rows with ``query_norm`` gradient proxies
    (broadcastable to ``[B, H, S]``; None means 1)."""
    cast = _autocast_dtype(query)
    if cast is not None:  # what autocast does to matmul's inputs; SampledMatmul then saves cast rows
        query, key = query.to(cast), key.to(cast)
    key_t = key.transpose(-1, -2)
    q_rows = q_idx = k_rows = k_idx = None
    with torch.no_grad():
        if key.requires_grad:  # grad of K^T = Q^T dS: rows of Q over query positions
            q_rows, q_idx = _sample(query.detach(), settings.ratio, settings.min_k, query_norm, generator)
        if query.requires_grad:  # grad of Q = dS K: rows of K over key positions
            k_rows, k_idx = _sample(key.detach(), settings.ratio, settings.min_k, key_norm, generator)
            if k_idx is None:  # SampledMatmul keeps b = K^T itself when not sampled
                k_rows = key_t.detach()
    return SampledMatmul.apply(query, key_t, q_rows, q_idx, k_rows, k_idx)


class ReusedPV(torch.autograd.Function):
    """``dropout(P) @ V`` that saves the softmax's ``P`` and the dropout's mask, not ``dropout(P)``.

    Inputs: ``pd`` (the dropped probabilities the forward multiplies, as eager does), ``v``
    (``repeat_kv``-ed V), then ``p_src`` (the softmax output, detached: the same storage the
    softmax saved), ``mask_saved`` (the dropout node's saved tensor or None), ``v_store`` and
    ``v_idx`` (V before ``repeat_kv`` and None, or sampled head-dim columns of V as rows
    ``[..., k, kv]`` and their indices ``[..., k]``). ``meta`` carries the cast dtype, the
    :class:`~wtacrs.lossless.DropoutMask` and the ``repeat_kv`` factor.
    """

    @staticmethod
    def forward(ctx, pd, v, p_src, mask_saved, v_store, v_idx, meta):
        ctx.meta = meta
        ctx.dtypes = (pd.dtype, v.dtype)
        ctx.save_for_backward(p_src, mask_saved, v_store, v_idx)
        return torch.matmul(pd, v)  # under autocast this runs in the autocast dtype, as eager's

    @staticmethod
    def backward(ctx, grad):
        p_src, mask_saved, v_store, v_idx = ctx.saved_tensors
        meta = ctx.meta
        pd_dtype, v_dtype = ctx.dtypes
        compute = grad.dtype  # the forward's matmul dtype (differs from the inputs' under autocast)
        grad_pd = grad_v = None
        if ctx.needs_input_grad[1]:
            pd = p_src if meta.cast is None else p_src.to(meta.cast)
            if meta.mask is not None:
                pd = meta.mask.apply(pd, mask_saved)
            grad_v = torch.matmul(pd.to(compute).transpose(-1, -2), grad).to(v_dtype)
        if ctx.needs_input_grad[0]:
            if v_idx is None:
                v_full = repeat_kv(v_store, meta.n_rep).to(compute)
                grad_pd = torch.matmul(grad, v_full.transpose(-1, -2))
            else:  # dP = dO V^T over k sampled head-dim columns (weights folded into v_store)
                grad_cols = _gather_rows(grad.transpose(-1, -2), v_idx)  # [..., k, q]
                grad_pd = torch.matmul(grad_cols.transpose(-1, -2), v_store.to(compute))
            grad_pd = grad_pd.to(pd_dtype)
        return grad_pd, grad_v, None, None, None, None, None


@dataclass
class _PVMeta:
    cast: torch.dtype | None
    mask: lossless.DropoutMask | None
    n_rep: int


# ---------------------------------------------------------------------------------------------
# the attention function
# ---------------------------------------------------------------------------------------------


def fallback_forward(module, query, key, value, attention_mask, *, fallback: str = "eager", **kwargs):
    """The implementation ``fallback`` the model would run, on the ``"wtacrs"`` mask."""
    if fallback == "sdpa":
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    mask = additive_mask(attention_mask, module, query, key, kwargs)
    if getattr(module, "reorder_and_upcast_attn", False):  # GPT-2's eager special case
        return module._upcast_and_reordered_attn(query, key, value, mask)
    return _eager_function(module)(module, query, key, value, mask, **kwargs)


def wtacrs_attention_forward(
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[Tensor, Tensor | None]:
    """The ``"wtacrs"`` attention function (signature of transformers' attention interface)."""
    settings: AttentionSettings | None = getattr(module, "wtacrs_attention", None)
    fallback = settings.fallback if settings is not None else "eager"
    if (
        settings is None
        or not (settings.tm1 or settings.tm2)
        or not module.training
        or not torch.is_grad_enabled()
        or not (query.requires_grad or key.requires_grad or value.requires_grad)
    ):
        return fallback_forward(module, query, key, value, attention_mask, fallback=fallback, scaling=scaling, dropout=dropout, **kwargs)
    return _sampled_forward(module, settings, query, key, value, attention_mask, scaling, dropout, kwargs)


def _sampled_forward(module, settings, query, key, value, attention_mask, scaling, dropout, kwargs):
    if scaling is None:
        scaling = query.size(-1) ** -0.5
    position_bias = kwargs.get("position_bias")
    n_rep = _n_rep(module)
    key_states = repeat_kv(key, n_rep)
    value_states = repeat_kv(value, n_rep)
    generator = _generator(settings, query.device)

    # TensorMul-1: exact scores, sampled rows stored
    if settings.tm1:
        key_norm = key_visibility(attention_mask, module, query, key_states, kwargs) if settings.mask_aware else None
        query_norm = _query_norm(settings.query_stream, query)
        scores = sampled_scores(query, key_states, settings, key_norm, generator, query_norm)
    else:
        scores = torch.matmul(query, key_states.transpose(-1, -2))
    scores = scores * scaling
    if position_bias is not None:
        scores = scores + position_bias
    mask = additive_mask(attention_mask, module, query, key_states, kwargs)
    if mask is not None:
        scores = scores + mask

    # Softmax, in the family's dtype handling
    policy = _softmax_policy(module)
    if policy == "fp32":
        probs = F.softmax(scores, dim=-1, dtype=torch.float32)
        cast = query.dtype
    else:
        probs = F.softmax(scores, dim=-1)
        cast = value.dtype if policy == "to_value" else None
    if cast == probs.dtype:
        cast = None
    probs_cast = probs if cast is None else probs.to(cast)

    # Dropout: 1-bit mask
    if settings.lossless_dropout:
        dropped, drop_mask, drop_saved = lossless.dropout_with_mask(
            probs_cast, dropout, module.training, mode=settings.dropout_mode
        )
    else:
        dropped = F.dropout(probs_cast, p=dropout, training=module.training)
        drop_mask = drop_saved = None

    # TensorMul-2
    reusable = dropout == 0.0 or not module.training or drop_mask is not None
    if settings.tm2 and reusable:
        if not value_states.requires_grad and not dropped.requires_grad:
            out = torch.matmul(dropped, value_states)
        else:
            v_store, v_idx = _tm2_value(settings, value, value_states, n_rep, generator, dropped.requires_grad)
            meta = _PVMeta(cast, drop_mask, n_rep)
            out = ReusedPV.apply(dropped, value_states, probs.detach(), drop_saved, v_store, v_idx, meta)
    elif settings.tm2:  # non-lossless dropout: dropout(P) cannot be rebuilt from P, store it
        v_store, v_idx = _tm2_value(settings, value, value_states, n_rep, generator, dropped.requires_grad)
        meta = _PVMeta(None, None, n_rep)
        out = ReusedPV.apply(dropped, value_states, dropped.detach(), None, v_store, v_idx, meta)
    else:
        out = torch.matmul(dropped, value_states)

    out = out.transpose(1, 2)
    if _contiguous_output(module):
        out = out.contiguous()
    return out, dropped


def _tm2_value(settings, value, value_states, n_rep, generator, need_grad_p):
    """What TensorMul-2 keeps of V for ``dP = dO V^T``: V itself (before ``repeat_kv``) or k
    sampled head-dim columns (as rows ``[..., k, kv]``, weights folded in) with their indices."""
    if not need_grad_p:
        return None, None
    if settings.tm2_v == "store":
        return value.detach(), None
    with torch.no_grad():
        cols, idx = _sample(value_states.detach().transpose(-1, -2), settings.ratio, settings.min_k, None, generator)
    if idx is None:
        return value.detach(), None
    return cols, idx


def saved_bytes_per_call(
    batch: int,
    heads: int,
    q_len: int,
    kv_len: int,
    head_dim: int,
    *,
    settings: AttentionSettings,
    dropout: float,
    itemsize: int = 4,
    kv_heads: int | None = None,
    probs_itemsize: int | None = None,
) -> dict[str, int]:
    """Bytes one sampled attention call saves, by part (a hand count the tests check).

    Assumes Q, K and V require grad and no mask-induced zero rows.
    """
    kv_heads = heads if kv_heads is None else kv_heads
    probs_itemsize = itemsize if probs_itemsize is None else probs_itemsize
    parts: dict[str, int] = {}
    bh = batch * heads
    if settings.tm1:
        kq, kk = budget(q_len, settings.ratio, settings.min_k), budget(kv_len, settings.ratio, settings.min_k)
        parts["tm1_query"] = bh * kq * head_dim * itemsize + (bh * kq * 4 if kq < q_len else 0)
        parts["tm1_key"] = bh * kk * head_dim * itemsize + (bh * kk * 4 if kk < kv_len else 0)
    else:
        parts["tm1_query"] = bh * q_len * head_dim * itemsize
        parts["tm1_key"] = bh * kv_len * head_dim * itemsize
    parts["softmax"] = bh * q_len * kv_len * probs_itemsize
    if dropout > 0 and settings.lossless_dropout:
        parts["dropout"] = lossless.packed_numel(bh * q_len * kv_len)
    if settings.tm2:
        if settings.tm2_v == "store":
            parts["tm2_value"] = batch * kv_heads * kv_len * head_dim * itemsize
        else:
            kd = budget(head_dim, settings.ratio, settings.min_k)
            parts["tm2_value"] = bh * kd * kv_len * itemsize + (bh * kd * 4 if kd < head_dim else 0)
    else:
        parts["tm2_value"] = batch * heads * kv_len * head_dim * itemsize
        parts["tm2_probs"] = bh * q_len * kv_len * itemsize if dropout > 0 else 0
    return parts


__all__ = [
    "AttentionSettings",
    "ReusedPV",
    "additive_mask",
    "disable",
    "enable",
    "fallback_forward",
    "key_visibility",
    "register",
    "sampled_scores",
    "saved_bytes_per_call",
    "wtacrs_attention_forward",
    "wtacrs_mask",
]

try:
    register()
except ImportError:  # pragma: no cover - transformers too old to have the interfaces
    pass
