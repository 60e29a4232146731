"""Where the output-gradient row norms ``g_i`` of the sampling probabilities come from.

During the forward pass ``||dZ_i||`` is unknown. In order of preference (SPEC section 2):

1. :class:`GradNormCache` -- the norms seen for the same samples in an earlier backward pass,
   when the training loop says which samples are in the batch (``with cache.batch(sample_ids)``);
2. :class:`PositionGradNorms` -- running per-position averages of the norms seen in earlier
   backward passes, which need no sample ids (every converted model keeps one);
3. otherwise 1 (probabilities from the activation norms alone).

Either is multiplied by :func:`token_mask`, which down-weights padding tokens.

Both are context managers around the forward pass; they are context variables, so threads and
nested calls do not see each other's batches.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import math
from collections.abc import Iterator, Sequence

import torch
from torch import Tensor

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
    ``n`` equals ``mask.numel()``; otherwise it falls back to 1.
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


def current_token_mask(stream: str, n: int) -> tuple[Tensor | None, int | None]:
    """The ``[n]`` mask of ``stream`` (or of the default stream) if it has ``n`` tokens, and its id."""
    masks = _token_masks.get()
    mask = masks.get(stream, masks.get("default"))
    if mask is None or mask.numel() != n:
        return None, None
    return mask.reshape(n), id(mask)


class GradNormCache:
    """Per-sample cache of the last output-gradient row norms of every sampled layer.

    Keyed by ``(layer key, sample id)``; each entry is the fp32 ``[S]`` norms of that sample's
    tokens. A lookup succeeds only when every sample of the batch has an entry of the batch's
    sequence length, so a new sample or a new padding length falls back to the next source.
    Cached norms are floored at ``floor * mean`` so a token whose gradient was 0 last time keeps a
    nonzero probability and the estimate stays unbiased.

    Usage::

        cache = wtacrs.GradNormCache()
        for batch in loader:
            with cache.batch(batch["idx"]):
                loss = model(**inputs).loss
            loss.backward()
    """

    def __init__(self, floor: float = 0.1, device: torch.device | str | None = "cpu") -> None:
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


class PositionGradNorms:
    """Running per-position averages of output-gradient row norms, one per group of layers.

    A group is the set of sampled layers that read one input (Linear-Q/K/V of one attention,
    T5's ``wi_0``/``wi_1``): they share one row sample, and ``p_i ∝ ||x_i|| sqrt(sum_l ||dz_l,i||^2)``
    minimises the summed variance of their estimates. In backward every member adds its squared
    norms, averaged over the batch's real tokens at each position; the next forward folds them
    into an exponential moving average (``decay``). A lookup returns ``sqrt`` of that average for
    positions ``0..S-1`` (positions never seen take the mean), floored at ``floor * mean`` so every
    token keeps a nonzero probability and the estimate stays unbiased. The probabilities depend
    only on earlier batches, never on the current one's gradient.
    """

    def __init__(self, decay: float = 0.9, floor: float = 0.1) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"decay must be in [0, 1), got {decay!r}")
        if not 0.0 < floor <= 1.0:
            raise ValueError(f"floor must be in (0, 1], got {floor!r}")
        self.decay, self.floor = decay, floor
        self._average: dict[str, Tensor] = {}  # fp32 [S_seen]: mean squared norm per position
        self._pending: dict[str, tuple[Tensor, Tensor]] = {}  # (sum of squares, real-token count) per position

    def __len__(self) -> int:
        return len(self._average)

    def lookup(self, group: str, batch: int, seq: int, device: torch.device) -> Tensor | None:
        """fp32 ``[batch * seq]`` norms for a ``[batch, seq]`` input, or None before any backward."""
        self._fold(group)
        average = self._average.get(group)
        if average is None:
            return None
        mean = average.mean()
        if seq > average.numel():
            average = torch.cat([average, mean.expand(seq - average.numel())])
        norms = average[:seq].sqrt()
        norms = torch.maximum(norms, self.floor * norms.mean())
        return norms.to(device).expand(batch, seq).reshape(-1)

    def add(self, group: str, norms: Tensor, batch: int, seq: int, mask: Tensor | None) -> None:
        """Add one layer's output-gradient row norms ``[batch * seq]`` (``mask``: real tokens)."""
        if not _has_values(norms):
            return
        squares = norms.detach().float().reshape(batch, seq).square().cpu()
        weight = torch.ones_like(squares) if mask is None else (mask.reshape(batch, seq) > 0).float().cpu()
        total, count = (squares * weight).sum(0), weight.sum(0)
        pending = self._pending.get(group)
        if pending is not None and pending[0].numel() == seq:
            total, count = pending[0] + total, torch.maximum(pending[1], count)  # members share a count
        self._pending[group] = (total, count)

    def _fold(self, group: str) -> None:
        pending = self._pending.pop(group, None)
        if pending is None:
            return
        total, count = pending
        seen = count > 0
        new = torch.where(seen, total / count.clamp_min(1), torch.zeros_like(total))
        old = self._average.get(group)
        if old is None:
            self._average[group] = torch.where(seen, new, new[seen].mean() if seen.any() else new)
            return
        if old.numel() < new.numel():
            old = torch.cat([old, old.mean().expand(new.numel() - old.numel())])
        head = old[: new.numel()]
        head = torch.where(seen, self.decay * head + (1 - self.decay) * new, head)
        self._average[group] = torch.cat([head, old[new.numel() :]])

    def clear(self) -> None:
        self._average.clear()
        self._pending.clear()


def _has_values(t: Tensor) -> bool:
    """False on the meta device and for fake tensors: their norms hold no numbers."""
    from torch._subclasses.fake_tensor import FakeTensor

    return t.device.type != "meta" and not isinstance(t, FakeTensor)


def active_cache() -> tuple[GradNormCache, tuple] | None:
    return _active_cache.get()


def resolve_grad_norm(
    key: str, stream: str, shape: tuple[int, ...], device: torch.device, positions: tuple[PositionGradNorms, str] | None = None
):
    """``(grad_norm, sink, source)`` for a sampled layer's forward pass over ``shape`` tokens.

    ``shape`` is the input's ``shape[:-1]`` (``n`` tokens; ``[B, S]`` for per-position norms);
    ``positions`` is the model's :class:`PositionGradNorms` and this layer's group. ``grad_norm``
    is fp32 ``[n]`` or None (meaning 1); ``sink`` receives the output-gradient row norms in
    backward; ``source`` is a hashable name of where ``grad_norm`` came from, or None when it is
    specific to this layer (cached norms), so layers reading the same input with the same
    ``source`` have identical probabilities.
    """
    n = math.prod(shape)
    sinks = []
    grad_norm = None
    source: tuple | None = ("ones",)
    mask, mask_id = current_token_mask(stream, n)
    active = active_cache()
    if active is not None:
        cache, ids = active
        grad_norm = cache.lookup(key, ids, n, device)
        sinks.append(functools.partial(cache.update, key, ids))
        if grad_norm is not None:
            source = None
    if positions is not None and len(shape) == 2:
        table, group = positions
        batch, seq = shape
        if grad_norm is None:
            grad_norm = table.lookup(group, batch, seq, device)
            if grad_norm is not None:
                source = ("positions", group)
        sinks.append(functools.partial(table.add, group, batch=batch, seq=seq, mask=mask))
    if mask is not None:
        mask = mask.to(device=device, dtype=torch.float32)
        grad_norm = mask if grad_norm is None else grad_norm * mask
        if source is not None:
            source = (*source, "mask", mask_id)
    return grad_norm, _fan_out(sinks), source


def _fan_out(sinks: list):
    if not sinks:
        return None
    if len(sinks) == 1:
        return sinks[0]

    def sink(norms: Tensor) -> None:
        for s in sinks:
            s(norms)

    return sink
