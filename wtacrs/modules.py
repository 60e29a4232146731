"""``nn.Module`` front ends of the sampled and lossless ops, as the converter installs them."""

from __future__ import annotations

import itertools
import weakref
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from wtacrs import functional, lossless, rowsource
from wtacrs.rng import GeneratorPool, generator_for
from wtacrs.gradnorm import PositionGradNorms, resolve_grad_norm
from wtacrs.rowsource import RowSource
from wtacrs.taxonomy import Category, Operator

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

    def get_or_sample(self, input: Tensor, source: tuple, ratio: float, min_k: int, recompute: bool, sample_fn):
        key = (id(input), input._version, source, ratio, min_k, recompute)
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

    def __getstate__(self) -> dict:  # the entries live for one forward pass; weakrefs do not pickle
        return {"size": self.size}

    def __setstate__(self, state: dict) -> None:
        self.__init__(**state)


class _Sampled:
    """Shared logic of the sampled linear front ends."""

    ratio: float
    min_k: int
    generator: torch.Generator | GeneratorPool | None
    stream: str
    key: str
    share: SampleShare | None
    use_grad_norm: bool
    positions: tuple[PositionGradNorms, str] | None

    def _init_sampling(self, ratio, min_k, generator, stream, key, share, use_grad_norm, recompute_rows=True, positions=None) -> None:
        self.ratio = ratio
        self.min_k = min_k
        self.generator = generator
        self.stream = stream
        self.key = key if key is not None else f"linear{next(_layer_ids)}"
        self.share = share
        self.use_grad_norm = use_grad_norm
        self.recompute_rows = recompute_rows
        self.positions = positions

    def _sampled_linear(self, input: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        grad_norm, sink, source = None, None, ("ones",)
        if self.use_grad_norm:
            grad_norm, sink, source = resolve_grad_norm(self.key, self.stream, input.shape[:-1], input.device, self.positions)
        row_source = rowsource.lookup(input) if self.recompute_rows else None
        generator = generator_for(self.generator, input.device)

        def sample_fn():
            return functional.sample_input(
                input, ratio=self.ratio, min_k=self.min_k, grad_norm=grad_norm, generator=generator, row_source=row_source
            )

        sample = None
        if self.share is not None and source is not None:
            sample = self.share.get_or_sample(input, source, self.ratio, self.min_k, row_source is not None, sample_fn)
        out = functional.linear(
            input,
            weight,
            bias,
            ratio=self.ratio,
            min_k=self.min_k,
            grad_norm=grad_norm,
            generator=generator,
            sample=sample,
            grad_norm_sink=sink,
            row_source=row_source,
        )
        if row_source is not None:  # a consumer of this output (Linear-D) can rebuild its rows too
            rowsource.register(out, row_source.then(lambda rows: F.linear(rows.to(weight.dtype), weight, bias)))
        return out

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
    sample of a common input. ``generator`` draws the rows (:func:`wtacrs.rng.generator_for`:
    None means torch's default generator).
    """

    def __init__(
        self,
        linear: nn.Linear,
        *,
        ratio: float,
        min_k: int = 1,
        generator: torch.Generator | GeneratorPool | None = None,
        stream: str = "default",
        key: str | None = None,
        share: SampleShare | None = None,
        use_grad_norm: bool = True,
        recompute_rows: bool = True,
        positions: tuple[PositionGradNorms, str] | None = None,
    ) -> None:
        nn.Module.__init__(self)
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias
        self._init_sampling(ratio, min_k, generator, stream, key, share, use_grad_norm, recompute_rows, positions)

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
        defaults = dict(min_k=1, generator=None, stream="default", key=None, share=None, use_grad_norm=True, recompute_rows=True, positions=None)
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
        out, mask, saved = lossless.dropout_with_mask(input, self.p, self.training)
        source = rowsource.lookup(input)
        width = input.shape[-1]
        if source is not None and mask is not None and width % 8 == 0:
            p, fused = self.p, mask.fused

            def drop_rows(rows, packed, *, indices):
                keep = lossless.unpack_bits(packed.view(-1, width // 8).index_select(0, indices).reshape(-1), rows.shape)
                return lossless.dropout_rows(rows, keep, p, fused=fused)

            rowsource.register(out, source.then(drop_rows, extra=(saved,)))
        return out


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
            out = lossless.relu(input)
        else:
            out = SavedInputActivation.apply(input, self.activation)
        source = rowsource.lookup(input)
        if source is not None:
            rowsource.register(out, source.then(self.activation.forward))  # .forward: no hooks in backward
        return out


class RecomputedModule(torch.autograd.Function):
    """A row-wise module (a norm, an activation) that stores only its input.

    ``apply(x, module, *params)``: the forward runs the original module (so its output is bitwise
    the original's); backward recomputes it from the saved input and differentiates that, for
    the input and the module's own ``params``.
    """

    @staticmethod
    def forward(ctx, x, module, *params):
        ctx.module = module
        ctx.save_for_backward(x)
        with torch.no_grad():
            return module(x)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        params = [p for p, needed in zip(ctx.module._parameters.values(), ctx.needs_input_grad[2:]) if needed]
        with torch.enable_grad():
            xd = x.detach().requires_grad_(ctx.needs_input_grad[0])
            y = ctx.module.forward(xd)  # .forward: module hooks ran once, in the forward pass
            wrt = ([xd] if ctx.needs_input_grad[0] else []) + params
            grads = list(torch.autograd.grad(y, wrt, grad, create_graph=torch.is_grad_enabled()))
        grad_x = grads.pop(0) if ctx.needs_input_grad[0] else None
        grad_params = [grads.pop(0) if needed else None for needed in ctx.needs_input_grad[2:]]
        return (grad_x, None, *grad_params)


class RecomputedNorm(RecomputedModule):
    """A LayerNorm / RMSNorm that stores only its input.

    Eager LayerNorm keeps its input and a normalised copy (T5's RMSNorm: input, normalised copy
    and the reciprocal RMS), so this halves the norm's share of saved activations.
    """

    operator = Operator.LAYERNORM
    category = Category.UNCOMPRESSED  # the input, as the eager norm stores it


class SavedInputActivation(RecomputedModule):
    """An elementwise activation that stores only its input.

    Composite activations such as transformers' ``NewGELUActivation`` (the tanh formula in plain
    ops) or SiLU otherwise save several full-size intermediates.
    """

    operator = Operator.ACTIVATION
    category = Category.LOSSLESS


class LeanNorm(nn.Module):
    """Wraps a row-wise norm module so training stores only its input (:class:`RecomputedNorm`).

    It shares the norm's parameter and buffer dicts, so state-dict keys do not change, and calls
    the norm's own ``forward``. Its output is registered as a row source: sampled linears that
    read it (Linear-Q/K/V/U) rebuild their rows from the norm's saved input instead of storing
    rows of their own.
    """

    def __init__(self, norm: nn.Module) -> None:
        super().__init__()
        object.__setattr__(self, "norm", norm)  # not a submodule: keys stay "<path>.weight"
        self._parameters = norm._parameters
        self._buffers = norm._buffers

    def forward(self, input: Tensor) -> Tensor:
        params = list(self._parameters.values())
        if not (self.training and torch.is_grad_enabled() and (input.requires_grad or any(p.requires_grad for p in params))):
            return self.norm.forward(input)
        out = RecomputedNorm.apply(input, self.norm, *params)
        width, norm = input.shape[-1], self.norm
        rowsource.register(out, RowSource((input,), lambda ts, idx: norm.forward(ts[0].reshape(-1, width).index_select(0, idx))))
        return out

    def extra_repr(self) -> str:
        return f"lean {self.norm!r}"
