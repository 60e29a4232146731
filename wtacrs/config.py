"""``WTACRSConfig``: what :func:`wtacrs.convert` replaces and how."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from wtacrs.taxonomy import Operator

PROBABILITY_SOURCES = ("auto", "activation")
CONFIG_NAME = "wtacrs_config.json"


@dataclass
class WTACRSConfig:
    """Settings of a WTA-CRS conversion. Every field is validated in ``__post_init__``."""

    ratio: float = field(default=0.3, metadata={"help": "Fraction of the n tokens whose rows are stored: k = ceil(ratio * n)."})
    min_k: int = field(default=1, metadata={"help": "Lower bound on k (k never exceeds n)."})
    q: bool = field(default=True, metadata={"help": "Sample Linear-Q (and a fused QKV projection)."})
    k: bool = field(default=True, metadata={"help": "Sample Linear-K."})
    v: bool = field(default=True, metadata={"help": "Sample Linear-V."})
    o: bool = field(default=True, metadata={"help": "Sample Linear-O, the attention output projection."})
    u: bool = field(default=True, metadata={"help": "Sample Linear-U (up / gate / wi)."})
    d: bool = field(default=True, metadata={"help": "Sample Linear-D (down / wo)."})
    tm1: bool = field(
        default=False,
        metadata={"help": "Sample TensorMul-1 (Q K^T) in the attention function. Off by default: sampled Q/K rows make the Q/K weight gradients noisier than naive CRS (benchmarks/fidelity.py)."},
    )
    tm2: bool = field(
        default=True,
        metadata={"help": "TensorMul-2 (P V) in the attention function: reuse the softmax's P and the dropout's 1-bit mask instead of storing dropout(P); V per tm2_v. With tm1 off and tm2_v='store' the attention is exact, and a model on SDPA keeps SDPA (it stores no P)."},
    )
    tm2_v: str = field(
        default="store",
        metadata={"help": "For dP = dO V^T keep V itself ('store', exact, the default) or k sampled head-dim columns of V ('sample', unbiased but about 20x noisier Q/K weight gradients)."},
    )
    lossless: bool = field(default=True, metadata={"help": "Bit-packed dropout and ReLU masks; GeLU/SiLU store only their input."})
    lean_norm: bool = field(
        default=True,
        metadata={"help": "LayerNorm/RMSNorm store only their input; sampled linears fed by a norm, an activation or a dropout rebuild their rows from tensors saved anyway instead of storing rows."},
    )
    probability: str = field(
        default="auto",
        metadata={
            "help": "Gradient-norm source of the sampling probabilities: 'auto' uses a GradNormCache when one is "
            "active, else the batch's token mask (pad tokens get wtacrs.gradnorm.GRAD_NORM_FLOOR, never 0), else 1, "
            "and draws attention rows from P (the expected score-gradient norms); 'activation' uses activation "
            "norms only (attention: times which keys any query can see)."
        },
    )
    seed: int | None = field(
        default=None,
        metadata={"help": "Seed of the sampling generators (one per device). None derives one from torch.initial_seed(). Sampling never draws from torch's default generator."},
    )

    def __post_init__(self) -> None:
        if isinstance(self.ratio, bool) or not isinstance(self.ratio, (int, float)) or not 0 < self.ratio <= 1:
            raise ValueError(f"WTACRSConfig.ratio must be a number in (0, 1], got {self.ratio!r}")
        if isinstance(self.min_k, bool) or not isinstance(self.min_k, int) or self.min_k < 1:
            raise ValueError(f"WTACRSConfig.min_k must be an int >= 1, got {self.min_k!r}")
        for name in ("q", "k", "v", "o", "u", "d", "tm1", "tm2", "lossless", "lean_norm"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"WTACRSConfig.{name} must be a bool, got {getattr(self, name)!r}")
        if self.tm2_v not in ("sample", "store"):
            raise ValueError(f"WTACRSConfig.tm2_v must be 'sample' or 'store', got {self.tm2_v!r}")
        if self.probability not in PROBABILITY_SOURCES:
            raise ValueError(f"WTACRSConfig.probability must be one of {PROBABILITY_SOURCES}, got {self.probability!r}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise ValueError(f"WTACRSConfig.seed must be an int or None, got {self.seed!r}")

    @property
    def samples_attention(self) -> bool:
        """Whether the attention gradients are sampled (else the attention is exact)."""
        return self.tm1 or (self.tm2 and self.tm2_v == "sample")

    def samples(self, operator: Operator) -> bool:
        """Whether the linear implementing ``operator`` is sampled."""
        return {
            Operator.LINEAR_Q: self.q,
            Operator.LINEAR_K: self.k,
            Operator.LINEAR_V: self.v,
            Operator.LINEAR_QKV: self.q and self.k and self.v,
            Operator.LINEAR_O: self.o,
            Operator.LINEAR_U: self.u,
            Operator.LINEAR_D: self.d,
        }.get(operator, False)

    @classmethod
    def help(cls) -> dict[str, str]:
        return {f.name: f.metadata["help"] for f in fields(cls)}

    def to_dict(self) -> dict[str, Any]:
        """Every field by name (JSON-serializable)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> WTACRSConfig:
        """The config of :meth:`to_dict`'s ``values``; an unknown key is an error, a missing one its default."""
        if not isinstance(values, dict):
            raise TypeError(f"WTACRSConfig.from_dict needs a dict, got {type(values).__name__}")
        unknown = sorted(set(values) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"WTACRSConfig: unknown key(s) {', '.join(map(repr, unknown))}; known: {', '.join(f.name for f in fields(cls))}")
        return cls(**values)

    def save_pretrained(self, save_directory: str | os.PathLike) -> None:
        """Write :data:`CONFIG_NAME` (``wtacrs_config.json``) in ``save_directory``, beside a model's ``config.json``."""
        os.makedirs(save_directory, exist_ok=True)
        with open(os.path.join(save_directory, CONFIG_NAME), "w") as f:
            json.dump(self.to_dict(), f, indent=2, sort_keys=True)
            f.write("\n")

    @classmethod
    def from_pretrained(cls, save_directory: str | os.PathLike) -> WTACRSConfig:
        """The config :meth:`save_pretrained` (or :func:`wtacrs.save_pretrained`) wrote in ``save_directory``."""
        path = os.path.join(save_directory, CONFIG_NAME)
        try:
            with open(path) as f:
                values = json.load(f)
        except FileNotFoundError:
            raise FileNotFoundError(f"no {CONFIG_NAME} in {os.fspath(save_directory)!r}; save one with wtacrs.save_pretrained(model, dir)") from None
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None
        return cls.from_dict(values)
