"""The GPUs an estimated step time can be for: one table of peak rates from vendor datasheets.

Importable without torch (``python -m profiler --help`` names the table). Figures are the
datasheets' **dense** peaks (no 2:4 sparsity), SXM parts where a card comes in several forms:

- ``fp32``: CUDA-core FP32 FLOP/s, the rate of a float32 matmul under PyTorch's default
  (``torch.backends.cuda.matmul.allow_tf32 = False``); non-matmul ops are costed by their bytes;
- ``bf16``, ``fp16``: tensor-core FLOP/s with FP32 accumulation (None where the part has no such
  mode; estimates then fall back on ``fp32``); ``tf32`` likewise, kept as data: no estimate uses
  it, since PyTorch's default runs float32 matmuls without TF32;
- ``bandwidth``: DRAM (HBM/GDDR) bytes per second; ``memory_gb`` and ``title``: data for readers.

``steptime.gpu_rates`` turns these into the rates of ``StepCost.seconds``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

T = 1e12


@dataclass(frozen=True)
class GPU:
    """Peak rates of one accelerator (module docstring); ``pattern`` finds it in ``torch.cuda.get_device_name()``."""

    title: str
    fp32: float
    tf32: float | None
    bf16: float | None
    fp16: float | None
    bandwidth: float  # bytes/s
    memory_gb: float
    pattern: str  # a regular expression that finds this part in a lower-cased device name


GPUS: dict[str, GPU] = {
    # NVIDIA A100 datasheet (SXM): FP32 19.5 TF, TF32 156, BF16/FP16 312; 1,555 / 2,039 GB/s
    "a100-40gb": GPU("NVIDIA A100 40GB SXM", 19.5 * T, 156 * T, 312 * T, 312 * T, 1555e9, 40, r"a100.*\b40\s*gb"),
    "a100-80gb": GPU("NVIDIA A100 80GB SXM", 19.5 * T, 156 * T, 312 * T, 312 * T, 2039e9, 80, r"a100.*\b80\s*gb"),
    # NVIDIA H100 datasheet (SXM): FP32 67 TF, TF32 494.7, BF16/FP16 989.4 (half the sparse figures); 3.35 TB/s
    "h100-80gb": GPU("NVIDIA H100 80GB SXM", 67 * T, 494.7 * T, 989.4 * T, 989.4 * T, 3350e9, 80, r"h100"),
    # NVIDIA H200 datasheet (SXM): the H100's compute, 141 GB HBM3e at 4.8 TB/s
    "h200": GPU("NVIDIA H200 SXM", 67 * T, 494.7 * T, 989.4 * T, 989.4 * T, 4800e9, 141, r"h200"),
    # NVIDIA L40S datasheet: FP32 91.6 TF, TF32 183, BF16/FP16 362.05; 864 GB/s
    "l40s-48gb": GPU("NVIDIA L40S", 91.6 * T, 183 * T, 362.05 * T, 362.05 * T, 864e9, 48, r"l40s"),
    # NVIDIA L4 datasheet: FP32 30.3 TF, TF32 60, BF16/FP16 121; 300 GB/s
    "l4-24gb": GPU("NVIDIA L4", 30.3 * T, 60 * T, 121 * T, 121 * T, 300e9, 24, r"\bl4\b"),
    # NVIDIA A10 datasheet (NVIDIA publishes none for AWS's A10G; these are the A10's):
    # FP32 31.2 TF, TF32 62.5, BF16/FP16 125; 600 GB/s
    "a10g-24gb": GPU("NVIDIA A10G (A10 datasheet)", 31.2 * T, 62.5 * T, 125 * T, 125 * T, 600e9, 24, r"\ba10g?\b"),
    # NVIDIA Ada whitepaper, RTX 4090: FP32 82.6 TF, TF32 82.6, BF16/FP16 165.2 (FP32 accumulate); 1,008 GB/s
    "rtx4090-24gb": GPU("NVIDIA GeForce RTX 4090", 82.6 * T, 82.6 * T, 165.2 * T, 165.2 * T, 1008e9, 24, r"rtx 4090"),
    # NVIDIA V100 datasheet (SXM2): FP32 15.7 TF, FP16 tensor 125, no TF32/BF16; 900 GB/s
    "v100-32gb": GPU("NVIDIA V100 32GB SXM2", 15.7 * T, None, None, 125 * T, 900e9, 32, r"v100"),
    # NVIDIA T4 datasheet: FP32 8.1 TF, FP16 (mixed) 65, no TF32/BF16; 320 GB/s
    "t4-16gb": GPU("NVIDIA T4", 8.1 * T, None, None, 65 * T, 320e9, 16, r"\bt4\b"),
}

DEFAULT_TARGET = "a100-80gb"


def detect(device_name: str) -> str | None:
    """The ``GPUS`` key of a ``torch.cuda.get_device_name()`` (``"NVIDIA A100-SXM4-80GB"`` is
    ``a100-80gb``, ``"NVIDIA L40S"`` is not ``l4-24gb``), or None when no entry matches."""
    name = device_name.lower()
    return next((key for key, gpu in GPUS.items() if re.search(gpu.pattern, name)), None)
