"""The transformers glue: registering ``"wtacrs"`` with the attention and mask interfaces, and
switching a model to it and back."""

from __future__ import annotations

from torch import nn

from wtacrs.attention.forward import wtacrs_attention_forward
from wtacrs.attention.masks import wtacrs_mask
from wtacrs.attention.settings import NAME


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
