"""Where the output-gradient row norms ``g_i`` of the sampling probabilities come from.

During the forward pass ``||dZ_i||`` is unknown. In order of preference (SPEC section 2):

1. :class:`GradNormCache` -- the norms seen for the same samples in an earlier backward pass,
   when the training loop says which samples are in the batch (``with cache.batch(sample_ids)``);
2. :func:`token_mask` -- 1 for real tokens, :data:`GRAD_NORM_FLOOR` for padding tokens;
3. otherwise 1 (probabilities from the activation norms alone).

No source gives 0: a probability may be small, but a row drawn with probability 0 never enters
the estimate, which is then biased wherever that row's gradient is not 0. A pad's gradient is 0
only when nothing reads its output, and poolers (BERT's reads position 0, a pad under left
padding), last-token heads and user losses do read pads.

Both are context managers around the forward pass; they are context variables, so threads and
nested calls do not see each other's batches.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator, Sequence

import torch
from torch import Tensor

GRAD_NORM_FLOOR = 0.1
"""The smallest gradient-norm proxy, relative to a typical token: pad tokens get it (real tokens
1), and cached norms are floored at it times their mean. Small, so pads take little of the
budget; not 0, so the estimate stays unbiased. A pad whose gradient turns out as large as a
real token's adds about ``1 / GRAD_NORM_FLOOR`` = 10 times the variance that token adds."""

_token_masks: contextvars.ContextVar[dict[str, Tensor]] = contextvars.ContextVar("wtacrs_token_masks", default={})
_active_cache: contextvars.ContextVar[tuple["GradNormCache", tuple] | None] = contextvars.ContextVar(
    "wtacrs_grad_norm_cache", default=None
)


@contextlib.contextmanager
def token_mask(mask: Tensor | None = None, **streams: Tensor | None) -> Iterator[None]:
    """Declare which tokens of the batch are padding for the forward pass inside the block.

    ``mask`` ``[B, S]`` (bool or 0/1) is the token mask of the default stream; keyword arguments
    name other streams, e.g. ``token_mask(encoder=enc_mask, decoder=dec_mask)`` for an
    encoder-decoder model. A sampled layer uses the mask of its stream when its token count
    ``n`` equals ``mask.numel()`` (:func:`token_grad_norm`); otherwise it falls back to 1.
    """
    masks = dict(_token_masks.get())
    if mask is not None:
        streams["default"] = mask
    masks.update({name: m for name, m in streams.items() if m is not None})
    token = _token_masks.set(masks)
    try:
        yield
    finally:
        _token_masks.reset(token)


def token_grad_norm(stream: str, n: int, device: torch.device) -> tuple[Tensor | None, int | None]:
    """Gradient-norm proxies from the token mask of ``stream`` (or of the default stream), and
    the mask's id; ``(None, None)`` when no mask of ``n`` tokens is active.

    fp32 ``[n]`` on ``device``: 1 for real tokens, :data:`GRAD_NORM_FLOOR` for padding tokens.
    """
    masks = _token_masks.get()
    mask = masks.get(stream, masks.get("default"))
    if mask is None or mask.numel() != n:
        return None, None
    real = mask.reshape(n).to(device) != 0
    return torch.where(real, 1.0, GRAD_NORM_FLOOR).to(torch.float32), id(mask)


class GradNormCache:
    """Per-sample cache of the last output-gradient row norms of every sampled layer.

    Keyed by ``(layer key, sample id)``; each entry is the fp32 ``[S]`` norms of that sample's
    tokens. A lookup succeeds only when every sample of the batch has an entry of the batch's
    sequence length, so a new sample or a new padding length falls back to the next source.
    Cached norms are floored at ``floor * mean`` (:data:`GRAD_NORM_FLOOR` by default) so a token
    whose gradient was 0 last time keeps a nonzero probability and the estimate stays unbiased.

    Usage::

        cache = wtacrs.GradNormCache()
        for batch in loader:
            with cache.batch(batch["idx"]):
                loss = model(**inputs).loss
            loss.backward()
    """

    def __init__(self, floor: float = GRAD_NORM_FLOOR, device: torch.device | str | None = "cpu") -> None:
        self.floor = floor
        self.device = device
        self._norms: dict[tuple[str, object], Tensor] = {}

    def __len__(self) -> int:
        return len(self._norms)

    @contextlib.contextmanager
    def batch(self, sample_ids: Sequence | Tensor) -> Iterator[None]:
        """Make this cache the source for the forward pass inside the block."""
        ids = tuple(sample_ids.tolist() if isinstance(sample_ids, Tensor) else sample_ids)
        token = _active_cache.set((self, ids))
        try:
            yield
        finally:
            _active_cache.reset(token)

    def lookup(self, key: str, sample_ids: tuple, n: int, device: torch.device) -> Tensor | None:
        if not sample_ids or n % len(sample_ids):
            return None
        seq = n // len(sample_ids)
        rows = [self._norms.get((key, sid)) for sid in sample_ids]
        if any(r is None or r.numel() != seq for r in rows):
            return None
        norms = torch.cat(rows).to(device)
        mean = norms.mean()
        if not torch.isfinite(mean) or mean <= 0:
            return None
        return torch.maximum(norms, self.floor * mean)

    def update(self, key: str, sample_ids: tuple, norms: Tensor) -> None:
        if not sample_ids or norms.numel() % len(sample_ids) or norms.device.type == "meta":
            return
        for sid, row in zip(sample_ids, norms.detach().reshape(len(sample_ids), -1).to(self.device)):
            self._norms[(key, sid)] = row.clone()


def active_cache() -> tuple[GradNormCache, tuple] | None:
    return _active_cache.get()


def resolve_grad_norm(key: str, stream: str, n: int, device: torch.device):
    """``(grad_norm, sink, source)`` for a sampled layer's forward pass over ``n`` tokens.

    ``grad_norm`` is fp32 ``[n]`` or None (meaning 1), never 0 where a gradient can be nonzero:
    the cached norms when the cache has them (they measured every position, pads included),
    else the token mask's proxies (:func:`token_grad_norm`). ``sink`` receives the
    output-gradient row norms in backward when a :class:`GradNormCache` is active; ``source`` is
    a hashable name of where ``grad_norm`` came from, or None when it is specific to this layer
    (cached norms), so layers reading the same input with the same ``source`` have identical
    probabilities.
    """
    active = active_cache()
    grad_norm = sink = None
    source: tuple | None = ("ones",)
    if active is not None:
        cache, ids = active
        grad_norm = cache.lookup(key, ids, n, device)

        def sink(norms: Tensor, _cache=cache, _ids=ids, _key=key) -> None:
            _cache.update(_key, _ids, norms)

        if grad_norm is not None:
            return grad_norm, sink, None
    mask_norm, mask_id = token_grad_norm(stream, n, device)
    if mask_norm is not None:
        grad_norm, source = mask_norm, ("mask", mask_id)
    return grad_norm, sink, source
