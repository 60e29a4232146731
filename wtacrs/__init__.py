"""WTA-CRS: Winner-Take-All Column-Row Sampling for memory-efficient fine-tuning.

The forward pass is exact; each weight gradient ``dW = H^T dZ`` is estimated without bias from
``k`` sampled rows of ``H``, so only those rows are stored.
"""

from wtacrs import estimator, functional, lossless
from wtacrs.checkpoint import checkpoint_context_fn
from wtacrs.config import WTACRSConfig
from wtacrs.convert import convert, is_converted, revert, save_pretrained
from wtacrs.estimator import budget
from wtacrs.gradnorm import GradNormCache, PositionGradNorms, token_mask
from wtacrs.loss import chunked_loss, has_chunked_loss, revert_chunked_loss
from wtacrs.modules import WTACRSConv1D, WTACRSLinear
from wtacrs.taxonomy import FAMILIES, Category, Operator, UnsupportedModelError, family_of

__all__ = [
    "FAMILIES",
    "Category",
    "GradNormCache",
    "Operator",
    "PositionGradNorms",
    "UnsupportedModelError",
    "WTACRSConfig",
    "WTACRSConv1D",
    "WTACRSLinear",
    "budget",
    "checkpoint_context_fn",
    "chunked_loss",
    "convert",
    "estimator",
    "family_of",
    "functional",
    "has_chunked_loss",
    "is_converted",
    "lossless",
    "revert",
    "revert_chunked_loss",
    "save_pretrained",
    "token_mask",
]
__version__ = "0.1.0"
