"""Gradient norms of the response scores (arXiv 2604.18239, Sec. 3): ‖s_w‖, ‖s_l‖ and ρ = cos(s_w, s_l), s = ∇_θ z of the
batch-mean response scores, over a parameter subset.

Cost: two extra backward passes through the part of the graph that leads to the chosen parameters. The
default (``auto``) takes the trainable parameters of the last transformer block — the LoRA adapters there
for a peft model — so those passes stop at the last block and cost a small fraction of a step; ``lora`` and
``trainable`` walk the whole network (about 2 backward passes more).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from prefkit.objectives.types import PairLogps


@dataclass
class ScoreGradNorms:
    """0-dim tensors on the training device (floats where built by hand): read on the host only when logged."""

    norm_chosen: Tensor | float
    norm_rejected: Tensor | float
    cos: Tensor | float


def _last_block_prefix(model: nn.Module) -> str | None:
    layer_ids = []
    for name, _ in model.named_parameters():
        parts = name.split(".")
        for i, p in enumerate(parts[:-1]):
            if p in ("layers", "h", "blocks", "layer") and parts[i + 1].isdigit():
                layer_ids.append((int(parts[i + 1]), ".".join(parts[: i + 2]) + "."))
                break
    return max(layer_ids)[1] if layer_ids else None


def select_params(model: nn.Module, which: str = "auto") -> list[nn.Parameter]:
    """Trainable parameters for the score gradient norms: lm_head | last_block | lora | trainable | auto (=last_block,
    falling back to all trainable parameters when the last block has none)."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if which == "lm_head":
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        chosen = [head.weight] if head is not None and head.weight.requires_grad else []
    elif which == "lora":
        chosen = [p for n, p in named if "lora_" in n]
    elif which == "trainable":
        chosen = [p for _, p in named]
    else:
        prefix = _last_block_prefix(model)
        chosen = [p for n, p in named if prefix and n.startswith(prefix)]
    return chosen or [p for _, p in named]


def response_scores(logps: PairLogps, masks: tuple[Tensor, Tensor], reduction: str) -> tuple[Tensor, Tensor]:
    """Per-pair z_w, z_l: summed (or mean) policy log-prob over the kept tokens."""
    mw, ml = masks
    zw, zl = (logps.chosen * mw).sum(1), (logps.rejected * ml).sum(1)
    if reduction == "mean":
        zw, zl = zw / mw.sum(1).clamp(min=1), zl / ml.sum(1).clamp(min=1)
    return zw, zl


def score_grad_norms(logps: PairLogps, params: list[nn.Parameter], masks: tuple[Tensor, Tensor], reduction: str) -> ScoreGradNorms:
    """Norms and cosine of ∇ mean(z_w) and ∇ mean(z_l); the training graph is retained for backward."""
    zw, zl = response_scores(logps, masks, reduction)
    gw = torch.autograd.grad(zw.mean(), params, retain_graph=True, allow_unused=True)
    gl = torch.autograd.grad(zl.mean(), params, retain_graph=True, allow_unused=True)
    flat_w = torch.cat([(g if g is not None else torch.zeros_like(p)).flatten().float() for g, p in zip(gw, params)])
    flat_l = torch.cat([(g if g is not None else torch.zeros_like(p)).flatten().float() for g, p in zip(gl, params)])
    nw, nl = flat_w.norm(), flat_l.norm()
    cos = (flat_w @ flat_l) / (nw * nl).clamp(min=1e-30)
    return ScoreGradNorms(nw, nl, cos)
