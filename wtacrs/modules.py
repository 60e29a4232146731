"""``nn.Module`` front ends of the sampled ops."""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from wtacrs import functional
from wtacrs.gradnorm import resolve_grad_norm

_layer_ids = itertools.count()


class WTACRSLinear(nn.Linear):
    """An ``nn.Linear`` whose weight gradient is estimated from ``k`` sampled input rows.

    It reuses the parameters of ``linear`` (no copy), so state-dict keys and optimizer state are
    unchanged and ``isinstance(m, nn.Linear)`` still holds. In eval mode or under
    ``torch.no_grad()`` it is exactly ``F.linear``. In training the forward is exact and only
    ``k = budget(n, ratio, min_k)`` rows of the ``n`` input tokens are stored for backward.

    ``stream`` names the token mask the layer reads (see :func:`wtacrs.token_mask`); ``key``
    identifies it in a :class:`wtacrs.GradNormCache`.
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
    ) -> None:
        nn.Module.__init__(self)
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias
        self.ratio = ratio
        self.min_k = min_k
        self.generator = generator
        self.stream = stream
        self.key = key if key is not None else f"linear{next(_layer_ids)}"

    def forward(self, input: Tensor) -> Tensor:
        if not (self.training and torch.is_grad_enabled() and self.weight.requires_grad):
            return F.linear(input, self.weight, self.bias)
        n = input.numel() // input.shape[-1]
        grad_norm, sink = resolve_grad_norm(self.key, self.stream, n, input.device)
        return functional.linear(
            input,
            self.weight,
            self.bias,
            ratio=self.ratio,
            min_k=self.min_k,
            grad_norm=grad_norm,
            generator=self.generator,
            grad_norm_sink=sink,
        )

    def to_linear(self) -> nn.Linear:
        """A plain ``nn.Linear`` sharing these parameters."""
        linear = nn.Linear.__new__(nn.Linear)
        nn.Module.__init__(linear)
        linear.in_features, linear.out_features = self.in_features, self.out_features
        linear.weight, linear.bias = self.weight, self.bias
        linear.train(self.training)
        return linear

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, ratio={self.ratio}, min_k={self.min_k}, stream={self.stream!r}"
