"""Bytes one sampled attention call saves, counted by hand from the shapes."""

from __future__ import annotations

from wtacrs import lossless
from wtacrs.attention.probabilities import query_sample_shapes
from wtacrs.config import WTACRSConfig
from wtacrs.estimator import budget


def saved_bytes_per_call(
    batch: int,
    heads: int,
    q_len: int,
    kv_len: int,
    head_dim: int,
    *,
    config: WTACRSConfig,
    dropout: float,
    itemsize: int = 4,
    kv_heads: int | None = None,
    probs_itemsize: int | None = None,
    softcap: bool = False,
) -> dict[str, int]:
    """Bytes one sampled attention call under ``config`` saves, by part (a hand count the tests
    check). A sampled operand keeps its rows, 4 bytes of fp32 weight and 4 of int32 index per
    sampled row.

    Assumes Q, K and V require grad and no mask-induced zero rows. ``softcap``: the call caps
    its logits (Gemma 2), which keeps the ``tanh`` output as eager does.
    """
    kv_heads = heads if kv_heads is None else kv_heads
    probs_itemsize = itemsize if probs_itemsize is None else probs_itemsize
    bh = batch * heads
    parts = _tensormul1_bytes(config, bh, q_len, kv_len, head_dim, itemsize)
    parts["softmax"] = bh * q_len * kv_len * probs_itemsize
    if softcap:
        parts["softcap"] = bh * q_len * kv_len * itemsize
    if dropout > 0 and config.lossless:
        parts["dropout"] = lossless.packed_numel(bh * q_len * kv_len)
    if config.tm2:
        kd = budget(head_dim, config.ratio, config.min_k)
        if config.tm2_v == "store" or kd >= head_dim:
            parts["tm2_value"] = batch * kv_heads * kv_len * head_dim * itemsize
        else:
            parts["tm2_value"] = bh * kd * kv_len * itemsize + bh * kd * 8
    else:
        parts["tm2_value"] = batch * heads * kv_len * head_dim * itemsize
        parts["tm2_probs"] = bh * q_len * kv_len * itemsize if dropout > 0 else 0
    return parts


def _tensormul1_bytes(config: WTACRSConfig, bh: int, q_len: int, kv_len: int, head_dim: int, itemsize: int) -> dict[str, int]:
    """``tm1_query`` and ``tm1_key``: the rows of Q and K (with weights and indices) kept."""
    if not config.tm1:
        return {"tm1_query": bh * q_len * head_dim * itemsize, "tm1_key": bh * kv_len * head_dim * itemsize}
    kq, kk = budget(q_len, config.ratio, config.min_k), budget(kv_len, config.ratio, config.min_k)
    if kq >= q_len:
        rows, idx = q_len, 0
    else:
        rows, idx = query_sample_shapes(q_len, kq) if config.probability == "auto" else (kq, kq)
    return {
        "tm1_query": bh * rows * head_dim * itemsize + bh * idx * 8,
        "tm1_key": bh * kk * head_dim * itemsize + (bh * kk * 8 if kk < kv_len else 0),
    }
