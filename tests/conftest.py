"""Shared test setup: one intra-op thread.

The tests use tiny tensors, for which a second thread only adds synchronisation; on a shared
2-core machine two threads made some tests four times slower.
"""

import torch

torch.set_num_threads(1)
