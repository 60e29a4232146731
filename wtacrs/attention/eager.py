"""The family's eager attention: its conventions, its score formula (written once, for the
sampled and the exact path) and the fallback implementations."""

from __future__ import annotations

import sys
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from wtacrs.attention.masks import additive_mask


def eager_function(module: nn.Module):
    """The ``eager_attention_forward`` next to ``module``'s class in its modeling file."""
    fn = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
    if fn is None:
        from wtacrs.taxonomy import FAMILIES

        raise NotImplementedError(
            f"no eager_attention_forward next to {type(module).__qualname__} ({type(module).__module__}); "
            f"the 'wtacrs' attention supports the {', '.join(FAMILIES)} families"
        )
    return fn


def eager_conventions(module: nn.Module) -> tuple[str, bool]:
    """(softmax policy, contiguous output) of the eager attention of ``module``'s family (see
    :class:`wtacrs.taxonomy.Family`); T5/BERT's ``("plain", True)`` for a module outside the table."""
    from wtacrs.taxonomy import family_for_model_type

    family = family_for_model_type(getattr(getattr(module, "config", None), "model_type", None))
    return ("plain", True) if family is None else (family.softmax, family.contiguous_output)


def kv_groups(module: nn.Module) -> int:
    """How many query heads share one key/value head (GQA), 1 without."""
    return int(getattr(module, "num_key_value_groups", 1) or 1)


def repeat_kv(x: Tensor, n_rep: int) -> Tensor:
    """transformers' ``repeat_kv``: ``[B, Hkv, S, d]`` -> ``[B, Hkv * n_rep, S, d]``."""
    if n_rep == 1:
        return x
    b, h, s, d = x.shape
    return x[:, :, None, :, :].expand(b, h, n_rep, s, d).reshape(b, h * n_rep, s, d)


class EagerScores(NamedTuple):
    """What :func:`eager_softmax` computes, and what a custom backward needs of it."""

    probs: Tensor  # P
    matmul_dtype: torch.dtype  # of Q K^T * scaling (autocast's dtype under autocast)
    scores_dtype: torch.dtype  # of the softmax input
    tanh: Tensor | None  # Gemma 2's softcap: tanh(scores / softcap), as eager's tanh saves it


def eager_softmax(
    query: Tensor,
    key: Tensor,
    scaling: float,
    *,
    softcap: float | None = None,
    bias: Tensor | None = None,
    mask: Tensor | None = None,
    softmax_dtype: torch.dtype | None = None,
) -> EagerScores:
    """Eager's ``P = softmax(cap(Q K^T * scaling) + bias + mask)`` in eager's ops and order.

    ``cap`` is Gemma 2's logit softcapping ``tanh(s / softcap) * softcap`` (identity for None),
    before the bias and mask as in eager; ``softmax_dtype`` is the family's (fp32 for LLaMA)."""
    scores = torch.matmul(query, key.transpose(-1, -2)) * scaling
    matmul_dtype = scores.dtype
    capped = None
    if softcap is not None:
        capped = torch.tanh(scores / softcap)
        scores = capped * softcap
    if bias is not None:
        scores = scores + bias
    if mask is not None:
        scores = scores + mask
    return EagerScores(F.softmax(scores, dim=-1, dtype=softmax_dtype), matmul_dtype, scores.dtype, capped)


def fallback_forward(module, query, key, value, attention_mask, *, fallback: str = "eager", **kwargs):
    """The implementation ``fallback`` the model would run, on the ``"wtacrs"`` mask."""
    if fallback == "sdpa":
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    mask = additive_mask(attention_mask, module, query, key, kwargs)
    if getattr(module, "reorder_and_upcast_attn", False):  # GPT-2's eager special case
        return module._upcast_and_reordered_attn(query, key, value, mask)
    return eager_function(module)(module, query, key, value, mask, **kwargs)
