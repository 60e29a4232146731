"""The ``"wtacrs"`` attention function: the family's eager attention, in named steps, with
the sampled ops where the settings ask for them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from wtacrs import estimator, lossless
from wtacrs.attention.eager import eager_conventions, eager_softmax, fallback_forward, kv_groups, repeat_kv
from wtacrs.attention.masks import additive_mask, key_visibility
from wtacrs.attention.ops import PVMeta, ReusedPV, SampledScoresSoftmax
from wtacrs.attention.probabilities import (
    DEFENSIVE_SHARE,
    Sample,
    TensorMul1Sampler,
    empty_sample,
    query_grad_norms,
    value_column_scores,
)
from wtacrs.attention.settings import AttentionSettings, sampling_generator
from wtacrs.estimator import budget, sample_rows


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
        or not (settings.config.tm1 or settings.config.tm2)
        or not module.training
        or not torch.is_grad_enabled()
        or not (query.requires_grad or key.requires_grad or value.requires_grad)
        or (torch.compiler.is_compiling() and not settings.config.samples_attention)
    ):
        # Under torch.compile the exact attention that reuses P gives NaN losses (inductor, CPU,
        # torch 2.13; tests/test_workflows.py): a compiled model runs the model's own exact
        # attention instead, which stores dropout(P) as eager does.
        return fallback_forward(module, query, key, value, attention_mask, fallback=fallback, scaling=scaling, dropout=dropout, **kwargs)
    call = _Call.of(module, settings, query, key, value, attention_mask, scaling, kwargs)
    probs = _scores_softmax(call)
    cast = _probs_cast(call.policy, query, value, probs)
    dropped, drop_mask, drop_saved = _dropout(settings.config.lossless, probs if cast is None else probs.to(cast), dropout, module.training)
    reusable = dropout == 0.0 or not module.training or drop_mask is not None
    out = _tensormul2(call, probs, dropped, PVMeta(cast, drop_mask, call.n_rep) if reusable else None, drop_saved)
    out = out.transpose(1, 2)
    if call.contiguous_output:
        out = out.contiguous()
    return out, dropped


@dataclass
class _Call:
    """One sampled attention call: its inputs as eager sees them (K and V ``repeat_kv``-ed) and
    what the steps share."""

    module: nn.Module
    settings: AttentionSettings
    attention_mask: Tensor | None
    kwargs: dict
    query: Tensor
    key_states: Tensor
    value: Tensor  # before repeat_kv
    value_states: Tensor
    n_rep: int
    scaling: float
    softcap: float | None  # Gemma 2's logit softcapping (eager: before the mask)
    position_bias: Tensor | None
    generator: torch.Generator | None
    policy: str
    contiguous_output: bool
    mask: Tensor | None  # eager's additive mask
    query_norm: Tensor | None  # P-aware only

    @classmethod
    def of(cls, module, settings, query, key, value, attention_mask, scaling, kwargs) -> _Call:
        n_rep = kv_groups(module)
        key_states = repeat_kv(key, n_rep)
        policy, contiguous_output = eager_conventions(module)
        return cls(
            module, settings, attention_mask, kwargs, query, key_states, value, repeat_kv(value, n_rep), n_rep,
            query.size(-1) ** -0.5 if scaling is None else scaling,
            kwargs.get("softcap"),
            kwargs.get("position_bias"),
            sampling_generator(settings, query.device),
            policy,
            contiguous_output,
            additive_mask(attention_mask, module, query, key_states, kwargs),
            query_grad_norms(settings.query_stream, query) if settings.p_aware else None,
        )


def _autocast_dtype(t: Tensor) -> torch.dtype | None:
    """The dtype autocast gives ``matmul`` on ``t``'s device, or None when autocast is off."""
    device = t.device.type
    if device not in ("cpu", "cuda", "xpu") or not torch.is_autocast_enabled(device):
        return None
    return torch.get_autocast_dtype(device)


