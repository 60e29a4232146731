"""``wtacrs.convert``: make a stock Hugging Face model (or a peft LoRA model) use WTA-CRS ops.

What gets replaced is decided by the per-family table in :mod:`wtacrs.taxonomy`:

- every trainable Linear (or GPT-2 ``Conv1D``) that implements an enabled Linear-Q/K/V/O/U/D
  becomes a :class:`~wtacrs.modules.WTACRSLinear` / ``WTACRSConv1D`` sharing its parameters;
  under peft LoRA only the ``lora_A`` layers are sampled (frozen base layers store no input);
- attention goes through the ``"wtacrs"`` attention function registered with transformers'
  ``AttentionInterface`` (sampled TensorMul-1/-2, lossless attention dropout);
- with ``lossless=True``, ``nn.Dropout`` keeps 1-bit masks and activations keep a 1-bit mask
  (ReLU) or only their input (GeLU, SiLU);
- the model's ``forward`` is wrapped so the batch's token masks reach the sampling
  probabilities (padding tokens get probability 0) while the user calls the model as usual.

Parameters are never copied: state-dict keys, optimizer state and ``requires_grad`` flags are
unchanged. :func:`revert` puts every original module back.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from wtacrs.config import WTACRSConfig
from wtacrs.gradnorm import PositionGradNorms, token_mask
from wtacrs.modules import Generators, LeanNorm, LosslessActivation, LosslessDropout, SampleShare, WTACRSConv1D, WTACRSLinear
from wtacrs.taxonomy import Family, Operator, family_of

_STATE = "_wtacrs_state"
ACTIVATION_CLASS_NAMES = ("ReLU", "GELU", "GELUActivation", "NewGELUActivation", "FastGELUActivation", "SiLU", "SiLUActivation", "GELUTanh")


@dataclass
class _ConversionState:
    config: WTACRSConfig
    family: Family
    replaced: list[tuple[nn.Module, str, nn.Module]] = field(default_factory=list)
    attention_modules: list[nn.Module] = field(default_factory=list)
    share: SampleShare = field(default_factory=SampleShare)
    positions: PositionGradNorms = field(default_factory=PositionGradNorms)
    generators: Generators | None = None
    own_forward: object = None  # an instance-level forward installed before us (accelerate hooks)


def _derived_seed() -> int:
    """A seed that follows ``torch.manual_seed`` but is not the default generator's own seed.

    Reusing that seed would replay the dropout stream for the sampling draws; both must stay
    independent for the estimate to stay unbiased.
    """
    return int(torch.randint(2**62, (), generator=torch.Generator().manual_seed(torch.initial_seed())))


def _is_conv1d(module: nn.Module) -> bool:
    return type(module) is Conv1D


def _strip_peft_prefix(name: str) -> str:
    for prefix in ("base_model.model.", "base_model."):
        if name.startswith(prefix):
            return name[len(prefix) :]
    return name


def _hf_model(model: nn.Module) -> nn.Module:
    """The transformers model inside a peft wrapper (or the model itself)."""
    if hasattr(model, "get_base_model"):
        return model.get_base_model()
    return model


def _stream(family: Family, name: str) -> str:
    """Which token mask a linear at ``name`` reads (its input's tokens)."""
    if family.decoder is None:
        return "default"
    if family.is_cross_attention(name) and not name.split(".")[-1].startswith("q"):
        return "encoder"  # cross-attention K/V read the encoder's output
    return "decoder" if family.is_decoder(name) else "encoder"


def _group(family: Family, name: str, operator) -> str:
    """The layers that read one input share a sample and a :class:`PositionGradNorms` group:
    Linear-Q/K/V of one attention module on one token stream, the Linear-Us of one MLP."""
    role = "qkv" if operator in (Operator.LINEAR_Q, Operator.LINEAR_K, Operator.LINEAR_V, Operator.LINEAR_QKV) else operator.value
    parent = name.rsplit(".", 1)[0] if "." in name else ""
    return f"{parent}:{_stream(family, name)}:{role}"


def convert(model: nn.Module, config: WTACRSConfig | None = None) -> nn.Module:
    """Convert ``model`` in place to WTA-CRS ops and return it. See the module docstring."""
    config = WTACRSConfig() if config is None else config
    if not isinstance(config, WTACRSConfig):
        raise TypeError(f"config must be a WTACRSConfig, got {type(config).__name__}")
    hf_model = _hf_model(model)
    if getattr(hf_model, _STATE, None) is not None:
        raise ValueError("model is already converted; call wtacrs.revert(model) first")
    family = family_of(hf_model)
    state = _ConversionState(config=config, family=family)
    # sampling never draws from torch's default generator: the converted model consumes it as the
    # original does, so the same seed gives the same dropout masks
    state.generators = Generators(config.seed if config.seed is not None else _derived_seed())

    sampling = dict(
        ratio=config.ratio,
        min_k=config.min_k,
        generator=state.generators,
        share=state.share,
        use_grad_norm=config.probability == "auto",
        recompute_rows=config.lean_norm,
    )
    for name, module in list(model.named_modules()):
        qualified = _strip_peft_prefix(name)
        if hasattr(module, "lora_A") and hasattr(module, "base_layer"):
            operator = family.linear_operator(qualified)
            if operator is None or not config.samples(operator):
                continue
            for adapter, lora_a in list(module.lora_A.items()):
                if isinstance(lora_a, nn.Linear) and lora_a.weight.requires_grad:
                    positions = (state.positions, f"{_group(family, qualified, operator)}:lora_A.{adapter}")
                    new = WTACRSLinear(
                        lora_a, stream=_stream(family, qualified), key=f"{qualified}.lora_A.{adapter}", positions=positions, **sampling
                    )
                    _replace(state, module.lora_A, adapter, new)
            continue
        for child_name, child in list(module.named_children()):
            child_qualified = f"{qualified}.{child_name}" if qualified else child_name
            _convert_child(state, module, child_name, child, child_qualified, sampling)

    if config.tm1 or config.tm2:  # with both off the attention function would only fall back
        _enable_attention(state, hf_model)
    state.own_forward = hf_model.__dict__.get("forward")
    object.__setattr__(hf_model, _STATE, state)
    hf_model.forward = _masked_forward(hf_model, hf_model.forward, state)
    return model


def _convert_child(state, parent, child_name, child, qualified, sampling) -> None:
    family, config = state.family, state.config
    if type(child) is nn.Linear or _is_conv1d(child):  # subclasses (converted, quantized) are left alone
        operator = family.linear_operator(qualified)
        if operator is None or not config.samples(operator) or not child.weight.requires_grad:
            return
        cls = WTACRSConv1D if _is_conv1d(child) else WTACRSLinear
        positions = (state.positions, _group(family, qualified, operator))
        _replace(state, parent, child_name, cls(child, stream=_stream(family, qualified), key=qualified, positions=positions, **sampling))
    elif config.lean_norm and re.search(rf"(^|\.)(?:{family.layernorm})$", qualified) and hasattr(child, "weight"):
        _replace(state, parent, child_name, LeanNorm(child))
    elif config.lossless and type(child) is nn.Dropout and child.p > 0:
        _replace(state, parent, child_name, LosslessDropout(child))
    elif config.lossless and type(child).__name__ in ACTIVATION_CLASS_NAMES:
        _replace(state, parent, child_name, LosslessActivation(child))


def _replace(state: _ConversionState, parent: nn.Module, name: str, new: nn.Module) -> None:
    original = getattr(parent, name)
    new.train(original.training)
    setattr(parent, name, new)
    state.replaced.append((parent, name, original))


def _enable_attention(state: _ConversionState, hf_model: nn.Module) -> None:
    from wtacrs import attention

    config, family = state.config, state.family

    def settings_for(name: str, module: nn.Module):
        return attention.AttentionSettings(
            ratio=config.ratio,
            min_k=config.min_k,
            tm1=config.tm1,
            tm2=config.tm2,
            tm2_v=config.tm2_v,
            lossless_dropout=config.lossless,
            fallback=module.config._attn_implementation or "eager",
            generator=state.generators,
            query_stream=None if not config.probability == "auto" else _stream(family, f"{name}.q"),
            probabilities="attention" if config.probability == "auto" else "activation",
        )

    state.attention_modules = attention.enable(hf_model, settings_for)


def _token_masks(family: Family, kwargs: dict) -> dict[str, torch.Tensor | None]:
    """Per-stream masks of the tokens whose output gradient can be nonzero.

    Encoder / decoder-only tokens: the attention mask (padding keys are masked, so a pad token
    reaches the loss only through its own output, which standard collators label -100).
    T5 decoder tokens: position t has a zero gradient when every label from t on is -100.
    """
    attention_mask = kwargs.get("attention_mask")
    if family.decoder is None:
        return {"default": attention_mask}
    masks = {"encoder": attention_mask}
    labels = kwargs.get("labels")
    if labels is not None and labels.device.type != "meta":
        real = (labels != -100).flip(-1).cumsum(-1).flip(-1) > 0
        masks["decoder"] = real
    else:
        masks["decoder"] = kwargs.get("decoder_attention_mask")
    return masks


def _masked_forward(hf_model: nn.Module, forward, state: _ConversionState):
    @functools.wraps(forward)
    def masked_forward(*args, **kwargs):
        if not (hf_model.training and torch.is_grad_enabled()):
            return forward(*args, **kwargs)
        masks = {k: v for k, v in _token_masks(state.family, kwargs).items() if v is not None and v.device.type != "meta"}
        try:
            with token_mask(**masks):
                return forward(*args, **kwargs)
        finally:
            state.share.clear()

    return masked_forward


def revert(model: nn.Module) -> nn.Module:
    """Undo :func:`convert`: put back every original module and attention implementation."""
    hf_model = _hf_model(model)
    state: _ConversionState | None = getattr(hf_model, _STATE, None)
    if state is None:
        raise ValueError("model is not converted by wtacrs.convert")
    for parent, name, original in reversed(state.replaced):
        current = getattr(parent, name)
        original.train(current.training)
        setattr(parent, name, original)
    if state.attention_modules:
        from wtacrs import attention

        attention.disable(hf_model)
    del hf_model.forward
    if state.own_forward is not None:
        hf_model.forward = state.own_forward
    object.__delattr__(hf_model, _STATE)
    return model


def is_converted(model: nn.Module) -> bool:
    return getattr(_hf_model(model), _STATE, None) is not None
