"""``nn.Module`` front ends of the sampled and lossless ops, as the converter installs them."""

from __future__ import annotations

import itertools
import weakref
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from wtacrs import functional, lossless
from wtacrs.gradnorm import resolve_grad_norm

_layer_ids = itertools.count()


class SampleShare:
    """One row sample per input tensor, for layers that read the same input (Q/K/V, wi_0/wi_1).

    Two layers share a sample only when their probabilities are identical: same input tensor
    (identity and version), same gradient-norm source, same budget. The share holds the last few
    samples only and the converter clears it after every forward pass, so it never keeps rows
    alive beyond the autograd graph.
    """

    def __init__(self, size: int = 4) -> None:
        self.size = size
        self._entries: OrderedDict[tuple, tuple[weakref.ref, tuple[Tensor, Tensor | None]]] = OrderedDict()

    def get_or_sample(self, input: Tensor, source: tuple, ratio: float, min_k: int, sample_fn):
        key = (id(input), input._version, source, ratio, min_k)
        entry = self._entries.get(key)
        if entry is not None and entry[0]() is input:
            return entry[1]
        sample = sample_fn()
        self._entries[key] = (weakref.ref(input), sample)
        while len(self._entries) > self.size:
            self._entries.popitem(last=False)
        return sample

    def clear(self) -> None:
        self._entries.clear()


class _Sampled:
    """Shared logic of the sampled linear front ends."""

    ratio: float
    min_k: int
    generator: torch.Generator | None
    stream: str
    key: str
    share: SampleShare | None
    use_grad_norm: bool

    def _init_sampling(self, ratio, min_k, generator, stream, key, share, use_grad_norm) -> None:
        self.ratio = ratio
        self.min_k = min_k
        self.generator = generator
        self.stream = stream
        self.key = key if key is not None else f"linear{next(_layer_ids)}"
        self.share = share
        self.use_grad_norm = use_grad_norm

    def _sampled_linear(self, input: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        n = input.numel() // input.shape[-1]
        grad_norm, sink, source = None, None, ("ones",)
        if self.use_grad_norm:
            grad_norm, sink, source = resolve_grad_norm(self.key, self.stream, n, input.device)
        sample = None
        if self.share is not None and source is not None:
            sample = self.share.get_or_sample(
                input,
                source,
                self.ratio,
                self.min_k,
                lambda: functional.sample_input(
                    input, ratio=self.ratio, min_k=self.min_k, grad_norm=grad_norm, generator=self._generator_for(input)
                ),
            )
        return functional.linear(
            input,
            weight,
            bias,
            ratio=self.ratio,
            min_k=self.min_k,
            grad_norm=grad_norm,
            generator=self._generator_for(input),
            sample=sample,
            grad_norm_sink=sink,
        )

    def _generator_for(self, input: Tensor) -> torch.Generator | None:
        g = self.generator
        if g is None or input.device.type == "meta" or g.device.type != input.device.type:
            return None
        return g

    def _sampling_repr(self) -> str:
        return f"ratio={self.ratio}, min_k={self.min_k}, stream={self.stream!r}"


class WTACRSLinear(nn.Linear, _Sampled):
    """An ``nn.Linear`` whose weight gradient is estimated from ``k`` sampled input rows.

    It reuses the parameters of ``linear`` (no copy), so state-dict keys and optimizer state are
    unchanged and ``isinstance(m, nn.Linear)`` still holds. In eval mode or under
    ``torch.no_grad()`` it is exactly ``F.linear``. In training the forward is exact and only
    ``k = budget(n, ratio, min_k)`` rows of the ``n`` input tokens are stored for backward.

    ``stream`` names the token mask the layer reads (see :func:`wtacrs.token_mask`); ``key``
    identifies it in a :class:`wtacrs.GradNormCache`; layers given the same ``share`` reuse one
    sample of a common input.
    """

    def __init__(
        self,
        linear: nn.Linear,
        *,
        ratio: float,
        min_k: int = 1,
        generator: torch.Generator | None = None,
        stream: str = "default",
        key: str | None = None,
        share: SampleShare | None = None,
        use_grad_norm: bool = True,
    ) -> None:
        nn.Module.__init__(self)
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias
        self._init_sampling(ratio, min_k, generator, stream, key, share, use_grad_norm)

    def forward(self, input: Tensor) -> Tensor:
        if not (self.training and torch.is_grad_enabled() and self.weight.requires_grad):
            return F.linear(input, self.weight, self.bias)
        return self._sampled_linear(input, self.weight, self.bias)

    def to_linear(self) -> nn.Linear:
        """A plain ``nn.Linear`` sharing these parameters."""
        linear = nn.Linear.__new__(nn.Linear)
        nn.Module.__init__(linear)
        linear.in_features, linear.out_features = self.in_features, self.out_features
        linear.weight, linear.bias = self.weight, self.bias
        linear.train(self.training)
        return linear

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, {self._sampling_repr()}"


class WTACRSConv1D(nn.Module, _Sampled):
    """GPT-2's ``Conv1D`` (``y = x @ W + b``, ``W`` ``[in, out]``) with a sampled weight gradient.

    Holds the original module's parameters (``weight``, ``bias``), so state-dict keys are unchanged.
    """

    def __init__(self, conv1d: nn.Module, **sampling) -> None:
        super().__init__()
        self.nf = conv1d.nf
        self.nx = getattr(conv1d, "nx", conv1d.weight.shape[0])
        self.weight = conv1d.weight
        self.bias = conv1d.bias
        defaults = dict(min_k=1, generator=None, stream="default", key=None, share=None, use_grad_norm=True)
        defaults.update(sampling)
        self._init_sampling(defaults.pop("ratio"), **defaults)

    def forward(self, x: Tensor) -> Tensor:
        if not (self.training and torch.is_grad_enabled() and self.weight.requires_grad):
            size_out = x.size()[:-1] + (self.nf,)
            return torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight).view(size_out)
        return self._sampled_linear(x, self.weight.t(), self.bias)

    def extra_repr(self) -> str:
        return f"nf={self.nf}, nx={self.nx}, {self._sampling_repr()}"


