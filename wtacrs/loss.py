"""``wtacrs.chunked_loss``: the LM head and cross-entropy of a training step, a chunk of tokens at a time.

A stock language model computes ``logits = lm_head(h)`` for all ``N = B * T`` tokens and then
the cross-entropy, so at the start of backward it holds three ``[N, vocab]`` fp32 tensors: the
saved log-softmax output and, in turn, its gradient and the logits' gradient (T5-Base, B=64,
T=128, vocab 32128: 2.94 GiB). With :func:`chunked_loss`, a training call with ``labels`` runs
the model's own forward with the LM head replaced by the identity, so the forward returns the
head's input ``h`` (after T5's ``d_model ** -0.5`` scaling) and never builds the logits. The
loss is then summed over chunks of ``chunk_tokens`` tokens, each chunk's head and cross-entropy
under non-reentrant ``torch.utils.checkpoint``: only ``h`` (which a trainable stock head saves
too; with a frozen head, as under LoRA, it is ``N * hidden`` more) and the labels are kept, and
backward rebuilds one chunk's ``[chunk_tokens, vocab]`` tensors at a time, at the cost of one
more head matmul.

The result is the stock loss: the same head module (a peft or WTA-CRS wrapper of it included),
the same ``ignore_index=-100``, the same reduction (mean over the tokens that are not ignored,
a tensor count, or ``num_items_in_batch`` where the stock causal loss takes it). In fp32 the
value and the gradients differ from stock by summation order only; in bf16/fp16 by about one
rounding of that dtype (the per-token losses are summed in fp32, as the stock reduction does).
In that mode the output's ``logits`` is None (as with Liger kernel's fused linear
cross-entropy). Without ``labels``, in eval mode, under ``torch.no_grad()``, or with
``logits_to_keep``, the model runs stock.

The opt-in is one instance attribute, ``forward``, on the transformers model (inside a peft
wrapper: on ``get_base_model()``): a module-level callable object that holds the model, so
``copy.deepcopy`` and pickling give a copy with its own chunked loss, and ``inspect.signature``
still sees the stock forward (``Trainer`` reads it). It runs after every forward pre-hook, so a
:func:`wtacrs.convert` conversion (whose hook reads ``labels``) composes in either order, and its
chunks run inside the conversion's scope as the stock head does. :func:`revert_chunked_loss`
deletes the attribute.
"""

from __future__ import annotations

import enum
import functools
import inspect

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from wtacrs.taxonomy import FAMILIES, family_for_model_type

IGNORE_INDEX = -100  # transformers' label for tokens without a loss
DEFAULT_CHUNK_TOKENS = 1024  # T5-Base: 126 MiB per [chunk, 32128] fp32 tensor


class LossLayout(str, enum.Enum):
    """How a model class turns the head's logits and ``labels`` into its loss."""

    SEQ2SEQ = "seq2seq"
    """``CrossEntropyLoss(ignore_index=-100)(logits, labels)``: logits in the model's dtype, the
    labels as given; the decoder input is ``model._shift_right(labels)`` when none is passed."""
    CAUSAL = "causal"
    """transformers' ``ForCausalLMLoss``: logits cast to fp32, labels shifted left by one (or the
    ``shift_labels`` passed), divided by ``num_items_in_batch`` when one is passed."""


