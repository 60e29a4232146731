"""Where the output-gradient row norms ``g_i`` of the sampling probabilities come from.

During the forward pass ``||dZ_i||`` is unknown. In order of preference (the first source available is used):

1. :class:`GradNormCache` -- the norms seen for the same samples in an earlier backward pass,
   when the training loop says which samples are in the batch (``with cache.batch(sample_ids)``);
2. :class:`PositionGradNorms` -- running per-position averages of the norms seen in earlier
   backward passes, which need no sample ids (every converted model keeps one);
3. otherwise 1 (probabilities from the activation norms alone).

Sources 2 and 3 are multiplied by :func:`token_mask`'s proxies: 1 for real tokens,
:data:`GRAD_NORM_FLOOR` for padding tokens. No source gives 0: a probability may be small, but a
row drawn with probability 0 never enters the estimate, which is then biased wherever that row's
gradient is not 0. A pad's gradient is 0 only when nothing reads its output, and poolers (BERT's
reads position 0, a pad under left padding), last-token heads and user losses do read pads.

Both are context managers around the forward pass; they are context variables, so threads and
nested calls do not see each other's batches. A model converted by :func:`wtacrs.convert` opens
the token masks itself, and opens a cache from the sample ids that
:meth:`GradNormCache.collator` puts in the batch (for Hugging Face ``Trainer``).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import math
import uuid
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor
from torch._subclasses.fake_tensor import FakeTensor

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
    mask, mask_id = stream_mask(stream, n)
    return (None, None) if mask is None else (_mask_proxies(mask, device), mask_id)


def _mask_proxies(mask: Tensor, device: torch.device) -> Tensor:
    """fp32 ``[n]``: 1 where ``mask`` is nonzero (real tokens), :data:`GRAD_NORM_FLOOR` elsewhere."""
    return torch.where(mask.to(device) != 0, 1.0, GRAD_NORM_FLOOR).to(torch.float32)


def stream_mask(stream: str, n: int) -> tuple[Tensor | None, int | None]:
    """The token mask of ``stream`` (or of the default stream) as an ``[n]`` view, and its id;
    ``(None, None)`` when no mask of ``n`` tokens is active."""
    masks = _token_masks.get()
    mask = masks.get(stream, masks.get("default"))
    if mask is None or mask.numel() != n:
        return None, None
    return mask.reshape(n), id(mask)


class ForwardSources:
    """The token masks and gradient-norm cache active at one point of a forward pass, to be made
    active again later (the recomputation of a checkpointed region runs in backward, after the
    forward closed their scopes). ``with sources:`` restores them inside the block; re-entrant."""

    __slots__ = ("_values", "_tokens")

    def __init__(self) -> None:
        self._values = (_token_masks.get(), _active_cache.get())
        self._tokens: list[tuple] = []

    def __enter__(self) -> ForwardSources:
        masks, cache = self._values
        self._tokens.append((_token_masks.set(masks), _active_cache.set(cache)))
        return self

    def __exit__(self, *exc) -> None:
        masks_token, cache_token = self._tokens.pop()
        _active_cache.reset(cache_token)
        _token_masks.reset(masks_token)


SAMPLE_IDS_KEY = "wtacrs_sample_ids"
"""The batch key under which :meth:`GradNormCache.collator` passes the sample ids to a converted model."""

_caches: weakref.WeakValueDictionary[str, GradNormCache] = weakref.WeakValueDictionary()


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

    or, where the training loop is not yours (Hugging Face ``Trainer``), let the collator carry
    the ids to the converted model: ``data_collator=cache.collator(base_collator, id_key="idx")``.
    """

    def __init__(self, floor: float = GRAD_NORM_FLOOR, device: torch.device | str | None = "cpu") -> None:
        self.floor = floor
        self.device = device
        self._norms: dict[tuple[str, object], Tensor] = {}
        self._register()

    def _register(self) -> None:
        self._token = uuid.uuid4().hex  # how a collated batch names this cache (see collator)
        _caches[self._token] = self

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "_token"}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._register()  # a copy is another cache

    def __len__(self) -> int:
        return len(self._norms)

    def collator(self, base: Callable[[list], Any], id_key: str = "idx") -> SampleIdCollator:
        """A data collator that feeds this cache from a converted model's forward.

        It pops ``id_key`` from every example, collates the rest with ``base`` (e.g.
        ``transformers.DataCollatorWithPadding(tokenizer)`` or ``default_data_collator``) and adds
        the ids under :data:`SAMPLE_IDS_KEY`; the model converted by :func:`wtacrs.convert` takes
        them out of its inputs and runs the forward inside :meth:`batch`. With ``Trainer``, pass
        ``TrainingArguments(remove_unused_columns=False)``, or ``Trainer`` drops ``id_key`` before
        the collator sees it. The collator names the cache by a token, not a reference, so it
        works from ``DataLoader`` worker processes.
        """
        return SampleIdCollator(self._token, base, id_key)

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


class SampleIds:
    """The sample ids of one collated batch and the :class:`GradNormCache` they feed (by token)."""

    def __init__(self, token: str, ids: tuple) -> None:
        self.token, self.ids = token, ids

    def batch(self) -> contextlib.AbstractContextManager[None]:
        """``cache.batch(ids)`` of the cache that made the collator."""
        cache = _caches.get(self.token)
        if cache is None:
            raise RuntimeError("the GradNormCache whose collator made this batch no longer exists")
        return cache.batch(self.ids)

    def __repr__(self) -> str:
        return f"SampleIds({list(self.ids)!r})"


