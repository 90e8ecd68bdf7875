"""The reference model of a run: a frozen copy of the starting policy, kept as the engine shards it, and TR-DPO's
update. Used by :class:`prefkit.trainer.PrefTrainer` (the default reference) and by the ``--rounds`` loop
(:mod:`prefkit.online`), which keeps one reference across rounds; loading a named reference is
:func:`prefkit.runsetup.load_reference_model`."""

from __future__ import annotations

import copy

import torch
from torch import nn
from transformers.integrations import is_deepspeed_zero3_enabled

from prefkit.errors import ConfigError


def reference_copy(model: nn.Module, autocast_dtype: torch.dtype | None = None) -> nn.Module:
    """A frozen copy of the starting policy (eval mode, no gradients). Under ZeRO-3 the policy's parameters are
    already partitioned, so a copy would hold empty shards: the reference is loaded again (partitioned the same
    way) instead. With ``autocast_dtype`` (mixed precision) its linear weights are stored in that dtype
    (:func:`precast_linears`)."""
    if is_deepspeed_zero3_enabled():
        if not getattr(model, "name_or_path", ""):
            raise ConfigError("under DeepSpeed ZeRO-3 the reference is reloaded from the policy's path; "
                              "this model has none, so pass ref_model= explicitly")
        ref = type(model).from_pretrained(model.name_or_path, dtype=model.dtype)
    else:
        ref = copy.deepcopy(model)
        if autocast_dtype is not None:
            precast_linears(ref, autocast_dtype)
    return ref.eval().requires_grad_(False)


def precast_linears(ref: nn.Module, dtype: torch.dtype) -> None:
    """Store a frozen reference's linear weights in the autocast dtype. Autocast casts a linear's weight to that
    dtype on every call (it caches casts only of weights that require grad), so the log-probs are the same bit
    for bit, those weights take half the memory and the casts are skipped. A weight that another module also
    uses (a head tied to the input embedding, looked up outside autocast) keeps its dtype."""
    shared = {id(p) for m in ref.modules() if not isinstance(m, nn.Linear) for p in m.parameters(recurse=False)}
    for m in ref.modules():
        if isinstance(m, nn.Linear) and id(m.weight) not in shared:
            m.to(dtype)


def zero3_reference(ref: nn.Module, accelerator) -> nn.Module:
    """The reference as a ZeRO-3 DeepSpeed engine without optimizer: sharded like the policy, its forward gathers
    the parameters layer by layer."""
    import deepspeed

    config = copy.deepcopy(accelerator.state.deepspeed_plugin.deepspeed_config)
    for key in ("optimizer", "scheduler"):
        config.pop(key, None)
    config["zero_optimization"].pop("offload_optimizer", None)
    engine, *_ = deepspeed.initialize(model=ref, config=config)
    engine.eval()  # DeepSpeedEngine.eval returns None, unlike Module.eval
    return engine


def is_fsdp2(accelerator) -> bool:
    """Whether accelerate shards the policy with FSDP v2 (``fully_shard``)."""
    plugin = getattr(accelerator.state, "fsdp_plugin", None)
    return plugin is not None and getattr(plugin, "fsdp_version", 1) == 2


def fsdp2_reference(ref: nn.Module, accelerator) -> nn.Module:
    """The reference sharded as accelerate shards the policy under FSDP2 (``fsdp2_prepare_model``: the same wrap
    policy, so one unit per decoder layer, the same mixed precision, reshard-after-forward and mesh): each rank
    holds 1/world of its parameters (DTensors), and its forward gathers one unit at a time. Its parameters take
    no gradient, so nothing is upcast or reduced."""
    from accelerate.utils.fsdp_utils import fsdp2_prepare_model

    return fsdp2_prepare_model(accelerator, ref).eval()


@torch.no_grad()
def mix_into_reference(policy: nn.Module, ref: nn.Module, alpha: float) -> None:
    """TR-DPO (Gorbatovski et al. 2024, arXiv 2404.09656, eq. 3, soft update): ref ← α·policy + (1 − α)·ref,
    parameter by parameter (same architecture)."""
    for p_ref, p in zip(ref.parameters(), policy.parameters(), strict=True):
        p_ref.mul_(1.0 - alpha).add_(p.to(p_ref.device, p_ref.dtype), alpha=alpha)