def _hf_model(model: nn.Module) -> nn.Module:
    """The transformers model inside a peft wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _layout_of(hf_model: nn.Module) -> LossLayout:
    cls = type(hf_model)
    family = family_for_model_type(getattr(getattr(hf_model, "config", None), "model_type", None))
    stock = cls.__module__.startswith("transformers.")  # a subclass may post-process the logits
    layout = family.loss_layouts.get(cls.__name__) if family is not None and stock else None
    if layout is None:
        reason = ""
        if getattr(getattr(hf_model, "config", None), "final_logit_softcapping", None) is not None:
            reason = " (its forward softcaps the logits after the head)"
        supported = ", ".join(name for f in FAMILIES.values() for name in f.loss_layouts)
        raise ValueError(f"wtacrs.chunked_loss does not support {cls.__name__}{reason}; supported: {supported}")
    layout = LossLayout(layout)
    if layout is LossLayout.CAUSAL and (
        "_loss_function" in vars(hf_model) or getattr(hf_model, "loss_type", None) not in (None, "ForCausalLM")
    ):
        raise ValueError(f"{cls.__name__} has a custom loss function; wtacrs.chunked_loss computes only ForCausalLMLoss")
    return layout


def chunked_loss(model: nn.Module, chunk_tokens: int = DEFAULT_CHUNK_TOKENS) -> nn.Module:
    """Make training calls of ``model`` with ``labels`` compute head + loss in chunks; return ``model``.

    See the module docstring. ``chunk_tokens`` is the number of tokens (rows of the flattened
    ``[B * T, hidden]`` head input) per chunk: the backward holds about three
    ``[chunk_tokens, vocab]`` fp32 tensors at a time. Raises ``ValueError`` for a model class
    outside its family's ``loss_layouts`` (:class:`wtacrs.taxonomy.Family`) or a model that already has a chunked loss.
    """
    if isinstance(chunk_tokens, bool) or not isinstance(chunk_tokens, int) or chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be a positive int, got {chunk_tokens!r}")
    hf_model = _hf_model(model)
    layout = _layout_of(hf_model)
    if isinstance(vars(hf_model).get("forward"), ChunkedLossForward):
        raise ValueError("model already has a chunked loss; call wtacrs.revert_chunked_loss(model) first")
    if hf_model.get_output_embeddings() is None:
        raise ValueError(f"{type(hf_model).__name__} has no output embeddings (lm_head)")
    hf_model.forward = ChunkedLossForward(hf_model, layout, chunk_tokens, inner=vars(hf_model).get("forward"))
    return model


def revert_chunked_loss(model: nn.Module) -> nn.Module:
    """Undo :func:`chunked_loss`: the model's forward is the one it had before."""
    hf_model = _hf_model(model)
    wrapper = vars(hf_model).get("forward")
    if not isinstance(wrapper, ChunkedLossForward):
        raise ValueError("model has no chunked loss (wtacrs.chunked_loss)")
    if wrapper.inner is None:
        del hf_model.forward
    else:
        hf_model.forward = wrapper.inner
    return model


def has_chunked_loss(model: nn.Module) -> bool:
    return isinstance(vars(_hf_model(model)).get("forward"), ChunkedLossForward)


@functools.lru_cache(maxsize=None)
def _positional_names(cls: type) -> tuple[str, ...]:
    return tuple(inspect.signature(cls.forward).parameters)[1:]  # without self


def _return_hidden(hidden: torch.Tensor) -> torch.Tensor:
    """The LM head's forward during a chunked call: its input, untouched."""
    return hidden