class LosslessDropout(nn.Dropout):
    """``nn.Dropout`` that saves a 1-bit mask (:func:`wtacrs.lossless.dropout`); same output bits."""

    def __init__(self, dropout: nn.Dropout) -> None:
        super().__init__(dropout.p, dropout.inplace)
        self.train(dropout.training)

    def forward(self, input: Tensor) -> Tensor:
        if not (self.training and torch.is_grad_enabled() and input.requires_grad):
            return F.dropout(input, self.p, self.training, self.inplace)
        return lossless.dropout(input, self.p, self.training)


class SavedInputActivation(torch.autograd.Function):
    """Any elementwise activation module that stores only its input.

    The forward runs the original module (so its output is bitwise the original's); backward
    recomputes it from the saved input and differentiates that. Composite activations such as
    transformers' ``NewGELUActivation`` (tanh formula in plain ops) or SiLU otherwise save
    several full-size intermediates.
    """

    @staticmethod
    def forward(ctx, x, module):
        ctx.module = module
        ctx.save_for_backward(x)
        with torch.no_grad():
            return module(x)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        with torch.enable_grad():
            xd = x.detach().requires_grad_()
            y = ctx.module(xd)
        return torch.autograd.grad(y, xd, grad, create_graph=torch.is_grad_enabled())[0], None


class LosslessActivation(nn.Module):
    """Wraps an activation module: ReLU keeps a 1-bit mask, anything else its input only.

    The wrapped module is kept (and restored by :func:`wtacrs.revert`); eval and no-grad calls go
    straight to it.
    """

    def __init__(self, activation: nn.Module) -> None:
        super().__init__()
        self.activation = activation

    def forward(self, input: Tensor) -> Tensor:
        if not (self.training and torch.is_grad_enabled() and input.requires_grad):
            return self.activation(input)
        if isinstance(self.activation, nn.ReLU):
            return lossless.relu(input)
        return SavedInputActivation.apply(input, self.activation)