def _scores_softmax(call: _Call) -> Tensor:
    """TensorMul-1 and the softmax, in the family's dtype handling: exact ``P``."""
    softmax_dtype = torch.float32 if call.policy == "fp32" else None
    if not call.settings.config.tm1:
        scores = eager_softmax(
            call.query, call.key_states, call.scaling,
            softcap=call.softcap, bias=call.position_bias, mask=call.mask, softmax_dtype=softmax_dtype,
        )
        return scores.probs
    q_in, k_in = call.query, call.key_states
    mm_cast = _autocast_dtype(call.query)
    if mm_cast is not None:  # what autocast does to matmul's inputs; the stored rows are cast rows
        q_in, k_in = call.query.to(mm_cast), call.key_states.to(mm_cast)
    p_aware = call.settings.p_aware
    sampler = TensorMul1Sampler(
        call.settings,
        call.generator,
        need_query_rows=k_in.requires_grad,
        need_key_rows=q_in.requires_grad,
        value_states=call.value_states.detach() if p_aware else None,
        query_weights=call.query_norm,
        key_visibility=None if p_aware else key_visibility(call.attention_mask, call.module, call.query, call.key_states, call.kwargs),
        center_keys=call.softcap is None,
    )
    return SampledScoresSoftmax.apply(q_in, k_in, call.position_bias, call.mask, call.scaling, softmax_dtype, sampler, call.softcap)


def _probs_cast(policy: str, query: Tensor, value: Tensor, probs: Tensor) -> torch.dtype | None:
    """The dtype eager casts ``P`` to before the dropout (None: no cast)."""
    if policy == "fp32":
        cast = query.dtype
    else:
        cast = value.dtype if policy == "to_value" else None
    return None if cast == probs.dtype else cast


def _dropout(packed: bool, probs: Tensor, p: float, training: bool) -> tuple[Tensor, lossless.DropoutMask | None, Tensor | None]:
    """``(dropout(P), mask, the mask's saved tensor)``; with ``packed`` a 1-bit mask that
    TensorMul-2 reuses, else ``F.dropout`` (no mask to reuse)."""
    if packed:
        return lossless.dropout_with_mask(probs, p, training)
    return F.dropout(probs, p=p, training=training), None, None


def _tensormul2(call: _Call, probs: Tensor, dropped: Tensor, meta: PVMeta | None, drop_saved: Tensor | None) -> Tensor:
    """``dropout(P) V``. ``meta`` None: ``dropout(P)`` cannot be rebuilt from ``P`` (a
    non-lossless dropout), so TensorMul-2 stores it."""
    if not call.settings.config.tm2:
        return torch.matmul(dropped, call.value_states)
    if meta is not None and not call.value_states.requires_grad and not dropped.requires_grad:
        return torch.matmul(dropped, call.value_states)
    v_sample = _tm2_value(call, dropped.requires_grad, probs)
    if meta is None:
        return ReusedPV.apply(dropped, call.value_states, dropped.detach(), None, *v_sample, PVMeta(None, None, call.n_rep))
    return ReusedPV.apply(dropped, call.value_states, probs.detach(), drop_saved, *v_sample, meta)


def _tm2_value(call: _Call, need_grad_p: bool, probs: Tensor) -> Sample:
    """What TensorMul-2 keeps of V for ``dP = dO V^T``: ``(V, None, None)`` (V before
    ``repeat_kv``) or k sampled head-dim columns as rows ``[..., k, kv]``, their fp32 weights and
    indices. Column probabilities: :func:`value_column_scores` of ``P`` (P-aware) or the column
    norms."""
    if not need_grad_p:
        return None, None, None
    cfg, value_states = call.settings.config, call.value_states
    d = value_states.shape[-1]
    k = budget(d, cfg.ratio, cfg.min_k)
    if cfg.tm2_v == "store" or k >= d:
        return call.value.detach(), None, None
    columns = value_states.detach().transpose(-1, -2)  # [B, H, d, kv]
    if estimator.shapes_only(columns):
        return empty_sample(columns, columns.shape[:-2], k, k, d)
    with torch.no_grad():
        if not call.settings.p_aware:
            return sample_rows(columns, k, generator=call.generator)
        weights = None if call.query_norm is None else call.query_norm.expand(*probs.shape[:-1])
        score = value_column_scores(probs.detach(), value_states.detach(), weights)
        return sample_rows(columns, k, grad_norm=score, generator=call.generator, support_share=DEFENSIVE_SHARE)
