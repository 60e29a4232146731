"""WTA-CRS: Winner-Take-All Column-Row Sampling for memory-efficient fine-tuning.

The forward pass is exact; each weight gradient ``dW = H^T dZ`` is estimated without bias from
``k`` sampled rows of ``H``, so only those rows are stored.
"""

from wtacrs import estimator, functional
from wtacrs.estimator import budget
from wtacrs.gradnorm import GradNormCache, token_mask
from wtacrs.modules import WTACRSLinear

__all__ = ["GradNormCache", "WTACRSLinear", "budget", "estimator", "functional", "token_mask"]
__version__ = "0.1.0"
