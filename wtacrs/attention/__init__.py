"""The ``"wtacrs"`` attention function for Hugging Face ``transformers``.

:func:`register` adds it to ``transformers.AttentionInterface`` (and a matching mask builder to
``AttentionMaskInterface``) under the name ``"wtacrs"``; no modeling file is forked. A model uses
it once every config its attention modules read says ``_attn_implementation == "wtacrs"``
(``model.set_attn_implementation("wtacrs")`` does that for every sub-config; assigning
``model.config._attn_implementation`` alone does not reach T5's encoder/decoder copies) and each
attention module carries ``module.wtacrs_attention = AttentionSettings(config, ...)``, whose
settings all come from the conversion's :class:`~wtacrs.WTACRSConfig`. :func:`enable` and
:func:`disable` do both.

What it computes
----------------
With grad enabled, ``module.training`` and ``tm1 or tm2`` (fields of the config, like
``ratio``, ``min_k``, ``tm2_v``, ``lossless`` and ``probability`` below), the forward is the family's eager
attention, bit for bit under the same dropout seed; only what is saved for backward changes:

* **TensorMul-1 and Softmax** run as one op, :class:`SampledScoresSoftmax`: its forward is
  eager's ``softmax(Q K^T * scaling + bias + mask)`` (the family's dtype handling: LLaMA's fp32
  softmax, GPT-2's cast), and it stores ``P`` (as eager's softmax does) plus, per (batch, head),
  ``k = budget(S, ratio, min_k)`` rows of Q (for ``dK``) and of K (for ``dQ``). The rows are drawn
  *after* the softmax, so their probabilities follow the score gradient ``dS = J(P) dP``
  (``probability="auto"``, the default; :func:`score_gradient_proxies`; the queries' token mask
  gives pad queries the small proxy :data:`~wtacrs.gradnorm.GRAD_NORM_FLOOR`, never 0, since a
  pooler may read them): a key no query attends to has ``dS[:, j] = 0`` exactly and is never
  drawn, a key drawing all the attention mass gets most of the budget. Two exact identities lower the variance further at no cost: rows of ``dS``
  sum to 0, so ``dQ = dS (K - 1 kbar^T)`` for any mean key ``kbar`` (K is stored centered); and
  ``dK = dS^T (Q - 1 qbar^T) + colsum(dS)^T qbar`` (Q is stored centered, ``k - 1`` sampled rows
  plus ``qbar`` in the k-th row: the same bytes). Backward computes ``dS`` exactly from ``P``
  (so T5's relative position bias gets its exact gradient) and ``dQ``, ``dK`` from the rows.
  ``probability="activation"`` is the first version: activation norms times the mask's key
  visibility (:func:`key_visibility`), no centering.
* **Logit softcapping** (Gemma 2's ``softcap``) runs inside the same op, in eager's ops
  (:func:`~wtacrs.attention.eager.eager_softmax`); it keeps the ``tanh`` output, as eager does, for the exact ``dS``. The
  capped score gradient ``(1 - t^2) dS`` has rows that do not sum to 0, so K is stored
  uncentered there.
* **Dropout** on ``P`` is :func:`wtacrs.lossless.dropout` (same bits as ``F.dropout``), 1-bit mask.
* **TensorMul-2** ``dropout(P) V`` (:class:`ReusedPV`) stores **no** copy of ``dropout(P)``: it saves
  the softmax's own output ``P`` (the same storage, so byte accounting counts it once) and the
  dropout's packed mask (the same storage as the dropout node's), and rebuilds ``dropout(P)``
  bitwise in backward for ``dV = dropout(P)^T dO`` (exact). For ``dP = dO V^T`` it stores V
  (``tm2_v="store"``, the :class:`~wtacrs.WTACRSConfig` default: exact) or ``k`` sampled head-dim
  columns of V (``tm2_v="sample"``: unbiased; with ``probability="auto"`` drawn by how much
  each column moves ``dS``, :func:`value_column_scores`). For GQA models V is stored before
  ``repeat_kv``.

Sampled rows (of Q, K and V's columns) are stored as they are, with their fp32 weights beside
them; backward applies the weights in fp32 (:func:`wtacrs.estimator.weighted_product`), so
half-precision rows cannot overflow.

``tm2_v="store"`` keeps ``dP``, the softmax gradient, T5's relative position bias gradient and
``dV`` exact, at the cost of storing V (``d_head / S`` of P's bytes). ``tm2_v="sample"`` adds the
error of the sampled columns to every gradient downstream of ``dP``. ``python
benchmarks/attention_tm2.py`` measures the gradient error and the saved bytes of each combination
(latest figures in ``benchmarks/RESULTS.md``).

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

from wtacrs.attention.accounting import saved_bytes_per_call
from wtacrs.attention.eager import eager_softmax, fallback_forward, repeat_kv
from wtacrs.attention.forward import wtacrs_attention_forward
from wtacrs.attention.interface import current_implementation, disable, enable, register
from wtacrs.attention.masks import additive_mask, bool_mask, key_visibility, wtacrs_mask
from wtacrs.attention.ops import ReusedPV, SampledScoresSoftmax
from wtacrs.attention.probabilities import query_sample_shapes, score_gradient_proxies, value_column_scores
from wtacrs.attention.settings import FALLBACKS, NAME, AttentionSettings

__all__ = [
    "FALLBACKS",
    "NAME",
    "AttentionSettings",
    "ReusedPV",
    "SampledScoresSoftmax",
    "additive_mask",
    "bool_mask",
    "current_implementation",
    "disable",
    "eager_softmax",
    "enable",
    "fallback_forward",
    "key_visibility",
    "query_sample_shapes",
    "register",
    "repeat_kv",
    "saved_bytes_per_call",
    "score_gradient_proxies",
    "value_column_scores",
    "wtacrs_attention_forward",
    "wtacrs_mask",
]

try:
    register()
except ImportError:  # pragma: no cover - transformers too old to have the interfaces
    pass
