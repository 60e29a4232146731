"""The fine-tuning methods a suite can name: one table from name pattern to preparation.

===============================  ======================================================================
``full``                         every parameter trained, nothing changed
``lora``                         peft LoRA (r=8, alpha=16) on peft's default target modules of the family
``checkpointing``                transformers' activation (gradient) checkpointing, non-reentrant
``wtacrs@R``                     ``wtacrs.convert(WTACRSConfig(ratio=R))``, the default: every Linear
                                 sampled; eager attention stays exact but reuses P (no copy of
                                 dropout(P), 1-bit dropout mask); SDPA attention is left alone
``wtacrs-linear@R``              ``wtacrs.convert`` at ratio R on the Linears only (attention left to
                                 the model's eager/sdpa implementation)
``lora+wtacrs@R``                LoRA, then ``wtacrs.convert`` (only ``lora_A`` inputs are sampled)
``checkpointing+lora``           LoRA, then activation checkpointing of every layer
``checkpointing+wtacrs@R``       ``wtacrs@R``, then checkpointing with ``wtacrs.checkpoint_context_fn``:
                                 a recomputed region draws the rows its forward drew, so the
                                 gradients are those of ``wtacrs@R`` bit for bit
``checkpointing+lora+wtacrs@R``  ``lora+wtacrs@R``, then checkpointing as above
===============================  ======================================================================

``0 < R <= 1``. ``parse(name)`` reads a name once into a ``Method``; ``Method.prepare(model,
family, seed)`` applies it in place (peft wraps the model, so use the returned module).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

# torch, transformers and peft load when a method is applied, not when its name is read
# (``python -m profiler --help`` lists the names); pydantic resolves these annotations at run time
if TYPE_CHECKING:
    from torch.nn import Module
else:
    Module = Any

LORA_RANK = 8
LORA_ALPHA = 16


class MethodError(ValueError):
    """A method name that no pattern of the table matches, or a bad ratio."""


def _full(model: Module, family: str, ratio: float | None, seed: int | None) -> Module:
    return model


def _lora(model: Module, family: str, ratio: float | None, seed: int | None) -> Module:
    from peft import LoraConfig, get_peft_model

    from profiler.models import ARCHITECTURES

    # target_modules=None: peft's own default table for the model type (t5: q, v; bert: query,
    # value; gpt2: c_attn; llama: q_proj, v_proj)
    config = LoraConfig(r=LORA_RANK, lora_alpha=LORA_ALPHA, task_type=ARCHITECTURES[family].peft_task_type)
    return get_peft_model(model, config)


def _checkpointing(model: Module, family: str, ratio: float | None, seed: int | None, **kwargs) -> Module:
    kwargs = {"use_reentrant": False, **kwargs}  # the reentrant variant needs inputs that require grad
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x name
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    return model


def _wtacrs_config(ratio: float, seed: int | None, **switches: bool):
    import wtacrs

    return wtacrs.convert, wtacrs.WTACRSConfig(ratio=ratio, seed=seed, **switches)


def _wtacrs(model: Module, family: str, ratio: float | None, seed: int | None) -> Module:
    convert, config = _wtacrs_config(ratio, seed)
    return convert(model, config)


def _wtacrs_linear(model: Module, family: str, ratio: float | None, seed: int | None) -> Module:
    convert, config = _wtacrs_config(ratio, seed, tm1=False, tm2=False)
    return convert(model, config)


def _lora_wtacrs(model: Module, family: str, ratio: float | None, seed: int | None) -> Module:
    convert, config = _wtacrs_config(ratio, seed)  # fail before peft wraps the model
    return convert(_lora(model, family, None, seed), config)


def _checkpointing_lora(model: Module, family: str, ratio: float | None, seed: int | None) -> Module:
    return _checkpointing(_lora(model, family, None, seed), family, None, seed)


def _checkpointing_converted(convert_fn, model: Module, family: str, ratio: float | None, seed: int | None) -> Module:
    """Checkpointing of a model ``convert_fn`` converted: its regions recompute the forward's samples."""
    from wtacrs import checkpoint_context_fn

    model = convert_fn(model, family, ratio, seed)
    return _checkpointing(model, family, None, seed, context_fn=checkpoint_context_fn(model))


def _checkpointing_after(convert_fn):
    """``_checkpointing_converted`` of ``convert_fn``, picklable (``--jobs`` workers receive it)."""
    return functools.partial(_checkpointing_converted, convert_fn)


@dataclass(frozen=True)
class MethodEntry:
    pattern: str  # full match against the method name; group "ratio" if the method takes one
    prepare: Callable[[Module, str, float | None, int | None], Module]
    summary: str


_RATIO = r"@(?P<ratio>[0-9]*\.?[0-9]+(?:[eE]-?[0-9]+)?)"

METHODS: tuple[MethodEntry, ...] = (
    MethodEntry("full", _full, "full fine-tuning"),
    MethodEntry("lora", _lora, f"peft LoRA r={LORA_RANK} on peft's default targets"),
    MethodEntry("checkpointing", _checkpointing, "activation checkpointing of every layer"),
    MethodEntry("wtacrs" + _RATIO, _wtacrs, "WTA-CRS on Linear-Q/K/V/O/U/D, exact attention reusing P"),
    MethodEntry("wtacrs-linear" + _RATIO, _wtacrs_linear, "WTA-CRS on the Linears only"),
    MethodEntry("lora\\+wtacrs" + _RATIO, _lora_wtacrs, "LoRA, then WTA-CRS on lora_A inputs"),
    MethodEntry("checkpointing\\+lora", _checkpointing_lora, "LoRA with activation checkpointing"),
    MethodEntry("checkpointing\\+wtacrs" + _RATIO, _checkpointing_after(_wtacrs), "WTA-CRS with activation checkpointing"),
    MethodEntry("checkpointing\\+lora\\+wtacrs" + _RATIO, _checkpointing_after(_lora_wtacrs),
                "LoRA+WTA-CRS with activation checkpointing"),
)

METHOD_NAMES_HELP = (
    "full, lora, checkpointing, wtacrs@R, wtacrs-linear@R, lora+wtacrs@R, checkpointing+lora, "
    "checkpointing+wtacrs@R, checkpointing+lora+wtacrs@R (0 < R <= 1)"
)


@dataclass(frozen=True)
class Method:
    """A method name read once: its canonical spelling (``wtacrs@.30`` is ``wtacrs@0.3``), the
    table entry it matched and its ratio. Equal names are equal methods."""

    name: str
    entry: MethodEntry = field(compare=False, repr=False)
    ratio: float | None = None

    def prepare(self, model: Module, family: str, seed: int | None = 0) -> Module:
        """Apply the method to ``model`` (in place where the library allows) and return it."""
        return self.entry.prepare(model, family, self.ratio, seed)


def parse(name: str) -> Method:
    """The method a name means; MethodError says what is wrong."""
    for entry in METHODS:
        match = re.fullmatch(entry.pattern, name)
        if match is None:
            continue
        if "ratio" not in entry.pattern:
            return Method(name, entry)
        ratio = float(match["ratio"])
        if not 0 < ratio <= 1:
            raise MethodError(f"ratio {match['ratio']} is not in (0, 1]")
        return Method(f"{name.split('@')[0]}@{ratio:g}", entry, ratio)
    raise MethodError(f"unknown method {name!r}; expected one of {METHOD_NAMES_HELP}")


def prepare(name: str, model: Module, family: str, seed: int | None = 0) -> Module:
    """``parse(name).prepare(model, family, seed)``."""
    return parse(name).prepare(model, family, seed)
