"""The operator taxonomy of a transformer block and the per-family module tables.

One table answers "which operator of the WTA-CRS figure is this module?" for every supported
model family. The converter uses it to decide what to replace; the profiler uses it to attribute
saved activations. Adding a family is one ``Family(...)``: an entry in ``FAMILIES`` here, or
:func:`register_family` from outside (the profiler's ``profiler.models.register`` carries one).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from enum import Enum

from torch import nn


class Operator(str, Enum):
    """Operators of a transformer block (the poster's figure), plus the parts around the blocks."""

    LINEAR_Q = "Linear-Q"
    LINEAR_K = "Linear-K"
    LINEAR_V = "Linear-V"
    LINEAR_QKV = "Linear-QKV"  # a fused projection (GPT-2's c_attn)
    LINEAR_O = "Linear-O"
    LINEAR_U = "Linear-U"  # up / gate / wi / wi_0 / wi_1 / intermediate
    LINEAR_D = "Linear-D"  # down / wo / output
    TENSORMUL_1 = "TensorMul-1"  # Q K^T
    TENSORMUL_2 = "TensorMul-2"  # P V
    SOFTMAX = "Softmax"
    DROPOUT = "Dropout"
    ACTIVATION = "Activation"  # GeLU / ReLU / SiLU
    LAYERNORM = "LayerNorm"
    EMBEDDING = "Embedding"
    HEAD_LOSS = "Head/Loss"
    OTHER = "Other"


class Category(str, Enum):
    """How an operator's saved activation is treated."""

    SAMPLED = "sampled"  # k of n rows kept (WTA-CRS)
    LOSSLESS = "lossless"  # compressed without loss (bit-packed masks, shared inputs)
    UNCOMPRESSED = "uncompressed"  # stored as the exact op stores it


LINEAR_OPERATORS = frozenset(
    {
        Operator.LINEAR_Q,
        Operator.LINEAR_K,
        Operator.LINEAR_V,
        Operator.LINEAR_QKV,
        Operator.LINEAR_O,
        Operator.LINEAR_U,
        Operator.LINEAR_D,
    }
)


# Class names of the activation modules (torch's and transformers') that the converter replaces by
# their lossless versions.
ACTIVATIONS = ("ReLU", "GELU", "GELUActivation", "NewGELUActivation", "FastGELUActivation", "SiLU", "SiLUActivation",
               "GELUTanh")
# The last name part of the modules around the blocks that turn hidden states into the loss.
HEADS = r"lm_head|classifier|score|qa_outputs|pooler|cls"


def is_head(qualified_name: str, heads: str = HEADS) -> bool:
    """Whether the last part of ``qualified_name`` names a head module (``heads``: a regex)."""
    return re.fullmatch(heads, qualified_name.rsplit(".", 1)[-1]) is not None


@dataclass(frozen=True)
class Family:
    """Module names of one architecture family.

    ``linears`` maps a regular expression, matched against the end of a module's qualified name,
    to the operator that module implements. ``attention`` matches the attention modules (the ones
    that call the attention function), and ``encoder``/``decoder`` tell which token mask a module
    reads in an encoder-decoder model. ``softmax`` says how the family's eager attention runs
    its softmax, so the sampled attention reproduces it bit for bit: ``"plain"`` (in the scores'
    dtype), ``"fp32"`` (in fp32, then cast to the query dtype) or ``"to_value"`` (cast to V's
    dtype); ``contiguous_output`` whether it returns ``attn_output.transpose(1, 2).contiguous()``.
    ``layernorm`` matches the norms (made lean by the converter), ``activations`` are the class
    names of the MLP's activation modules (made lossless) and ``heads`` matches the last name
    part of the head modules (attributed to Head/Loss by the profiler). ``loss_layouts`` names
    the model classes whose forward is ``logits = lm_head(h)`` followed by the layout's loss
    (``"seq2seq"`` or ``"causal"``, see :class:`wtacrs.loss.LossLayout`) and nothing else, so
    :func:`wtacrs.chunked_loss` may compute it in chunks; a class that post-processes its logits
    (Gemma 2/3's final-logit softcapping) must not be listed.
    """

    name: str
    model_types: tuple[str, ...]
    linears: dict[str, Operator]
    attention: str
    layernorm: str
    decoder: str | None = None
    cross_attention: str | None = None
    softmax: str = "plain"
    contiguous_output: bool = True
    activations: tuple[str, ...] = ACTIVATIONS
    heads: str = HEADS
    loss_layouts: dict[str, str] = field(default_factory=dict)
    _compiled: list[tuple[re.Pattern[str], Operator]] = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.softmax not in ("plain", "fp32", "to_value"):
            raise ValueError(f"Family.softmax must be 'plain', 'fp32' or 'to_value', got {self.softmax!r}")
        bad = sorted(set(self.loss_layouts.values()) - {"seq2seq", "causal"})  # wtacrs.loss.LossLayout
        if bad:
            raise ValueError(f"Family.loss_layouts values must be 'seq2seq' or 'causal', got {bad}")
        compiled = [(re.compile(rf"(^|\.)(?:{pattern})$"), op) for pattern, op in self.linears.items()]
        object.__setattr__(self, "_compiled", compiled)

    def linear_operator(self, qualified_name: str) -> Operator | None:
        """The operator of the Linear (or Conv1D) module at ``qualified_name``, or None."""
        for pattern, op in self._compiled:
            if pattern.search(qualified_name):
                return op
        return None

    def is_attention(self, qualified_name: str) -> bool:
        return re.search(rf"(^|\.)(?:{self.attention})$", qualified_name) is not None

    def is_layernorm(self, qualified_name: str) -> bool:
        return re.search(rf"(^|\.)(?:{self.layernorm})$", qualified_name) is not None

    def is_head(self, qualified_name: str) -> bool:
        return is_head(qualified_name, self.heads)

    def is_activation(self, module: nn.Module) -> bool:
        return type(module).__name__ in self.activations

    def is_decoder(self, qualified_name: str) -> bool:
        """True when the module reads decoder tokens (encoder-decoder families only)."""
        return self.decoder is not None and re.search(rf"(^|\.)(?:{self.decoder})(\.|$)", qualified_name) is not None

    def is_cross_attention(self, qualified_name: str) -> bool:
        return self.cross_attention is not None and re.search(
            rf"(^|\.)(?:{self.cross_attention})(\.|$)", qualified_name
        ) is not None


_LLAMA_LINEARS = {
    r"self_attn\.q_proj": Operator.LINEAR_Q,
    r"self_attn\.k_proj": Operator.LINEAR_K,
    r"self_attn\.v_proj": Operator.LINEAR_V,
    r"self_attn\.o_proj": Operator.LINEAR_O,
    r"mlp\.(gate_proj|up_proj)": Operator.LINEAR_U,
    r"mlp\.down_proj": Operator.LINEAR_D,
}


FAMILIES: dict[str, Family] = {
    "t5": Family(
        name="t5",
        model_types=("t5", "mt5", "umt5"),
        linears={
            r"(SelfAttention|EncDecAttention)\.q": Operator.LINEAR_Q,
            r"(SelfAttention|EncDecAttention)\.k": Operator.LINEAR_K,
            r"(SelfAttention|EncDecAttention)\.v": Operator.LINEAR_V,
            r"(SelfAttention|EncDecAttention)\.o": Operator.LINEAR_O,
            r"DenseReluDense\.(wi|wi_0|wi_1)": Operator.LINEAR_U,
            r"DenseReluDense\.wo": Operator.LINEAR_D,
        },
        attention=r"SelfAttention|EncDecAttention",
        layernorm=r"layer_norm|final_layer_norm",
        decoder=r"decoder",
        cross_attention=r"EncDecAttention",
        loss_layouts={f"{prefix}ForConditionalGeneration": "seq2seq" for prefix in ("T5", "MT5", "UMT5")},
    ),
    "bert": Family(
        name="bert",
        model_types=("bert", "roberta"),
        linears={
            r"attention\.self\.query": Operator.LINEAR_Q,
            r"attention\.self\.key": Operator.LINEAR_K,
            r"attention\.self\.value": Operator.LINEAR_V,
            r"attention\.output\.dense": Operator.LINEAR_O,
            r"intermediate\.dense": Operator.LINEAR_U,
            r"layer\.\d+\.output\.dense": Operator.LINEAR_D,
        },
        attention=r"attention\.self",
        layernorm=r"LayerNorm",
    ),
    "gpt2": Family(
        name="gpt2",
        model_types=("gpt2",),
        linears={
            r"attn\.c_attn": Operator.LINEAR_QKV,
            r"attn\.c_proj": Operator.LINEAR_O,
            r"mlp\.c_fc": Operator.LINEAR_U,
            r"mlp\.c_proj": Operator.LINEAR_D,
        },
        attention=r"attn",
        layernorm=r"ln_1|ln_2|ln_f",
        softmax="to_value",
        contiguous_output=False,
        loss_layouts={"GPT2LMHeadModel": "causal"},
    ),
    "llama": Family(
        name="llama",
        model_types=("llama", "mistral", "qwen2"),
        linears=_LLAMA_LINEARS,
        attention=r"self_attn",
        layernorm=r"input_layernorm|post_attention_layernorm|norm",
        softmax="fp32",
        loss_layouts={f"{prefix}ForCausalLM": "causal" for prefix in ("Llama", "Mistral", "Qwen2")},
    ),
    # LLaMA's block with an RMSNorm on each head's queries and keys (q_norm / k_norm)
    "qwen3": Family(
        name="qwen3",
        model_types=("qwen3",),
        linears=_LLAMA_LINEARS,
        attention=r"self_attn",
        layernorm=r"input_layernorm|post_attention_layernorm|norm|q_norm|k_norm",
        softmax="fp32",
        loss_layouts={"Qwen3ForCausalLM": "causal"},
    ),
    # Gemma 1-3 (text): RMSNorm scaled by (1 + weight), gelu_pytorch_tanh gated MLP, Gemma 2's
    # logit softcapping and pre/post feed-forward norms, Gemma 2/3's sliding windows (in the
    # mask) and query_pre_attn_scalar (in the scaling), Gemma 3's q_norm / k_norm
    "gemma": Family(
        name="gemma",
        model_types=("gemma", "gemma2", "gemma3_text"),
        linears=_LLAMA_LINEARS,
        attention=r"self_attn",
        layernorm=r"input_layernorm|post_attention_layernorm|pre_feedforward_layernorm|post_feedforward_layernorm|norm|q_norm|k_norm",
        softmax="fp32",
    ),
}
_BUILT_IN = frozenset(FAMILIES)


class UnsupportedModelError(ValueError):
    pass


def register_family(family: Family) -> Family:
    """Add ``family`` to ``FAMILIES``, so :func:`wtacrs.convert` and the profiler know its models.

    Registering the same entry again is a no-op; a different entry under a taken name, or one
    claiming a model type that another family has, is a ValueError.
    """
    if FAMILIES.get(family.name) == family:
        return family
    if family.name in FAMILIES:
        raise ValueError(f"a family named {family.name!r} is registered already")
    for other in FAMILIES.values():
        taken = set(other.model_types) & set(family.model_types)
        if taken:
            raise ValueError(f"model type(s) {', '.join(sorted(taken))} belong to the {other.name} family")
    FAMILIES[family.name] = family
    return family


def unregister_family(name: str) -> None:
    """Remove a family added by :func:`register_family` (KeyError if there is none; ValueError
    for a family the package ships)."""
    if name in _BUILT_IN:
        raise ValueError(f"{name!r} is a family wtacrs ships; only a registered family can be removed")
    del FAMILIES[name]


def family_for_model_type(model_type: str | None) -> Family | None:
    """The family whose ``model_types`` hold ``model_type`` (a config's ``model_type``), or None."""
    return next((family for family in FAMILIES.values() if model_type in family.model_types), None)


def family_of(model: nn.Module) -> Family:
    """The family of a transformers model (peft wrappers are looked through)."""
    config = getattr(model, "config", None)
    if config is None and hasattr(model, "get_base_model"):
        config = getattr(model.get_base_model(), "config", None)
    model_type = getattr(config, "model_type", None)
    family = family_for_model_type(model_type)
    if family is not None:
        return family
    supported = ", ".join(f"{f.name} ({'/'.join(f.model_types)})" for f in FAMILIES.values())
    raise UnsupportedModelError(
        f"unsupported model type {model_type!r} ({type(model).__name__}); supported families: {supported}"
    )