class SampleIdCollator:
    """See :meth:`GradNormCache.collator`."""

    def __init__(self, token: str, base: Callable[[list], Any], id_key: str) -> None:
        self.token, self.base, self.id_key = token, base, id_key

    def __call__(self, examples: Sequence[Mapping[str, Any]]) -> Any:
        ids = []
        rest = []
        for example in examples:
            if self.id_key not in example:
                raise KeyError(
                    f"GradNormCache.collator: an example has no {self.id_key!r} field (keys: {sorted(example)}); "
                    "with Trainer, pass TrainingArguments(remove_unused_columns=False) so it keeps the field"
                )
            sid = example[self.id_key]
            ids.append(sid.item() if isinstance(sid, Tensor) else sid)
            rest.append({k: v for k, v in example.items() if k != self.id_key})
        batch = self.base(rest)
        batch[SAMPLE_IDS_KEY] = SampleIds(self.token, tuple(ids))
        return batch


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
        mean = norms.mean()
        norms = torch.maximum(norms, self.floor * mean)
        # All zero (no layer output reached the loss at a real token, e.g. a pooler that reads only
        # a pad): no information, so 1 everywhere, never 0. Shape-static, so it runs on meta.
        norms = torch.where(mean > 0, norms, torch.ones_like(norms))
        return norms.to(device).expand(batch, seq).reshape(-1)

    def add(self, group: str, norms: Tensor, batch: int, seq: int, mask: Tensor | None) -> None:
        """Add one layer's output-gradient row norms ``[batch * seq]`` (``mask``: nonzero at real tokens).

        Every step is shape-static (no value decides a branch), so the meta device keeps the same
        tensors as a real device and a meta estimate of a step counts them too.
        """
        if _is_fake(norms):  # a traced step (FakeTensorMode): its values must not outlive it
            return
        squares = norms.detach().float().reshape(batch, seq).square()
        weight = torch.ones_like(squares) if mask is None else (mask.reshape(batch, seq) != 0).to(squares)
        total, count = (squares * weight).sum(0), weight.sum(0)
        pending = self._pending.get(group)
        if pending is not None and pending[0].shape == total.shape:
            total, count = pending[0] + total, torch.maximum(pending[1], count)  # members share a count
        self._pending[group] = (total, count)

    def _fold(self, group: str) -> None:
        pending = self._pending.pop(group, None)
        if pending is None:
            return
        total, count = pending
        new = total / count.clamp_min(1)
        seen = (count > 0) & torch.isfinite(new)  # an overflowed step (fp16, GradScaler skips it) is ignored
        old = self._average.get(group)
        if old is None:
            mean_seen = torch.where(seen, new, 0.0).sum() / seen.sum().clamp_min(1)
            self._average[group] = torch.where(seen, new, mean_seen)
            return
        if old.numel() < new.numel():
            old = torch.cat([old, old.mean().expand(new.numel() - old.numel())])
        head = old[: new.numel()]
        head = torch.where(seen, self.decay * head + (1 - self.decay) * new, head)
        self._average[group] = torch.cat([head, old[new.numel() :]])

    def clear(self) -> None:
        self._average.clear()
        self._pending.clear()


def _is_fake(t: Tensor) -> bool:
    return isinstance(t, FakeTensor)


def active_cache() -> tuple[GradNormCache, tuple] | None:
    return _active_cache.get()


def resolve_grad_norm(
    key: str, stream: str, shape: tuple[int, ...], device: torch.device, positions: tuple[PositionGradNorms, str] | None = None
):
    """``(grad_norm, sink, source)`` for a sampled layer's forward pass over ``shape`` tokens.

    ``shape`` is the input's ``shape[:-1]`` (``n`` tokens; ``[B, S]`` for per-position norms);
    ``positions`` is the model's :class:`PositionGradNorms` and this layer's group. ``grad_norm``
    is fp32 ``[n]`` or None (meaning 1), never 0 where a gradient can be nonzero: the cached norms
    when the cache has them (they measured every position, pads included), else the running
    per-position norms, else 1, times the token mask's proxies (:func:`token_grad_norm`).
    ``sink`` receives the output-gradient row norms in backward; ``source`` is a hashable name of
    where ``grad_norm`` came from, or None when it is specific to this layer (cached norms), so
    layers reading the same input with the same ``source`` have identical probabilities.
    """
    n = math.prod(shape)
    sinks = []
    grad_norm = None
    source: tuple | None = ("ones",)
    active = active_cache()
    if active is not None:
        cache, ids = active
        grad_norm = cache.lookup(key, ids, n, device)
        sinks.append(functools.partial(cache.update, key, ids))
        if grad_norm is not None:
            return grad_norm, _fan_out(sinks), None
    mask, mask_id = stream_mask(stream, n)  # a view of the batch's mask: nothing new is kept
    if positions is not None and len(shape) == 2:
        table, group = positions
        batch, seq = shape
        grad_norm = table.lookup(group, batch, seq, device)
        if grad_norm is not None:
            source = ("positions", group)
        sinks.append(functools.partial(table.add, group, batch=batch, seq=seq, mask=mask))
    if mask is not None:
        mask_norm = _mask_proxies(mask, device)
        grad_norm = mask_norm if grad_norm is None else grad_norm * mask_norm
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
