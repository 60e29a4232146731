"""The tests' one tiny-model factory: a ``profiler.models`` preset, shrunk, with random weights.

:data:`MODELS` is the table of every model a test names: the profiler preset it starts from,
another model type of that family where the test needs one (mT5, RoBERTa, Mistral, ...), and
the config values that make it interesting (softcaps, sliding windows). :func:`tiny_model`
builds one at test size (``d_model`` 16 unless asked, every block dimension set through
``profiler.models.config_values``); :func:`tiny_batch` builds a batch for it.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
import transformers as tf

from profiler.models import ARCHITECTURES, PRESETS, Dims, config_values, quiet_transformers


@dataclass(frozen=True)
class Tiny:
    """One model of :data:`MODELS`: a profiler preset, optionally another model type of its family
    (its own transformers config and model classes, the preset's values), and config values."""

    preset: str
    model_type: str | None = None
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def family(self) -> str:
        return PRESETS[self.preset].family


# Gemma 2 / 3 slide a 4-token window on their first layer (test batches are 6-10 tokens long);
# Gemma 2's logit softcap is small enough for tanh to bend these tiny random scores.
SLIDING = dict(sliding_window=4, layer_types=["sliding_attention", "full_attention"])

MODELS: dict[str, Tiny] = {
    "t5": Tiny("t5-tiny"),
    "t5-gated": Tiny("t5-tiny-gated"),
    "mt5": Tiny("t5-tiny-gated", "mt5"),
    "umt5": Tiny("t5-tiny-gated", "umt5"),
    "bert": Tiny("bert-tiny"),
    "roberta": Tiny("bert-tiny", "roberta", dict(pad_token_id=1, bos_token_id=0, eos_token_id=2)),
    "gpt2": Tiny("gpt2-tiny"),
    "llama": Tiny("llama-tiny"),
    "mistral": Tiny("llama-tiny", "mistral", dict(sliding_window=4)),
    "qwen2": Tiny("llama-tiny", "qwen2"),
    "qwen3": Tiny("qwen3-tiny"),
    "gemma": Tiny("gemma-tiny"),
    "gemma2": Tiny("gemma2-tiny", config=dict(query_pre_attn_scalar=12, attn_logit_softcapping=0.01,
                                                  final_logit_softcapping=3.0, **SLIDING)),
    "gemma3": Tiny("gemma3-tiny", config=dict(query_pre_attn_scalar=12, **SLIDING)),
}

# the config keys of each family's dropout probabilities
DROPOUT_KEYS = {
    "t5": ("dropout_rate",),
    "bert": ("hidden_dropout_prob", "attention_probs_dropout_prob"),
    "gpt2": ("resid_pdrop", "embd_pdrop", "attn_pdrop"),
}
HEADS = {  # the head a test may ask for, as transformers' auto classes name them
    "SEQ_2_SEQ_LM": tf.AutoModelForSeq2SeqLM,
    "SEQ_CLS": tf.AutoModelForSequenceClassification,
    "CAUSAL_LM": tf.AutoModelForCausalLM,
    "MASKED_LM": tf.AutoModelForMaskedLM,
    "BASE": tf.AutoModel,  # no head: the model's last hidden states (and BERT's pooler)
}


def head_of(name: str, head: str | None = None) -> str:
    """The head a model of ``name`` gets: ``head``, else the profiler's (its PEFT task type)."""
    return head or ARCHITECTURES[MODELS[name].family].peft_task_type


def tiny_config(
    name: str,
    *,
    d_model: int = 16,
    n_head: int | None = None,
    d_head: int = 8,
    d_ff: int | None = None,
    n_layers: int = 2,
    vocab: int = 64,
    dropout: float = 0.1,
    **config: Any,
) -> tf.PretrainedConfig:
    """The transformers config of ``name`` at test size. ``n_head`` defaults to 4 for the
    LLaMA-style decoders (2 key/value heads, the preset's grouped-query ratio) and 2 elsewhere;
    ``d_ff`` to ``2 d_model``; ``config`` overrides any value."""
    tiny = MODELS[name]
    arch = ARCHITECTURES[tiny.family]
    heads = n_head or (4 if arch.n_kv_head else 2)
    values = config_values(tiny.preset, {}, Dims(d_model, heads, d_ff or 2 * d_model, d_head, n_layers))
    values.update({arch.n_layers: n_layers, "vocab_size": vocab, "bos_token_id": 0, "eos_token_id": 0})
    if tiny.family != "gpt2":  # GPT-2 has no pad token (transformers then looks for pads in meta ids)
        values["pad_token_id"] = 0
    if tiny.family == "t5":
        values.update(num_decoder_layers=n_layers, decoder_start_token_id=0, eos_token_id=1, relative_attention_num_buckets=8)
    if arch.max_positions:
        values[arch.max_positions] = 40
    values.update(dict.fromkeys(DROPOUT_KEYS.get(tiny.family, ("attention_dropout",)), dropout))
    values.update(num_labels=3, **tiny.config, **config)
    with quiet_transformers():
        if tiny.model_type is None:
            return arch.config_class(**values)
        return tf.AutoConfig.for_model(tiny.model_type, **values)


def tiny_model(
    name: str,
    *,
    head: str | None = None,
    attn: str = "eager",
    device: str | torch.device | None = None,
    seed: int = 0,
    **config: Any,
) -> tf.PreTrainedModel:
    """A model of :data:`MODELS` ``[name]`` with weights from ``torch.manual_seed(seed)``, in
    train mode, built on ``device`` (CPU by default; ``meta`` allocates nothing). ``head`` is a
    key of :data:`HEADS` (default: the profiler's head of the family); ``config`` goes to
    :func:`tiny_config`."""
    cfg = tiny_config(name, **config)
    torch.manual_seed(seed)
    with warnings.catch_warnings(), torch.device(device or "cpu"):
        warnings.simplefilter("ignore")
        return model_class(name, head)._from_config(cfg, attn_implementation=attn).train()


def model_class(name: str, head: str | None = None) -> type[tf.PreTrainedModel]:
    """The transformers model class :func:`tiny_model` builds for ``name`` and ``head``."""
    tiny = MODELS[name]
    arch = ARCHITECTURES[tiny.family]
    if tiny.model_type is None and head in (None, arch.peft_task_type):
        return arch.model_class
    return HEADS[head_of(name, head)]._model_mapping[type(tiny_config(name))]


def tiny_batch(
    name: str,
    batch_size: int = 2,
    seq_len: int = 6,
    *,
    pads: tuple[int, ...] | None = (0, 2),
    target_len: int = 4,
    head: str | None = None,
    vocab: int = 64,
    seed: int = 1,
    device: str | torch.device = "cpu",
) -> dict[str, torch.Tensor]:
    """A batch for :func:`tiny_model` ``(name, head=head)``: ``input_ids`` ``[B, S]`` drawn from
    ``1 .. vocab - 1`` (CPU generator seeded ``seed``); with ``pads``, an ``attention_mask``
    whose row ``i`` ends in ``pads[i]`` pad tokens (``pads`` shorter than ``B``: the other rows
    have none). ``labels``: sequence-to-sequence ``[B, target_len]`` (a padded row's last label
    is -100), sequence classification ``[B]`` class ids
    (``num_labels`` 3), language models ``input_ids`` with -100 at the pads."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (batch_size, seq_len), generator=g)
    counts = list(pads or ()) + [0] * (batch_size - len(pads or ()))
    mask = torch.ones(batch_size, seq_len, dtype=torch.long)
    for row, count in enumerate(counts):
        if count:
            mask[row, seq_len - count :] = 0
    task = head_of(name, head)
    if task == "SEQ_2_SEQ_LM":
        labels = torch.randint(1, vocab, (batch_size, target_len), generator=g)
        for row, count in enumerate(counts):
            if count:
                labels[row, -1] = -100
    elif task == "SEQ_CLS":
        labels = torch.randint(0, 3, (batch_size,), generator=g)
    else:
        labels = ids.masked_fill(mask == 0, -100)
    batch = {"input_ids": ids, "labels": labels}
    if pads is not None:
        batch["attention_mask"] = mask
    return {key: value.to(device) for key, value in batch.items()}
