"""Model factory: named presets built from ``transformers`` configs with random weights.

Nothing is downloaded. A preset is a family plus the config values of a published checkpoint
(or a tiny one for tests). A suite may override any config key and sweep the block dimensions
``d_model``, ``n_head``, ``d_ff`` and ``d_head``; ``resolve_dims`` says how the unswept ones
follow the preset (``d_head = d_model / n_head``, ``d_ff`` scales with ``d_model``).

``build_model`` builds one model for one cell (on ``meta`` it allocates nothing and takes well
under a second even for T5-3B); ``make_batch`` builds the synthetic batch of that cell.
"""

from __future__ import annotations

import contextlib
import copy
import difflib
import math
import warnings
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    Gemma2Config,
    Gemma2ForCausalLM,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    GemmaConfig,
    GemmaForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PretrainedConfig,
    PreTrainedModel,
    Qwen3Config,
    Qwen3ForCausalLM,
    T5Config,
    T5ForConditionalGeneration,
)
from transformers import masking_utils

from profiler.presets import PRESETS, Preset
from wtacrs.taxonomy import FAMILIES, Family, register_family, unregister_family

DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
ATTN_IMPLEMENTATIONS = ("eager", "sdpa")
FIRST_TOKEN_ID = 3  # ids below are pad / eos / unk in every family here; synthetic tokens avoid them


TASKS = {  # what a family's head model trains -> peft's task type (make_batch gives each task its labels)
    "seq2seq": "SEQ_2_SEQ_LM",
    "classification": "SEQ_CLS",
    "causal": "CAUSAL_LM",
}


@dataclass(frozen=True)
class Architecture:
    """Everything the project knows of one model family: one entry.

    ``family`` is the wtacrs table entry (module names: which Linear is which operator, the
    attention, norm, activation and head modules); the rest says how to build and train the
    family's models. ``model_class`` is the head model trained, for ``task`` (a key of ``TASKS``).
    The other strings name config keys: ``d_head`` is None where the config has no separate head
    size (it is ``d_model / n_head``), ``d_ff`` None in a config means ``4 * d_model`` (GPT-2's
    ``n_inner``), ``n_kv_head`` the key/value head count of grouped-query attention (None: every
    head has its own). ``default_preset`` is where a suite that names only the family starts.
    """

    family: Family
    config_class: type[PretrainedConfig]
    model_class: type[PreTrainedModel]
    task: str
    default_preset: str
    d_model: str = "hidden_size"
    n_head: str = "num_attention_heads"
    d_ff: str = "intermediate_size"
    n_layers: str = "num_hidden_layers"
    d_head: str | None = None
    n_kv_head: str | None = None
    max_positions: str | None = "max_position_embeddings"
    activation: str = "hidden_act"  # the config attribute naming the MLP's activation (a key of ACT2FN)

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"Architecture.task must be one of {', '.join(TASKS)}, got {self.task!r}")

    @property
    def encoder_decoder(self) -> bool:
        return self.task == "seq2seq"

    @property
    def peft_task_type(self) -> str:
        return TASKS[self.task]

    @property
    def size_keys(self) -> tuple[str, ...]:
        """Config keys that are sizes, so must be positive integers."""
        keys = (self.d_model, self.n_head, self.d_ff, self.n_layers, self.d_head, self.max_positions, "vocab_size",
                "num_key_value_heads")
        return tuple(dict.fromkeys(k for k in keys if k))


def _decoder(family: str, config_class, model_class, default_preset: str, **names: str) -> Architecture:
    """A LLaMA-style decoder: the config names of ``LlamaConfig``, unless ``names`` says otherwise."""
    return Architecture(FAMILIES[family], config_class, model_class, "causal", default_preset,
                        **{"d_head": "head_dim", "n_kv_head": "num_key_value_heads", **names})


