"""The sampling generators: one pool per conversion, and one rule for calls outside a conversion.

Inside a conversion. :func:`wtacrs.convert` creates one :class:`GeneratorPool`, held by the
conversion state (``model._wtacrs_state.generators``) and seeded from ``WTACRSConfig.seed`` (when
that is None, from a seed derived from ``torch.initial_seed()``), offset by the rank in a
``torch.distributed`` run so that ranks draw independent rows (``rank_seed``). Every sampled linear and every
attention module of the model draws its rows from the pool's generator for the input's device.
No sampling op draws from torch's default generator. The converted model therefore consumes the
default generator (its dropout masks) exactly as the original does. ``copy.deepcopy``,
``torch.save`` and pickling carry the pool with its generator states.

Outside a conversion. Each sampling op takes ``generator=``, which may be a
``torch.Generator``, a :class:`GeneratorPool` or None. :func:`generator_for` resolves it for the
input's device:

* a pool gives its generator for that device;
* a generator on that device is used as it is;
* None, a meta input, or a generator on another device give None, which means torch's default
  generator of the device. ``wtacrs.functional``, a standalone ``WTACRSLinear`` and
  ``wtacrs.lossless.dropout`` work this way. With None, the dropout draws the mask that
  ``F.dropout`` draws.

There is one exception. :class:`wtacrs.attention.AttentionSettings` built with ``generator=None``
owns a pool, seeded ``torch.initial_seed() + ATTENTION_SEED_OFFSET`` at its first draw, so the
attention's sampling never shifts the global stream.
"""

from __future__ import annotations

import torch

# Keeps an attention module's own pool off the default generator's seed. With the same seed, the
# row draws would replay the dropout stream.
ATTENTION_SEED_OFFSET = 0x5EED


# Spreads the ranks of a distributed run over the seed space (the 64-bit golden ratio).
RANK_SEED_STRIDE = 0x9E3779B97F4A7C15


def rank_seed(seed: int) -> int:
    """``seed`` for this process: unchanged outside ``torch.distributed``, else offset by the
    rank, so that the ranks of DDP / FSDP draw independent rows (rank 0 keeps ``seed``)."""
    import torch.distributed as dist

    rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    return (seed + rank * RANK_SEED_STRIDE) % 2**64


class GeneratorPool:
    """One ``torch.Generator`` per device, created on first use (none on meta) and seeded
    ``rank_seed(seed)``: ``seed`` itself on one process, a per-rank seed in a distributed run."""

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self._by_device: dict[torch.device, torch.Generator] = {}

    def for_device(self, device: torch.device) -> torch.Generator | None:
        if device.type == "meta":
            return None
        g = self._by_device.get(device)
        if g is None:
            g = self._by_device[device] = torch.Generator(device=device).manual_seed(rank_seed(self.seed))
        return g

    def get_state(self) -> dict[torch.device, torch.Tensor]:
        """The state of every generator created so far (``torch.Generator.get_state``, host tensors)."""
        return {device: g.get_state() for device, g in self._by_device.items()}

    def set_state(self, states: dict[torch.device, torch.Tensor]) -> None:
        """Put back states from :meth:`get_state`; a generator created since goes back to a new
        generator's state (seeded ``rank_seed(seed)``, as :meth:`for_device` seeds it), which is
        what it had when ``states`` were taken."""
        for device, g in self._by_device.items():
            state = states.get(device)
            if state is None:
                g.manual_seed(rank_seed(self.seed))
            else:
                g.set_state(state)


def generator_for(generator: torch.Generator | GeneratorPool | None, device: torch.device) -> torch.Generator | None:
    """The generator a sampling op on ``device`` draws from (None: torch's default); see the module docstring."""
    if isinstance(generator, GeneratorPool):
        return generator.for_device(device)
    if generator is None or device.type == "meta" or generator.device != device:
        return None
    return generator
