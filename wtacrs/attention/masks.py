"""The ``"wtacrs"`` mask builder and the masks the eager formula and the row probabilities read."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn


def wtacrs_mask(*args: Any, **kwargs: Any):
    """The mask builder registered as ``"wtacrs"``: exactly transformers' ``sdpa_mask``."""
    from transformers.masking_utils import sdpa_mask

    kwargs.pop("config", None)
    return sdpa_mask(*args, **kwargs)


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
