"""``wtacrs.convert``: make a stock Hugging Face model (or a peft LoRA model) use WTA-CRS ops.

What gets replaced is decided by the per-family table in :mod:`wtacrs.taxonomy`:

- every trainable Linear (or GPT-2 ``Conv1D``) that implements an enabled Linear-Q/K/V/O/U/D
  becomes a :class:`~wtacrs.modules.WTACRSLinear` / ``WTACRSConv1D`` sharing its parameters;
  under peft LoRA only the ``lora_A`` layers are sampled (frozen base layers store no input);
- attention goes through the ``"wtacrs"`` attention function registered with transformers'
  ``AttentionInterface`` (sampled TensorMul-1/-2, lossless attention dropout);
- with ``lossless=True``, ``nn.Dropout`` keeps 1-bit masks and activations keep a 1-bit mask
  (ReLU) or only their input (GeLU, SiLU);
- two forward hooks on the model (module-level functions, no closure over the instance) make
  the batch's token masks reach the sampling probabilities (padding tokens get the small
  gradient-norm proxy :data:`~wtacrs.gradnorm.GRAD_NORM_FLOOR`, never 0) while the user calls
  the model as usual, and take the sample ids that :meth:`wtacrs.GradNormCache.collator` puts
  in the batch.

Parameters are never copied: state-dict keys, optimizer state and ``requires_grad`` flags are
unchanged. The model gets its own copies of the config objects its modules read, so converting
it changes nothing another model holds. ``copy.deepcopy`` and ``torch.save`` of a converted model
give an independent converted model. :func:`revert` puts every original module and config back.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import os
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle
from transformers import PretrainedConfig
from transformers.pytorch_utils import Conv1D

from wtacrs.config import WTACRSConfig
from wtacrs.gradnorm import SAMPLE_IDS_KEY, PositionGradNorms, token_mask
from wtacrs.modules import LeanNorm, LosslessActivation, LosslessDropout, SampleShare, WTACRSConv1D, WTACRSLinear
from wtacrs.rng import GeneratorPool
from wtacrs.taxonomy import Family, Operator, family_of

_STATE = "_wtacrs_state"


@dataclass
class _ConversionState:
    """What :func:`convert` did to a model, kept on it so :func:`revert` can undo it.

    Everything here is a plain value or a part of the model, so ``copy.deepcopy`` and pickling
    the model carry it over: the copy's state points at the copy's modules.
    """

    config: WTACRSConfig  # as applied: the seed resolved
    family: Family
    replaced: list[tuple[nn.Module, str, nn.Module]] = field(default_factory=list)
    attention_modules: list[nn.Module] = field(default_factory=list)
    configs: list[tuple[nn.Module, PretrainedConfig]] = field(default_factory=list)  # (module, its config before)
    share: SampleShare = field(default_factory=SampleShare)
    positions: PositionGradNorms = field(default_factory=PositionGradNorms)
    generators: GeneratorPool | None = None  # the one pool every sampled op of the model draws from (wtacrs.rng)
    hooks: list[RemovableHandle] = field(default_factory=list)
    scopes: list[contextlib.ExitStack] = field(default_factory=list)  # open during a forward only

    def __getstate__(self) -> dict:
        return {**self.__dict__, "scopes": []}


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
    """Convert ``model`` in place to WTA-CRS ops and return it. See the module docstring.

    The config as applied (with the seed :func:`convert` derived when ``config.seed`` is None)
    is what :func:`save_pretrained` writes, so converting a reloaded model with it gives the same
    conversion.
    """
    config = WTACRSConfig() if config is None else config
    if not isinstance(config, WTACRSConfig):
        raise TypeError(f"config must be a WTACRSConfig, got {type(config).__name__}")
    hf_model = _hf_model(model)
    if getattr(hf_model, _STATE, None) is not None:
        raise ValueError("model is already converted; call wtacrs.revert(model) first")
    family = family_of(hf_model)
    # sampling never draws from torch's default generator: the converted model consumes it as the
    # original does, so the same seed gives the same dropout masks
    seed = config.seed if config.seed is not None else _derived_seed()
    state = _ConversionState(config=dataclasses.replace(config, seed=seed), family=family)
    state.generators = GeneratorPool(seed)

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

    if _attention_saves_memory(config, hf_model):
        _own_configs(state, hf_model)
        _enable_attention(state, hf_model)
    object.__setattr__(hf_model, _STATE, state)
    state.hooks = [
        hf_model.register_forward_pre_hook(_before_forward, with_kwargs=True),
        hf_model.register_forward_hook(_after_forward, always_call=True),
    ]
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
    elif config.lean_norm and family.is_layernorm(qualified) and hasattr(child, "weight"):
        _replace(state, parent, child_name, LeanNorm(child))
    elif config.lossless and type(child) is nn.Dropout and child.p > 0:
        _replace(state, parent, child_name, LosslessDropout(child))
    elif config.lossless and family.is_activation(child):
        _replace(state, parent, child_name, LosslessActivation(child))


def _replace(state: _ConversionState, parent: nn.Module, name: str, new: nn.Module) -> None:
    original = getattr(parent, name)
    new.train(original.training)
    setattr(parent, name, new)
    state.replaced.append((parent, name, original))


def _own_configs(state: _ConversionState, hf_model: nn.Module) -> None:
    """Point every module of ``hf_model`` at its own copy of the config object it reads.

    Switching the attention implementation writes to these configs; a config object is often
    shared (``_from_config(cfg)`` keeps ``cfg``, and so does every model built from it), and the
    copies keep that write from reaching other models. One memo for all copies keeps sub-configs
    shared within the model as they were.
    """
    memo: dict = {}
    for module in hf_model.modules():
        cfg = module.__dict__.get("config")
        if isinstance(cfg, PretrainedConfig):
            state.configs.append((module, cfg))
            module.config = copy.deepcopy(cfg, memo)


def _attention_saves_memory(config: WTACRSConfig, hf_model: nn.Module) -> bool:
    """Whether the ``"wtacrs"`` attention stores less than the model's own. With both TensorMuls
    off it would only fall back. Exact (TensorMul-1 off, V stored), it drops eager's copy of
    ``dropout(P)`` and its dropout mask; SDPA's fused kernels store no ``P`` at all, so an SDPA
    model keeps SDPA then."""
    from wtacrs import attention

    if not (config.tm1 or config.tm2):
        return False
    return config.samples_attention or attention.current_implementation(hf_model) in ("eager", attention.NAME)


def _enable_attention(state: _ConversionState, hf_model: nn.Module) -> None:
    from wtacrs import attention

    config, family = state.config, state.family

    def settings_for(name: str, module: nn.Module):
        implementation = module.config._attn_implementation or "eager"
        if implementation == attention.NAME:  # not converted: the "wtacrs" function runs eager for it
            implementation = "eager"
        return attention.AttentionSettings(
            config,
            fallback=implementation,
            generator=state.generators,
            query_stream=_stream(family, f"{name}.q"),
        )

    state.attention_modules = attention.enable(hf_model, settings_for)


def _token_masks(family: Family, kwargs: dict) -> dict[str, torch.Tensor | None]:
    """Per-stream masks of the tokens that are not padding (the pads get a small, nonzero
    gradient-norm proxy from :func:`wtacrs.gradnorm.token_grad_norm`).

    Encoder / decoder-only tokens: the attention mask (padding keys are masked, so a pad token
    reaches the loss only through its own output: through a pooler or a last-token head, or
    not at all where collators label it -100). T5 decoder tokens: position t reaches the
    standard loss only when some label from t on is not -100.
    """
    attention_mask = kwargs.get("attention_mask")
    if family.decoder is None:
        return {"default": attention_mask}
    masks = {"encoder": attention_mask}
    labels = kwargs.get("labels")
    if labels is not None:
        real = (labels != -100).flip(-1).cumsum(-1).flip(-1) > 0
        masks["decoder"] = real
    else:
        masks["decoder"] = kwargs.get("decoder_attention_mask")
    return masks


def _before_forward(hf_model: nn.Module, args: tuple, kwargs: dict):
    """Forward pre-hook of a converted model (receives the model, so copies need no rebinding).

    It takes the sample ids :meth:`wtacrs.GradNormCache.collator` put in the batch out of
    ``kwargs`` (the model's own forward never sees them) and, in a training forward, opens the
    scope in which the sampled layers read the batch's token masks and cached gradient norms.
    :func:`_after_forward` closes it.
    """
    state: _ConversionState = getattr(hf_model, _STATE)
    sample_ids = kwargs.pop(SAMPLE_IDS_KEY, None)
    scope = contextlib.ExitStack()
    state.scopes.append(scope)  # closed by _after_forward, which also runs when this hook raises
    if hf_model.training and torch.is_grad_enabled():
        # meta masks too: the sampling ignores their values there, but a meta estimate must build
        # and keep them as a real step does (T5's decoder mask is new, alive until backward)
        masks = {k: v for k, v in _token_masks(state.family, kwargs).items() if v is not None}
        scope.enter_context(token_mask(**masks))
        if sample_ids is not None:
            scope.enter_context(sample_ids.batch())
    return args, kwargs


def _after_forward(hf_model: nn.Module, args: tuple, output):
    """Forward hook (``always_call``: it also runs when the forward raises)."""
    state: _ConversionState = getattr(hf_model, _STATE)
    if state.scopes:
        state.scopes.pop().close()
    state.share.clear()


def revert(model: nn.Module) -> nn.Module:
    """Undo :func:`convert`: put back every original module and attention implementation."""
    hf_model, state = _hf_model(model), conversion_state(model)
    for parent, name, original in reversed(state.replaced):
        current = getattr(parent, name)
        original.train(current.training)
        setattr(parent, name, original)
    for module in state.attention_modules:
        del module.wtacrs_attention
    for module, cfg in state.configs:  # the configs from before, never written to
        module.config = cfg
    for handle in state.hooks:
        handle.remove()
    object.__delattr__(hf_model, _STATE)
    return model


def is_converted(model: nn.Module) -> bool:
    return getattr(_hf_model(model), _STATE, None) is not None


def conversion_state(model: nn.Module) -> _ConversionState:
    """What :func:`convert` did to ``model`` (its generator pool, sample share, ...); ValueError if nothing."""
    state = getattr(_hf_model(model), _STATE, None)
    if state is None:
        raise ValueError("model is not converted by wtacrs.convert")
    return state


def save_pretrained(model: nn.Module, save_directory: str | os.PathLike, **kwargs) -> None:
    """``model.save_pretrained(save_directory, **kwargs)`` plus the conversion's ``wtacrs_config.json``.

    The state-dict keys of a converted model are the stock model's, so the directory loads into
    a stock model; converting that with ``WTACRSConfig.from_pretrained(save_directory)`` repeats
    this conversion (same replaced modules, same seed)::

        wtacrs.save_pretrained(model, "out")
        model = wtacrs.convert(AutoModel.from_pretrained("out"), wtacrs.WTACRSConfig.from_pretrained("out"))
    """
    try:
        state = conversion_state(model)
    except ValueError:
        raise ValueError("model is not converted by wtacrs.convert; save it with model.save_pretrained") from None
    model.save_pretrained(save_directory, **kwargs)
    state.config.save_pretrained(save_directory)
