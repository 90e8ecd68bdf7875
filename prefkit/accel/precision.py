"""What this host computes fast: bf16 matmul (probed from /proc/cpuinfo on a CPU, native units on a GPU), TF32
matmul (CUDA, Ampere and newer), the weight dtype that follows, and the length multiple for kernels that are built
per shape.

A CPU with bf16 matmul instructions (AMX, AVX512-BF16) runs bf16 faster than fp32, one without emulates it,
far slower (the rates: docs/performance.md); its bf16 matmuls (oneDNN) build a kernel for every new shape, so lengths are rounded up to
:data:`CPU_SHAPE_MULTIPLE` there. ``PREFKIT_CPU_BF16=0`` makes a CPU count as one without.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

# CPU bf16/fp16 matmuls (oneDNN) build a kernel per shape: lengths rounded up to this repeat a few shapes
CPU_SHAPE_MULTIPLE = 64


def bf16_is_fast(device_type: str) -> bool:
    """Whether bf16 matmul is fast here: CUDA with bf16 support, CPUs with bf16 matmul instructions (AMX, or
    AVX512-BF16); elsewhere it is emulated, far slower than fp32."""
    if device_type == "cuda":
        # a GPU without bf16 units (before Ampere) emulates it; transformers' own check counts emulation as support
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)
    return device_type == "cpu" and _cpu_has_bf16_matmul()


def tf32_is_available() -> bool:
    """Whether CUDA matmuls here can run in TF32 (Ampere and newer: compute capability 8 or more)."""
    return torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 8


def default_device_type(use_cpu: bool = False) -> str:
    return "cuda" if torch.cuda.is_available() and not use_cpu else "cpu"


def choose_dtype(requested: str = "auto", device: torch.device | None = None, *, trained: bool = False) -> torch.dtype:
    """Weight dtype. auto: fp32 for weights that are trained (AdamW on bf16 weights rounds away updates smaller
    than ~1/256 of a weight; ``--bf16`` autocast gives the bf16 speed on fp32 weights), and for frozen weights
    bf16 where bf16 matmul is fast, fp32 elsewhere."""
    if requested != "auto":
        return getattr(torch, requested)
    if trained:
        return torch.float32
    device_type = device.type if device is not None else default_device_type()
    return torch.bfloat16 if bf16_is_fast(device_type) else torch.float32


def _cpu_has_bf16_matmul() -> bool:
    if os.environ.get("PREFKIT_CPU_BF16", "").lower() in ("0", "false", "no"):
        return False  # tests (and users who want fp32 defaults everywhere) opt out of the bf16 path
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags
