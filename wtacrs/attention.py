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
  (:func:`soft_cap`); it keeps the ``tanh`` output, as eager does, for the exact ``dS``. The
  capped score gradient ``(1 - t^2) dS`` has rows that do not sum to 0, so K is stored
  uncentered there.
* **Dropout** on ``P`` is :func:`wtacrs.lossless.dropout` (same bits as ``F.dropout``), 1-bit mask.
* **TensorMul-2** ``dropout(P) V`` (:class:`ReusedPV`) stores **no** copy of ``dropout(P)``: it saves
  the softmax's own output ``P`` (the same storage, so byte accounting counts it once) and the
  dropout's packed mask (the same storage as the dropout node's), and rebuilds ``dropout(P)``
  bitwise in backward for ``dV = dropout(P)^T dO`` (exact). For ``dP = dO V^T`` it stores V
  (``tm2_v="store"``: exact) or ``k`` sampled head-dim columns of V (``tm2_v="sample"``, the
  :class:`~wtacrs.WTACRSConfig` default: unbiased; with ``probability="auto"`` drawn by how much
  each column moves ``dS``, :func:`value_column_scores`). For GQA models V is stored before
  ``repeat_kv``.

Sampled rows (of Q, K and V's columns) are stored as they are, with their fp32 weights beside
them; backward applies the weights in fp32 (:func:`wtacrs.estimator.weighted_product`), so
half-precision rows cannot overflow.

``python benchmarks/attention_tm2.py`` measures the options on one attention call of BERT-Base
shape (B=4, 12 heads, S=128, head dim 64, dropout 0.1) and on the real activations of the tiny
T5 of ``benchmarks/convergence.py`` (S=16, head dim 16), ratio 0.3, 20 seeds (relative MSE of
the gradients; eager saves 13.5 MiB per BERT call; "act" = ``probability="activation"``; saved
MiB from :func:`saved_bytes_per_call`, rows plus their fp32 weights and int32 indices):

================  =================  =========  ============  ============  ============  ============
TensorMul-1       TensorMul-2        saved MiB  BERT dQ       BERT dK       tiny T5 dQ    tiny T5 dK
================  =================  =========  ============  ============  ============  ============
exact             V stored           7.59       0             0             0             0
exact             V sampled, act     6.57       2.86          3.32          2.07          2.12
exact             V sampled, P-aware 6.57       2.76          3.33          1.95          2.03
sampled, act      V stored           5.54       0.95          1.68          4.80          3.31
sampled, P-aware  V stored           5.54       0.46          1.29          1.32          1.92
sampled, act      V sampled, act     4.51       6.94          10.4          16.3          11.8
sampled, P-aware  V sampled, P-aware 4.51       4.67          8.36          6.25          8.12
================  =================  =========  ============  ============  ============  ============

P-aware probabilities with centering cut the TensorMul-1 error 2-3.6x on the trained model
(causal and cross attention are peaked; activation norms cannot see that). Sampled V columns
multiply the error by ``1 + relMSE(V)`` (about 3x): head-dim columns have no winners, and better
column probabilities gain only ~5%. ``tm2_v="store"`` keeps ``dP``, the softmax gradient, T5's
relative position bias gradient and ``dV`` exact, at the cost of storing V (``d_head / S`` of P:
1/2 at S=128, 1/8 at S=512).

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
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from wtacrs import estimator, lossless
from wtacrs.estimator import (
    budget,
    index_dtype,
    row_norms,
    row_probabilities,
    wtacrs_sample,
)
from wtacrs.config import WTACRSConfig
from wtacrs.estimator import weighted_product
from wtacrs.functional import _gather_rows
from wtacrs.gradnorm import token_grad_norm
from wtacrs.modules import Generators
from wtacrs.taxonomy import Category, Operator

NAME = "wtacrs"
FALLBACKS = ("eager", "sdpa")


@dataclass
class AttentionSettings:
    """What the ``"wtacrs"`` attention function needs for one attention module.

    Attach as ``module.wtacrs_attention``. Every setting comes from ``config``, the conversion's
    :class:`~wtacrs.WTACRSConfig` (validated there; its ``tm1``, ``tm2``, ``tm2_v``, ``ratio``,
    ``min_k``, ``lossless`` and ``probability`` apply here); the other fields are facts about
    the module and the conversion. An attention module without settings runs the family's eager
    attention (on the ``"wtacrs"`` mask), exactly as an unconverted eager model.
    """

    config: WTACRSConfig
    fallback: str = field(default="eager", metadata={"help": "The implementation the model used before conversion ('eager' or 'sdpa'); used in eval / no_grad and when tm1 and tm2 are both off."})
    generator: torch.Generator | Generators | None = field(default=None, metadata={"help": "Generator (or per-device wtacrs.modules.Generators pool) for the row sampling, not for dropout, which uses torch's default generator like eager. None: a private per-device pool, so sampling never shifts the global RNG stream."})
    query_stream: str | None = field(default=None, metadata={"help": "Token-mask stream of the queries (wtacrs.token_mask), read when config.probability is 'auto': pad queries get a small gradient-norm proxy (wtacrs.gradnorm.GRAD_NORM_FLOOR). None: no mask. T5 cross-attention queries are 'decoder' tokens."})

    def __post_init__(self) -> None:
        if not isinstance(self.config, WTACRSConfig):
            raise TypeError(f"AttentionSettings.config must be a WTACRSConfig, got {type(self.config).__name__}")
        if self.fallback not in FALLBACKS:
            raise ValueError(f"AttentionSettings.fallback must be one of {FALLBACKS}, got {self.fallback!r}")

    @property
    def p_aware(self) -> bool:
        """TensorMul-1 rows and V columns drawn from ``P`` (``probability="auto"``), not from
        activation norms alone (``"activation"``)."""
        return self.config.probability == "auto"


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
    before = current_implementation(model)
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


def current_implementation(model: nn.Module) -> str:
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
        from wtacrs.taxonomy import FAMILIES

        raise NotImplementedError(
            f"no eager_attention_forward next to {type(module).__qualname__} ({type(module).__module__}); "
            f"the 'wtacrs' attention supports the {', '.join(FAMILIES)} families"
        )
    return fn


def _eager_conventions(module: nn.Module) -> tuple[str, bool]:
    """(softmax policy, contiguous output) of the eager attention of ``module``'s family (see
    :class:`wtacrs.taxonomy.Family`); T5/BERT's ``("plain", True)`` for a module outside the table."""
    from wtacrs.taxonomy import family_for_model_type

    family = family_for_model_type(getattr(getattr(module, "config", None), "model_type", None))
    return ("plain", True) if family is None else (family.softmax, family.contiguous_output)


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
    """``[B, 1, q]`` fp32 proxies of the queries' output-gradient norms from the token mask of
    ``stream``: 1 for real tokens, :data:`~wtacrs.gradnorm.GRAD_NORM_FLOOR` for pads (a pooler
    or a user loss can read a pad query's output, so its rows must stay drawable)."""
    if stream is None:
        return None
    b, _, q, _ = query.shape
    g, _ = token_grad_norm(stream, b * q, query.device)
    return None if g is None else g.reshape(b, 1, q)


_PRIVATE_GENERATORS: Generators | None = None


def _generator(settings: AttentionSettings, device: torch.device) -> torch.Generator | None:
    """The sampling generator for ``device``: the settings' (a generator or a per-device pool), or
    a private pool seeded off ``torch.initial_seed()``, so sampling never shifts the global stream."""
    global _PRIVATE_GENERATORS
    g = settings.generator
    if isinstance(g, Generators):
        return g.for_device(device)
    if g is not None:
        return g
    if _PRIVATE_GENERATORS is None:
        _PRIVATE_GENERATORS = Generators(torch.initial_seed() + 0x5EED)
    return _PRIVATE_GENERATORS.for_device(device)


# ---------------------------------------------------------------------------------------------
# TensorMul-1 and TensorMul-2
# ---------------------------------------------------------------------------------------------


# Share of the sampling mass spread over every row whose gradient can be nonzero ("defensive"
# importance sampling): the P-aware scores are products of squares and can underflow to 0 for a
# row whose gradient is tiny but not 0, which would make the estimate biased.
DEFENSIVE_SHARE = 0.01


def score_gradient_proxies(
    probs: Tensor, value_sq_norms: Tensor | None = None, query_weights: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Expected norms of the rows and columns of the score gradient ``dS``, from ``P`` alone.

    ``dS_i = J_i dP_i`` with the softmax Jacobian ``J_i = diag(P_i) - P_i P_i^T``. If ``dP_ij =
    dO_i . v_j`` is noise of variance ``||dO_i||^2 a_j`` (``a_j = ||v_j||^2``), then
    ``E dS_ij^2 = ||dO_i||^2 P_ij^2 ((1 - 2 P_ij) a_j + sum_l P_il^2 a_l)``. ``probs``
    ``[..., q, kv]``; ``value_sq_norms`` ``[..., kv]`` (None: ``a = 1``); ``query_weights``
    ``[..., q]`` estimates of ``||dO_i||`` (small for pad queries; None: 1). Returns fp32
    ``(rows [..., q], columns [..., kv])``: square roots of the row and column sums. A key no query
    attends to gets exactly 0, as its gradient.
    """
    p = probs.float()
    p2 = p * p
    a = value_sq_norms.float().unsqueeze(-2) if value_sq_norms is not None else torch.ones((), device=p.device)
    spread = (p2 * a).sum(dim=-1, keepdim=True)
    w = p2.mul_(((1 - 2 * p) * a).add_(spread)).clamp_min_(0)  # (1-P)^2 a_j + sum_{l != j} P^2 a >= 0
    if query_weights is not None:
        w.mul_(query_weights.float().square().unsqueeze(-1))
    return w.sum(dim=-1).sqrt(), w.sum(dim=-2).sqrt()


def _draw_rows(x: Tensor, score: Tensor | None, support: Tensor | None, k: int, generator) -> tuple[Tensor, Tensor, Tensor]:
    """WTA-CRS draw of ``k`` rows of ``x`` ``[..., n, d]``: ``(rows, fp32 weights, int32 idx)``.

    ``p ∝ (1 - s) ||x_i|| score_i + s ||x_i|| support_i`` (each part normalised, ``s =``
    :data:`DEFENSIVE_SHARE`); ``support`` must be nonzero wherever the gradient row can be.
    None means 1. Rows with a NaN/Inf are kept exactly, as in :func:`wtacrs.estimator.sample_rows`.
    """
    n = x.shape[-2]
    norms = row_norms(x)
    p = row_probabilities(x, score, norms=norms)
    if support is not score:
        p = p.mul_(1 - DEFENSIVE_SHARE).add_(row_probabilities(x, support, norms=norms), alpha=DEFENSIVE_SHARE)
    sample = wtacrs_sample(p, k, generator, forced=~torch.isfinite(norms))
    return _gather_rows(x, sample.indices), sample.weights, sample.indices.to(index_dtype(n))


def _weighted_mean(x: Tensor, weight: Tensor) -> Tensor:
    """``sum_i w_i x_i / sum_i w_i`` over rows of ``x`` ``[..., n, d]`` (0 where all ``w`` are 0), ``[..., 1, d]``."""
    w = weight.float()
    total = w.sum(dim=-1, keepdim=True)
    w = w / torch.where(total > 0, total, torch.ones_like(total))
    mean = torch.matmul(w.unsqueeze(-2), x.float())
    return torch.where(torch.isfinite(mean), mean, torch.zeros_like(mean)).to(x.dtype)


def query_sample_shapes(n: int, k: int) -> tuple[int, int]:
    """(stored query rows, indices) per (batch, head) for ``k = budget(n)``: with ``2 <= k < n``,
    ``k - 1`` sampled centered rows plus their mean (same bytes as k rows, 4 fewer index bytes)."""
    if k >= n:
        return n, 0
    return (k, k - 1) if k >= 2 else (1, 1)


@dataclass
class _TM1Sampler:
    """Draws TensorMul-1's stored rows once ``P`` is known (called inside the forward).

    Returns ``(q_rows, q_weights, q_idx, k_rows, k_weights, k_idx)``: rows in the input dtype,
    fp32 weights, int32 indices; ``(Q or K, None, None)`` where kept whole, all None where not
    needed.
    """

    settings: AttentionSettings
    generator: torch.Generator | None
    need_query_rows: bool  # K requires grad: dK = dS^T Q needs rows of Q
    need_key_rows: bool  # Q requires grad: dQ = dS K needs rows of K
    value_states: Tensor | None  # [B, H, kv, d]: ||v_j||^2 scales dP's column j (P-aware probabilities)
    query_weights: Tensor | None  # [B, 1|H, q] token-mask proxies of the queries' gradient norms
    key_visibility: Tensor | None  # [B|1, 1|H, kv] (activation probabilities)
    center_keys: bool = True  # rows of dS sum to 0 -- not after a softcap: (1 - t^2) dS

    def __call__(self, probs: Tensor, query: Tensor, key: Tensor):
        s = self.settings
        cfg = s.config
        q_sample = k_sample = (None, None, None)
        n_q, n_k = query.shape[-2], key.shape[-2]
        kq, kk = budget(n_q, cfg.ratio, cfg.min_k), budget(n_k, cfg.ratio, cfg.min_k)
        lead = probs.shape[:-2]
        if query.device.type == "meta" and estimator.META_SHAPES_ONLY:
            if self.need_query_rows:
                rows, idx = query_sample_shapes(n_q, kq) if s.p_aware else (kq, kq)
                q_sample = (query, None, None) if kq >= n_q else self._empty(query, lead, rows, idx, n_q)
            if self.need_key_rows:
                k_sample = (key, None, None) if kk >= n_k else self._empty(key, lead, kk, kk, n_k)
            return *q_sample, *k_sample
        if s.p_aware:
            a = None if self.value_states is None else row_norms(self.value_states).square()
            g_query, g_key = score_gradient_proxies(probs, a, self._query_weights(lead, n_q))
            # a key column of P that is exactly 0 (masked for every query) has dS[:, j] == 0 exactly
            key_support = (probs.float().sum(dim=-2) > 0).float()
            query_support = self._query_weights(lead, n_q)
        else:
            g_key = key_support = None if self.key_visibility is None else self.key_visibility.expand(*lead, n_k)
            g_query = query_support = None
        if self.need_query_rows:
            if kq >= n_q:
                q_sample = (query, None, None)
            elif kq >= 2 and s.p_aware:
                # dK = dS^T (Q - 1 qbar) + colsum(dS)^T qbar: the mean row is stored with the samples
                qbar = _weighted_mean(query, g_query)
                rows, weights, idx = _draw_rows(query - qbar, g_query, query_support, kq - 1, self.generator)
                q_sample = (torch.cat([rows, qbar], dim=-2), weights, idx)
            else:
                q_sample = _draw_rows(query.expand(*lead, *query.shape[-2:]), g_query, query_support, kq, self.generator)
        if self.need_key_rows:
            if kk >= n_k:
                k_sample = (key, None, None)
            else:
                # rows of dS sum to 0, so dQ = dS (K - 1 kbar) exactly for any kbar: nothing extra stored
                centered = s.p_aware and self.center_keys
                kc = key - _weighted_mean(key, g_key) if centered else key.expand(*lead, *key.shape[-2:])
                k_sample = _draw_rows(kc, g_key, key_support, kk, self.generator)
        return *q_sample, *k_sample

    def _query_weights(self, lead, n_q):
        return None if self.query_weights is None else self.query_weights.expand(*lead, n_q)

    @staticmethod
    def _empty(x, lead, rows, idx, n):
        return (
            x.new_empty(*lead, rows, x.shape[-1]),
            torch.empty(*lead, idx, dtype=torch.float32, device=x.device),
            torch.empty(*lead, idx, dtype=index_dtype(n), device=x.device),
        )


def soft_cap(scores: Tensor, softcap: float | None) -> Tensor:
    """Gemma 2's logit softcapping, in its eager ops: ``tanh(scores / softcap) * softcap``."""
    if softcap is None:
        return scores
    return torch.tanh(scores / softcap) * softcap


class SampledScoresSoftmax(torch.autograd.Function):
    """TensorMul-1 and the softmax: ``P = softmax(cap(Q K^T * scaling) + bias + mask)``, exact.

    ``cap`` is the identity, or with ``softcap`` (Gemma 2) :func:`soft_cap`, as eager applies it.

    The forward runs eager's ops in eager's order (so ``P`` is bitwise eager's, autocast
    included), then draws the rows TensorMul-1 keeps *after* the softmax, so their probabilities
    can follow ``P`` (see :class:`_TM1Sampler`). Saved, in this order: ``P`` (the softmax output
    eager keeps; TensorMul-2 reuses this storage), query rows ``[..., kq, d]``, their fp32 weights
    and indices, key rows ``[..., kk, d]``, weights and indices (Q or K themselves and two None
    when not sampled; None when not needed), then, only with ``softcap``, the ``tanh`` output
    ``t`` (what eager's tanh saves). The weights are applied in backward, in fp32
    (:func:`wtacrs.estimator.weighted_product`).

    Backward: ``dS`` exactly from ``P`` and ``dP`` (eager's softmax backward), the bias and mask
    gradients ``dS`` (reduced to their shapes by autograd), through the cap exactly
    (``(1 - t^2) dS``), then ``dQ = dS K`` and ``dK = dS^T Q`` estimated from the stored rows
    (unbiased). The rows' P-aware probabilities leave out the cap's ``(1 - t^2)`` factor, which
    only costs variance.
    """

    operator = Operator.TENSORMUL_1
    category = Category.SAMPLED
    # P (the softmax's exact backward) and the softcap's tanh output are the softmax's
    saved_operators = {0: (Operator.SOFTMAX, Category.UNCOMPRESSED), 7: (Operator.SOFTMAX, Category.UNCOMPRESSED)}

    @staticmethod
    def forward(ctx, query, key, bias, mask, scaling, softmax_dtype, sampler, softcap=None):
        scores = torch.matmul(query, key.transpose(-1, -2)) * scaling
        mm_dtype = scores.dtype
        capped = None
        if softcap is not None:
            capped = torch.tanh(scores / softcap)
            scores = capped * softcap
        if bias is not None:
            scores = scores + bias
        if mask is not None:
            scores = scores + mask
        probs = F.softmax(scores, dim=-1, dtype=softmax_dtype)
        ctx.save_for_backward(probs, *sampler(probs, query.detach(), key.detach()), *(() if capped is None else (capped,)))
        ctx.scaling, ctx.softcap, ctx.mm_dtype, ctx.scores_dtype = scaling, softcap, mm_dtype, scores.dtype
        return probs

    @staticmethod
    def backward(ctx, grad_probs):
        probs, q_rows, q_weights, q_idx, k_rows, k_weights, k_idx, *capped = ctx.saved_tensors
        grad_scores = torch._softmax_backward_data(grad_probs, probs, -1, probs.dtype).to(ctx.scores_dtype)
        grad_bias = grad_scores if ctx.needs_input_grad[2] else None
        grad_mask = grad_scores if ctx.needs_input_grad[3] else None
        g = grad_scores.to(ctx.mm_dtype)
        if capped:  # autograd's chain for eager's tanh(s / c) * c
            g = torch.ops.aten.tanh_backward(g * ctx.softcap, capped[0]) / ctx.softcap
        g = g * ctx.scaling
        dtype = g.dtype
        grad_q = grad_k = None
        if ctx.needs_input_grad[0]:
            if k_idx is None:  # k_rows is K itself
                grad_q = torch.matmul(g, k_rows)
            else:
                grad_cols = _gather_rows(g.transpose(-1, -2), k_idx)  # [..., kk, q]
                grad_q = weighted_product(grad_cols, k_rows, k_weights, dtype)
        if ctx.needs_input_grad[1]:
            if q_idx is None:  # q_rows is Q itself
                grad_kt = torch.matmul(q_rows.transpose(-1, -2), g)
            else:
                n_s = q_idx.shape[-1]
                grad_kt = weighted_product(q_rows[..., :n_s, :], _gather_rows(g, q_idx), q_weights, dtype)
                if q_rows.shape[-2] > n_s:  # the centering mean: + qbar^T colsum(dS)
                    grad_kt = grad_kt + q_rows[..., n_s:, :].transpose(-1, -2) * g.sum(dim=-2, keepdim=True)
            grad_k = grad_kt.transpose(-1, -2)
        return grad_q, grad_k, grad_bias, grad_mask, None, None, None, None


def value_column_scores(probs: Tensor, value: Tensor, query_weights: Tensor | None = None) -> Tensor:
    """How much an error in head-dim column ``c`` of ``dP = dO V^T`` moves ``dS``: fp32 ``[..., d]``.

    An error ``dO_ic V[:, c]`` in row ``i`` of ``dP`` reaches ``dS`` as ``dO_ic J_i V[:, c]``; with
    unit ``dO`` (times ``query_weights`` ``[..., q]``) the score is
    ``sqrt(sum_i w_i^2 ||J_i V[:, c]||^2)``, where ``||J_i v||^2 = P_i^2.v^2 - 2 (P_i.v)(P_i^2.v) +
    (P_i.v)^2 ||P_i||^2``. A column constant over the keys scores 0: the softmax ignores it.
    Costs two ``[q, kv] @ [kv, d]`` products. ``probs`` ``[..., q, kv]``, ``value`` ``[..., kv, d]``.
    """
    p = probs.float()
    v = value.float()
    p2 = p * p
    w2 = None if query_weights is None else query_weights.float().square().unsqueeze(-1)  # [..., q, 1]
    pv, p2v = torch.matmul(p, v), torch.matmul(p2, v)
    row_sq = p2.sum(dim=-1, keepdim=True)
    per_query = pv * p2v * -2 + pv * pv * row_sq  # [..., q, d]
    col = p2 if w2 is None else p2 * w2
    total = torch.matmul(col.sum(dim=-2, keepdim=True), v * v).squeeze(-2)  # sum_i w_i^2 P_i^2 . v^2
    total = total + (per_query if w2 is None else per_query * w2).sum(dim=-2)
    return total.clamp_min_(0).sqrt()


class ReusedPV(torch.autograd.Function):
    """``dropout(P) @ V`` that saves the softmax's ``P`` and the dropout's mask, not ``dropout(P)``.

    Inputs: ``pd`` (the dropped probabilities the forward multiplies, as eager does), ``v``
    (``repeat_kv``-ed V), then ``p_src`` (the softmax output, detached: the same storage the
    softmax saved), ``mask_saved`` (the dropout node's saved tensor or None), ``v_store``,
    ``v_weights`` and ``v_idx`` (V before ``repeat_kv`` and two None, or sampled head-dim columns
    of V as rows ``[..., k, kv]``, their fp32 weights and indices ``[..., k]``). ``meta`` carries
    the cast dtype, the :class:`~wtacrs.lossless.DropoutMask` and the ``repeat_kv`` factor.

    ``P`` and the mask are attributed where they were first saved; what is left here is V
    itself (uncompressed), or its sampled head-dim columns: then ``ctx.category`` is sampled.
    """

    operator = Operator.TENSORMUL_2
    category = Category.UNCOMPRESSED

    @staticmethod
    def forward(ctx, pd, v, p_src, mask_saved, v_store, v_weights, v_idx, meta):
        ctx.meta = meta
        if v_idx is not None:
            ctx.category = Category.SAMPLED
        ctx.dtypes = (pd.dtype, v.dtype)
        ctx.save_for_backward(p_src, mask_saved, v_store, v_weights, v_idx)
        return torch.matmul(pd, v)  # under autocast this runs in the autocast dtype, as eager's

    @staticmethod
    def backward(ctx, grad):
        p_src, mask_saved, v_store, v_weights, v_idx = ctx.saved_tensors
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
            else:  # dP = dO V^T over k sampled head-dim columns
                grad_cols = _gather_rows(grad.transpose(-1, -2), v_idx)  # [..., k, q]
                grad_pd = weighted_product(grad_cols, v_store, v_weights, compute)
            grad_pd = grad_pd.to(pd_dtype)
        return grad_pd, grad_v, None, None, None, None, None, None


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
        or not (settings.config.tm1 or settings.config.tm2)
        or not module.training
        or not torch.is_grad_enabled()
        or not (query.requires_grad or key.requires_grad or value.requires_grad)
    ):
        return fallback_forward(module, query, key, value, attention_mask, fallback=fallback, scaling=scaling, dropout=dropout, **kwargs)
    return _sampled_forward(module, settings, query, key, value, attention_mask, scaling, dropout, kwargs)


def _sampled_forward(module, settings, query, key, value, attention_mask, scaling, dropout, kwargs):
    cfg = settings.config
    if scaling is None:
        scaling = query.size(-1) ** -0.5
    position_bias = kwargs.get("position_bias")
    n_rep = _n_rep(module)
    key_states = repeat_kv(key, n_rep)
    value_states = repeat_kv(value, n_rep)
    generator = _generator(settings, query.device)
    policy, contiguous_output = _eager_conventions(module)
    softcap = kwargs.get("softcap")  # Gemma 2's logit softcapping (eager: before the mask)

    # TensorMul-1 and the softmax (in the family's dtype handling): exact P
    softmax_dtype = torch.float32 if policy == "fp32" else None
    mask = additive_mask(attention_mask, module, query, key_states, kwargs)
    query_norm = _query_norm(settings.query_stream, query) if settings.p_aware else None
    if cfg.tm1:
        q_in, k_in = query, key_states
        mm_cast = _autocast_dtype(query)
        if mm_cast is not None:  # what autocast does to matmul's inputs; the stored rows are cast rows
            q_in, k_in = query.to(mm_cast), key_states.to(mm_cast)
        sampler = _TM1Sampler(
            settings,
            generator,
            need_query_rows=k_in.requires_grad,
            need_key_rows=q_in.requires_grad,
            value_states=value_states.detach() if settings.p_aware else None,
            query_weights=query_norm,
            key_visibility=None if settings.p_aware else key_visibility(attention_mask, module, query, key_states, kwargs),
            center_keys=softcap is None,
        )
        probs = SampledScoresSoftmax.apply(q_in, k_in, position_bias, mask, scaling, softmax_dtype, sampler, softcap)
    else:
        scores = soft_cap(torch.matmul(query, key_states.transpose(-1, -2)) * scaling, softcap)
        if position_bias is not None:
            scores = scores + position_bias
        if mask is not None:
            scores = scores + mask
        probs = F.softmax(scores, dim=-1, dtype=softmax_dtype)
    if policy == "fp32":
        cast = query.dtype
    else:
        cast = value.dtype if policy == "to_value" else None
    if cast == probs.dtype:
        cast = None
    probs_cast = probs if cast is None else probs.to(cast)

    # Dropout: 1-bit mask
    if cfg.lossless:
        dropped, drop_mask, drop_saved = lossless.dropout_with_mask(probs_cast, dropout, module.training)
    else:
        dropped = F.dropout(probs_cast, p=dropout, training=module.training)
        drop_mask = drop_saved = None

    # TensorMul-2
    reusable = dropout == 0.0 or not module.training or drop_mask is not None
    if cfg.tm2 and reusable:
        if not value_states.requires_grad and not dropped.requires_grad:
            out = torch.matmul(dropped, value_states)
        else:
            v_sample = _tm2_value(settings, value, value_states, generator, dropped.requires_grad, probs, query_norm)
            meta = _PVMeta(cast, drop_mask, n_rep)
            out = ReusedPV.apply(dropped, value_states, probs.detach(), drop_saved, *v_sample, meta)
    elif cfg.tm2:  # non-lossless dropout: dropout(P) cannot be rebuilt from P, store it
        v_sample = _tm2_value(settings, value, value_states, generator, dropped.requires_grad, probs, query_norm)
        meta = _PVMeta(None, None, n_rep)
        out = ReusedPV.apply(dropped, value_states, dropped.detach(), None, *v_sample, meta)
    else:
        out = torch.matmul(dropped, value_states)

    out = out.transpose(1, 2)
    if contiguous_output:
        out = out.contiguous()
    return out, dropped


def _tm2_value(settings, value, value_states, generator, need_grad_p, probs, query_weights):
    """What TensorMul-2 keeps of V for ``dP = dO V^T``: ``(V, None, None)`` (V before
    ``repeat_kv``) or k sampled head-dim columns as rows ``[..., k, kv]``, their fp32 weights and
    indices. Column probabilities: :func:`value_column_scores` of ``P`` (P-aware) or the column
    norms."""
    if not need_grad_p:
        return None, None, None
    cfg = settings.config
    if cfg.tm2_v == "store":
        return value.detach(), None, None
    d = value_states.shape[-1]
    k = budget(d, cfg.ratio, cfg.min_k)
    if k >= d:
        return value.detach(), None, None
    columns = value_states.detach().transpose(-1, -2)  # [B, H, d, kv]
    if columns.device.type == "meta" and estimator.META_SHAPES_ONLY:
        return _TM1Sampler._empty(columns, columns.shape[:-2], k, k, d)
    with torch.no_grad():
        score = None
        if settings.p_aware:
            weights = None if query_weights is None else query_weights.expand(*probs.shape[:-1])
            score = value_column_scores(probs.detach(), value_states.detach(), weights)
        return _draw_rows(columns, score, None, k, generator)


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
    parts: dict[str, int] = {}
    bh = batch * heads
    if config.tm1:
        kq, kk = budget(q_len, config.ratio, config.min_k), budget(kv_len, config.ratio, config.min_k)
        if kq >= q_len:
            rows, idx = q_len, 0
        else:
            rows, idx = query_sample_shapes(q_len, kq) if config.probability == "auto" else (kq, kq)
        parts["tm1_query"] = bh * rows * head_dim * itemsize + bh * idx * 8
        parts["tm1_key"] = bh * kk * head_dim * itemsize + (bh * kk * 8 if kk < kv_len else 0)
    else:
        parts["tm1_query"] = bh * q_len * head_dim * itemsize
        parts["tm1_key"] = bh * kv_len * head_dim * itemsize
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


__all__ = [
    "AttentionSettings",
    "ReusedPV",
    "SampledScoresSoftmax",
    "additive_mask",
    "disable",
    "enable",
    "fallback_forward",
    "key_visibility",
    "register",
    "saved_bytes_per_call",
    "score_gradient_proxies",
    "soft_cap",
    "value_column_scores",
    "wtacrs_attention_forward",
    "wtacrs_mask",
]

try:
    register()
except ImportError:  # pragma: no cover - transformers too old to have the interfaces
    pass