ARCHITECTURES: dict[str, Architecture] = {
    "t5": Architecture(
        FAMILIES["t5"], T5Config, T5ForConditionalGeneration, "seq2seq", "t5-small",
        d_model="d_model", n_head="num_heads", d_ff="d_ff", n_layers="num_layers", d_head="d_kv", max_positions=None,
        activation="dense_act_fn",  # T5Config derives it from feed_forward_proj: "gated-gelu" -> "gelu"
    ),
    "bert": Architecture(FAMILIES["bert"], BertConfig, BertForSequenceClassification, "classification", "bert-base"),
    "gpt2": Architecture(
        FAMILIES["gpt2"], GPT2Config, GPT2LMHeadModel, "causal", "gpt2",
        d_model="n_embd", n_head="n_head", d_ff="n_inner", n_layers="n_layer", max_positions="n_positions",
        activation="activation_function",
    ),
    "llama": _decoder("llama", LlamaConfig, LlamaForCausalLM, "tiny-llama"),
    "qwen3": _decoder("qwen3", Qwen3Config, Qwen3ForCausalLM, "qwen3-0.6b"),
    "gemma": _decoder("gemma", GemmaConfig, GemmaForCausalLM, "gemma-2b"),
    "gemma2": _decoder("gemma", Gemma2Config, Gemma2ForCausalLM, "gemma2-2b", activation="hidden_activation"),
    "gemma3": _decoder("gemma", Gemma3TextConfig, Gemma3ForCausalLM, "gemma3-1b", activation="hidden_activation"),
}


def register(name: str, architecture: Architecture, presets: dict[str, Preset]) -> None:
    """Add a family: its architecture under ``name``, its wtacrs table entry
    (``architecture.family``, unless registered already) and its presets, so suites can name them
    and ``wtacrs.convert`` converts its models. ``unregister(name)`` undoes it."""
    if name in ARCHITECTURES:
        raise ValueError(f"an architecture named {name!r} is registered already")
    taken = sorted(set(presets) & set(PRESETS))
    if taken:
        raise ValueError(f"preset(s) {', '.join(taken)} exist already")
    if architecture.default_preset not in presets:
        raise ValueError(f"default preset {architecture.default_preset!r} is not among the presets given")
    strangers = sorted(p for p, preset in presets.items() if preset.family != name)
    if strangers:
        raise ValueError(f"preset(s) {', '.join(strangers)} are not of the {name} family")
    register_family(architecture.family)
    ARCHITECTURES[name] = architecture
    PRESETS.update(presets)


def unregister(name: str) -> None:
    """Remove what ``register(name, ...)`` added."""
    architecture = ARCHITECTURES.pop(name)
    for preset in [p for p, preset in PRESETS.items() if preset.family == name]:
        del PRESETS[preset]
    if not any(a.family == architecture.family for a in ARCHITECTURES.values()):
        unregister_family(architecture.family.name)


@dataclass(frozen=True)
class Dims:
    d_model: int
    n_head: int
    d_ff: int
    d_head: int
    n_layers: int


class DimsError(ValueError):
    """A dimension combination the family cannot build; the message names the reason."""


def base_config(preset: str, overrides: dict[str, Any]) -> dict[str, Any]:
    """The preset's config values with the suite's overrides applied."""
    return {**PRESETS[preset].config, **overrides}


def config_keys(family: str) -> set[str]:
    """Every key the family's transformers config accepts (for "unknown key" errors)."""
    return set(ARCHITECTURES[family].config_class().to_dict())


