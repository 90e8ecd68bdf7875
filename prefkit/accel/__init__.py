"""The host-performance layer: every mechanism that exists only to make training fast on this machine.

The core (data, logprobs, objectives, dynamics, trainer, config) never imports this package, so importing
prefkit or building a :class:`~prefkit.config.PrefConfig` and a :class:`~prefkit.trainer.PrefTrainer` changes
no process-wide state. The application (``prefkit.run``, the command line) installs it in two steps:

1. :func:`host_defaults`, applied by the command line's option parsing (:func:`prefkit.configfile.parse_config`)
   to the options left unset: bf16 autocast where bf16 matmul is fast (and ``use_cpu`` so transformers accepts
   it on a CPU), TF32 matmuls on a CUDA GPU that has them (``tf32``, TrainingArguments' own field, which sets
   torch's TF32 flags when the run's config is built; ``--tf32 false`` turns them off), lengths rounded up to 64 for CPU bf16 kernels built per shape, and the gloo
   backend for DeepSpeed on a CPU.
2. :func:`install`, once the config is known: registers the segment attention with transformers, sets glibc's
   malloc thresholds on a CPU (:mod:`~prefkit.accel.malloc`), and returns the :class:`HostPlan` whose
   ``run_forwards`` runs the reference forward on a worker thread (:mod:`~prefkit.accel.overlap`), handed to
   ``PrefTrainer(run_forwards=...)``.

A library user who wants the same speed calls both: ``PrefConfig(**{**options, **host_defaults(options)})``, then
``plan = install(cfg)`` and ``PrefTrainer(..., run_forwards=plan.run_forwards)``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from prefkit.accel.attention import register_segment_attention, segment_path
from prefkit.accel.malloc import tune_cpu_malloc
from prefkit.accel.overlap import run_alongside
from prefkit.accel.precision import (
    CPU_SHAPE_MULTIPLE,
    bf16_is_fast,
    choose_dtype,
    default_device_type,
    tf32_is_available,
)

if TYPE_CHECKING:
    from prefkit.config import PrefConfig

__all__ = ["HostPlan", "host_defaults", "install"]


def host_defaults(options: Mapping[str, Any]) -> dict[str, Any]:
    """Values for the host-dependent options that ``options`` (PrefConfig field names) leaves unset (None)."""
    out: dict[str, Any] = {}
    device_type = default_device_type(bool(options.get("use_cpu")))
    bf16 = options.get("bf16")
    if bf16 is None:
        bf16 = out["bf16"] = not options.get("fp16") and bf16_is_fast(device_type)
        if bf16 and device_type == "cpu":
            out["use_cpu"] = True  # transformers refuses bf16 without a GPU unless told the CPU is meant
    if options.get("tf32") is None and device_type == "cuda" and tf32_is_available():
        # fp32 matmuls (the trained fp32 weights' own, and whatever autocast leaves in fp32) in TF32: ~8x the fp32
        # rate on Ampere and newer; TrainingArguments applies it when the run's config is built (--tf32 false: off)
        out["tf32"] = True
    weights = choose_dtype(options.get("dtype") or "auto", torch.device(device_type),
                           trained=not options.get("use_peft"))
    if options.get("pad_to_multiple_of") is None and device_type == "cpu" and (bf16 or weights != torch.float32):
        out["pad_to_multiple_of"] = CPU_SHAPE_MULTIPLE
    launched = "LOCAL_RANK" in os.environ
    if (not torch.cuda.is_available() and launched and not options.get("ddp_backend")
            and os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true"):
        out["ddp_backend"] = "gloo"  # DeepSpeed's CPU accelerator talks gloo; without it accelerate counts one process
    return out


@dataclass(frozen=True)
class HostPlan:
    """What :func:`install` hands to the trainer: ``run_forwards(policy, reference)`` runs the two forwards of a
    step (None: one after the other)."""

    run_forwards: Callable | None = None


def install(cfg: PrefConfig) -> HostPlan:
    """Install the host layer for a run with ``cfg``: the process-wide parts now, the per-trainer parts in the
    returned plan. Idempotent."""
    register_segment_attention()
    segment_path(cfg.device.type)  # a bad PREFKIT_SEGMENT_ATTENTION is refused before any model is loaded
    on_cpu = cfg.device.type == "cpu"
    if on_cpu:
        tune_cpu_malloc()  # activations are reused instead of faulted in afresh every step
    return HostPlan(run_forwards=run_alongside if on_cpu and cfg.overlap_reference else None)