class ChunkedLossForward:
    """The ``forward`` instance attribute :func:`chunked_loss` puts on a transformers model.

    Holds the model (plain attributes, no closure), so a deep copy or an unpickled model gets a
    wrapper of its own. ``inner`` is a ``forward`` instance attribute that was there before
    (accelerate puts one), or None for the class's forward.
    """

    def __init__(self, model: nn.Module, layout: LossLayout, chunk_tokens: int, inner=None) -> None:
        self.model = model
        self.layout = layout
        self.chunk_tokens = chunk_tokens
        self.inner = inner

    @property
    def __wrapped__(self):  # inspect.signature(model.forward) follows it to the stock signature
        return self.inner if self.inner is not None else type(self.model).forward.__get__(self.model)

    def _stock(self, *args, **kwargs):
        if self.inner is not None:
            return self.inner(*args, **kwargs)
        return type(self.model).forward(self.model, *args, **kwargs)

    def __call__(self, *args, **kwargs):
        model = self.model
        if args:
            kwargs.update(zip(_positional_names(type(model)), args))
        labels = kwargs.get("labels")
        logits_to_keep = kwargs.get("logits_to_keep", 0)
        if (
            labels is None
            or not model.training
            or not torch.is_grad_enabled()
            or not (isinstance(logits_to_keep, int) and logits_to_keep == 0)
        ):
            return self._stock(**kwargs)

        kwargs.pop("labels")
        return_dict = kwargs.pop("return_dict", None)
        if return_dict is None:
            return_dict = getattr(model.config, "return_dict", True)
        if self.layout is LossLayout.SEQ2SEQ:
            if kwargs.get("decoder_input_ids") is None and kwargs.get("decoder_inputs_embeds") is None:
                kwargs["decoder_input_ids"] = model._shift_right(labels)
            targets, divisor = labels, None
        else:
            targets = kwargs.get("shift_labels")
            if targets is None:
                targets = F.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:]
            divisor = kwargs.get("num_items_in_batch")

        head = model.get_output_embeddings()
        head_forward = vars(head).get("forward")  # an instance forward someone else put there
        head.forward = _return_hidden
        try:
            output = self._stock(**kwargs, return_dict=True)
        finally:
            if head_forward is None:
                del head.forward
            else:
                head.forward = head_forward
        hidden = output.logits  # the head's input: the identity head returned it
        loss = ChunkedCrossEntropyLoss(self.chunk_tokens, upcast=self.layout is LossLayout.CAUSAL)(
            head, hidden, targets.to(hidden.device), divisor
        )
        output = type(output)(**{**output, "loss": loss, "logits": None})
        return output if return_dict else output.to_tuple()


def _chunk_token_losses(head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor, upcast: bool) -> torch.Tensor:
    logits = head(hidden)
    if upcast:
        logits = logits.float()
    # per token, so that a half-precision loss is summed in fp32 as the stock reduction does
    return F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction="none")


class ChunkedCrossEntropyLoss(nn.Module):
    """``cross_entropy(head(hidden), targets)`` over ``chunk_tokens`` rows at a time, each chunk
    checkpointed. Built per call and never registered on the model (the head is an argument, not
    a child, so module names stay the model's); the profiler attributes what it saves to
    Head/Loss by its class name.

    ``hidden``: ``[..., d]`` head input; ``targets``: ``[...]`` int64 with ``-100`` for ignored
    tokens. Saved for backward: ``hidden`` and ``targets`` (as checkpoint inputs) and the
    divisor. Returns the per-token losses summed in fp32, divided by ``divisor``
    (``num_items_in_batch``) or, when None, by the number of targets that are not ``-100`` (a
    tensor: no host sync, runs on meta), in the dtype of the stock loss (the cross-entropy's).
    """

    def __init__(self, chunk_tokens: int, upcast: bool) -> None:
        super().__init__()
        self.chunk_tokens = chunk_tokens
        self.upcast = upcast

    def forward(self, head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor, divisor: torch.Tensor | int | None = None):
        hidden = hidden.reshape(-1, hidden.shape[-1])
        targets = targets.reshape(-1)
        if targets.shape[0] != hidden.shape[0]:
            raise ValueError(f"{targets.shape[0]} targets for {hidden.shape[0]} tokens")
        total = None
        for rows, chunk_targets in zip(hidden.split(self.chunk_tokens), targets.split(self.chunk_tokens)):
            losses = checkpoint(
                _chunk_token_losses, head, rows, chunk_targets, self.upcast, use_reentrant=False, preserve_rng_state=False
            )
            dtype = losses.dtype
            part = losses.float().sum()
            total = part if total is None else total + part
        if divisor is None:
            divisor = (targets != IGNORE_INDEX).sum()
        elif torch.is_tensor(divisor):
            divisor = divisor.to(total.device)
        return (total / divisor).to(dtype)