def preset_dims(preset: str, overrides: dict[str, Any]) -> Dims:
    """The block dimensions of a preset (after config overrides), read through its config class."""
    arch = ARCHITECTURES[PRESETS[preset].family]
    config = arch.config_class(**base_config(preset, overrides))
    d_model = getattr(config, arch.d_model)
    n_head = getattr(config, arch.n_head)
    d_ff = getattr(config, arch.d_ff) or 4 * d_model
    d_head = getattr(config, arch.d_head) if arch.d_head else d_model // n_head
    return Dims(d_model, n_head, d_ff, d_head or d_model // n_head, getattr(config, arch.n_layers))


def resolve_dims(
    preset: str,
    overrides: dict[str, Any],
    *,
    d_model: int | None = None,
    n_head: int | None = None,
    d_ff: int | None = None,
    d_head: int | None = None,
) -> Dims:
    """The dimensions of one grid point; None means "follow the preset".

    ``d_head`` follows ``d_model / n_head`` once either is swept (else the preset's, e.g. T5-3B's
    128); ``d_ff`` scales with ``d_model`` by the preset's ratio. Raises DimsError when n_head does
    not divide d_model (and no d_head is given), or when the family has no separate head size.
    """
    base = preset_dims(preset, overrides)
    arch = ARCHITECTURES[PRESETS[preset].family]
    model = d_model or base.d_model
    heads = n_head or base.n_head
    if d_head is None:
        if d_model is None and n_head is None:
            d_head = base.d_head
        elif model % heads:
            raise DimsError(f"n_head {heads} does not divide d_model {model}")
        else:
            d_head = model // heads
    elif arch.d_head is None and d_head * heads != model:
        raise DimsError(
            f"d_head {d_head} x n_head {heads} != d_model {model}; {PRESETS[preset].family} has no separate head size"
        )
    if d_ff is None:
        d_ff = base.d_ff if d_model is None else max(1, round(base.d_ff * model / base.d_model))
    return Dims(model, heads, d_ff, d_head, base.n_layers)


@dataclass(frozen=True)
class ModelPoint:
    """One model at one point of its dimensions, built once when its suite is validated and shared
    by every cell there. Models built from it get a copy of ``config``: transformers writes the
    dtype and attention implementation into the config a model is built from."""

    dims: Dims
    config: PretrainedConfig  # preset, then overrides, then the grid's dimensions; no KV cache
    taxonomy: Family  # the wtacrs family table entry of the architecture


class BuildError(ValueError):
    """Why no model can be built at a grid point, in one line."""


class CellLike(Protocol):
    """What the factory reads from a cell (``profiler.suite.Cell``)."""

    family: str
    point: ModelPoint
    batch_size: int
    seq_len: int
    target_len: int | None
    dtype: str
    attn_implementation: str
    pad_fraction: float


def config_values(preset: str, overrides: dict[str, Any], dims: Dims) -> dict[str, Any]:
    """The transformers config values of one grid point: preset, then overrides, then ``dims``."""
    arch = ARCHITECTURES[PRESETS[preset].family]
    values = base_config(preset, overrides)
    values[arch.d_model] = dims.d_model
    values[arch.n_head] = dims.n_head
    values[arch.d_ff] = dims.d_ff
    if arch.d_head:
        values[arch.d_head] = dims.d_head
    if arch.n_kv_head:
        # keep the preset's grouped-query ratio where it divides the new head count
        preset_heads = preset_dims(preset, overrides).n_head
        kv = max(1, round(dims.n_head * values.get(arch.n_kv_head, preset_heads) / preset_heads))
        values[arch.n_kv_head] = kv if dims.n_head % kv == 0 else dims.n_head
    return values


@contextlib.contextmanager
def quiet_transformers():
    """Silence transformers' logging and warnings (config and deprecation chatter) in the block."""
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        hf_logging.set_verbosity(verbosity)


def config_problems(family: str, values: dict[str, Any]) -> list[tuple[str | None, str]]:
    """What a model of ``family`` built from config ``values`` would fail on, as (config key or None,
    reason) pairs: the checks its transformers config class does not make. Errors of the config
    class itself propagate."""
    from transformers.activations import ACT2FN

    arch = ARCHITECTURES[family]
    sizes = [(k, values[k]) for k in arch.size_keys if values.get(k) is not None]
    problems: list[tuple[str | None, str]] = [
        (k, f"{v!r} must be a positive integer") for k, v in sizes
        if not (isinstance(v, int) and not isinstance(v, bool) and v >= 1)
    ]
    if problems:  # the config class and the checks below divide by them
        return problems
    with quiet_transformers():
        config = arch.config_class(**values)
    d_model, n_head = getattr(config, arch.d_model), getattr(config, arch.n_head)
    kv_heads = getattr(config, "num_key_value_heads", None)
    activation = getattr(config, arch.activation, None)
    checks = [
        (arch.d_head is None and d_model % n_head != 0, None, f"n_head {n_head} does not divide d_model {d_model}"),
        (kv_heads is not None and n_head % kv_heads != 0, "num_key_value_heads",
         f"{kv_heads} does not divide {arch.n_head} {n_head}"),
        (config.vocab_size <= FIRST_TOKEN_ID, "vocab_size",
         f"{config.vocab_size} is too small; the synthetic batch draws token ids from {FIRST_TOKEN_ID}"),
        (activation is not None and activation not in ACT2FN, arch.activation, f"unknown activation {activation!r}"
         + "".join(f"; did you mean {m!r}?" for m in difflib.get_close_matches(str(activation), list(ACT2FN), 1))),
    ]
    return [(key, reason) for failed, key, reason in checks if failed]


def model_point(preset: str, overrides: dict[str, Any], dims: Dims, attn_implementation: str = "eager") -> ModelPoint:
    """The config of one grid point, checked: ``config_problems``, then a build on meta with one
    block per stack (every block of a stack is built alike, and one costs milliseconds where
    T5-3B's 48 take a tenth of a second). BuildError says why no model can be built."""
    family = PRESETS[preset].family
    arch = ARCHITECTURES[family]
    values = config_values(preset, overrides, dims)
    try:
        problems = config_problems(family, values)
        if problems:
            raise BuildError("; ".join(f"{key}: {reason}" if key else reason for key, reason in problems))
        with quiet_transformers(), torch.device("meta"):
            config = arch.config_class(**values)
            if hasattr(config, "use_cache"):
                # training builds no KV cache: transformers 5 would keep concatenated copies of K and V
                config.use_cache = False
            one_block = copy.deepcopy(config)
            for layers in (arch.n_layers, "num_decoder_layers"):  # T5 has a second stack
                if hasattr(one_block, layers):
                    setattr(one_block, layers, 1)
            arch.model_class._from_config(one_block, attn_implementation=attn_implementation)
    except BuildError:
        raise
    except Exception as e:  # noqa: BLE001 -- whatever stops the build is the answer
        raise BuildError(f"cannot build: {type(e).__name__}: {one_line(e)}") from None
    return ModelPoint(dims, config, arch.family)


def one_line(error: BaseException) -> str:
    """An exception's message on one line (transformers' config errors span several)."""
    return " ".join(str(error).split())


def max_positions(family: str, preset: str, overrides: dict[str, Any]) -> int | None:
    """The longest sequence the preset's position embeddings allow (None: no limit, e.g. T5)."""
    arch = ARCHITECTURES[family]
    if arch.max_positions is None:
        return None
    return getattr(arch.config_class(**base_config(preset, overrides)), arch.max_positions)


def build_model(cell: CellLike, device: str | torch.device) -> nn.Module:
    """A randomly initialised model for ``cell`` on ``device``, in train mode, in the cell's dtype.

    On ``meta`` the model is built under ``torch.device("meta")``: no storage, no init cost.
    Weights are seeded (``torch.manual_seed(0)``) on real devices so runs are reproducible.
    """
    arch = ARCHITECTURES[cell.family]
    config = copy.deepcopy(cell.point.config)
    dtype = DTYPES[cell.dtype]
    device = torch.device(device)
    if device.type != "meta":
        torch.manual_seed(0)
    with device:
        model = arch.model_class._from_config(config, attn_implementation=cell.attn_implementation, dtype=dtype)
    return model.train()


def tokens_per_step(cell: CellLike) -> int:
    """Tokens one training step processes: B * (S + T) for encoder-decoder models, else B * S."""
    return cell.batch_size * (cell.seq_len + (cell.target_len or 0))


def padding_length(cell: CellLike, length: int) -> int:
    """Pad tokens at the end of every row of a ``length``-token synthetic sequence (each row
    keeps at least one real token)."""
    return min(length - 1, math.floor(cell.pad_fraction * length + 0.5))


def _ids_and_mask(cell: CellLike, length: int, vocab: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(FIRST_TOKEN_ID, vocab, (cell.batch_size, length), generator=generator)
    mask = torch.ones(cell.batch_size, length, dtype=torch.long)
    pad = padding_length(cell, length)
    if pad:
        mask[:, length - pad :] = 0
        ids[:, length - pad :] = 0
    return ids, mask


def make_batch(cell: CellLike, device: str | torch.device, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """A synthetic batch for ``cell``, as keyword arguments of the model's forward.

    ``input_ids``/``attention_mask`` [B, S], and labels by the architecture's task:

    - ``seq2seq`` (t5): ``labels`` [B, T] (-100 at padding)
    - ``classification`` (bert): ``labels`` [B] (class ids)
    - ``causal`` (gpt2, llama, qwen3, gemma*): ``labels`` [B, S], the input ids (-100 at padding)

    int64 tensors, drawn on the CPU from ``generator`` (seed 0 if None) and moved to ``device``.
    Every device gets the attention mask, so the model builds its 4D masks as it does on real
    data (their bytes count). On ``meta`` run the step inside :class:`MetaMaskChecks` ``(cell)``:
    transformers reads the mask's values to decide whether a 4D mask is needed at all.
    On ``meta`` they are shapes only, made there: drawing them first would cost the CPU the real
    batch (4.5 GB at B=200000, S=512).
    """
    if torch.device(device).type == "meta":
        return {name: torch.empty(shape, dtype=torch.long, device="meta") for name, shape in _meta_shapes(cell).items()}
    if generator is None:
        generator = torch.Generator().manual_seed(0)
    config = cell.point.config
    vocab = config.vocab_size
    input_ids, attention_mask = _ids_and_mask(cell, cell.seq_len, vocab, generator)
    task = ARCHITECTURES[cell.family].task
    if task == "seq2seq":
        labels, label_mask = _ids_and_mask(cell, cell.target_len or cell.seq_len, vocab, generator)
        labels = labels.masked_fill(label_mask == 0, -100)
    elif task == "classification":
        labels = torch.randint(0, config.num_labels, (cell.batch_size,), generator=generator)
    else:
        labels = input_ids.masked_fill(attention_mask == 0, -100)
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
    return {name: tensor.to(device) for name, tensor in batch.items()}


class MetaMaskChecks:
    """Answers the questions transformers asks of a ``make_batch`` mask's values, on meta.

    From a 2D attention mask, transformers' mask builders decide whether a 4D mask is needed:
    ``masking_utils._ignore_causal_mask_sdpa`` (SDPA's ``is_causal`` instead of a mask) and
    ``_ignore_bidirectional_mask_sdpa`` (no mask without padding) call ``.all()`` on it, which a
    meta tensor cannot answer. (Without a mask, ``find_packed_sequence_indices`` asks the same of
    the position ids; ``make_batch`` always passes the mask.) Every row of the synthetic batch
    pads the same tail and the profiler builds no KV cache, so queries and keys have the same
    length and one fact of the cell answers both checks: is any key padding? With none, a meta
    mask gets transformers' answer for no mask (which reads no values); with some, False --
    transformers' answer for a mask with pads among its first ``q_length`` keys. Masks on other
    devices are answered by the original functions, which are restored on exit.
    """

    def __init__(self, cell: CellLike) -> None:
        self.padded = padding_length(cell, cell.seq_len) > 0
        self._originals: dict[str, Any] = {}

    def __enter__(self) -> MetaMaskChecks:
        for name in ("_ignore_causal_mask_sdpa", "_ignore_bidirectional_mask_sdpa"):
            original = self._originals[name] = getattr(masking_utils, name)
            setattr(masking_utils, name, self._answer(original))
        return self

    def __exit__(self, *exc) -> None:
        for name, original in self._originals.items():
            setattr(masking_utils, name, original)
        self._originals.clear()

    def _answer(self, original):
        def check(padding_mask, *args, **kwargs):
            if padding_mask is None or padding_mask.device.type != "meta":
                return original(padding_mask, *args, **kwargs)
            return not self.padded and original(None, *args, **kwargs)

        return check


def _meta_shapes(cell: CellLike) -> dict[str, tuple[int, ...]]:
    """The shapes of ``make_batch``'s tensors."""
    labels = {"seq2seq": (cell.batch_size, cell.target_len or cell.seq_len), "classification": (cell.batch_size,)}
    return {"input_ids": (cell.batch_size, cell.seq_len), "attention_mask": (cell.batch_size, cell.seq_len),
            "labels": labels.get(ARCHITECTURES[cell.family].task, (cell.batch_size, cell.seq_len))}
