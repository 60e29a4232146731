"""The settings of one attention module, and the generator its row sampling draws from."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from wtacrs.config import WTACRSConfig
from wtacrs.rng import ATTENTION_SEED_OFFSET, GeneratorPool, generator_for

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
    generator: torch.Generator | GeneratorPool | None = field(default=None, metadata={"help": "Generator, or per-device wtacrs.rng.GeneratorPool (a conversion passes its own), for the row sampling, not for dropout, which uses torch's default generator like eager. None: at the first draw the settings get a pool of their own, seeded off torch.initial_seed(), so sampling never shifts the global RNG stream (wtacrs.rng)."})
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


def sampling_generator(settings: AttentionSettings, device: torch.device) -> torch.Generator | None:
    """The sampling generator for ``device`` (:func:`wtacrs.rng.generator_for`). Settings without
    one get a pool of their own here, seeded off ``torch.initial_seed()``."""
    if settings.generator is None:
        settings.generator = GeneratorPool(torch.initial_seed() + ATTENTION_SEED_OFFSET)
    return generator_for(settings.generator, device)
