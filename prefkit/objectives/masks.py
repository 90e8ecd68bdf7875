"""Token masks and weights applied before grouping: POET truncation and cADPO critical-token weights."""

from __future__ import annotations

import torch
from torch import Tensor


def poet_masks(chosen_mask: Tensor, rejected_mask: Tensor) -> tuple[Tensor, Tensor]:
    """POET (arXiv 2506.09457, Sec. 3): keep only the first min(|y_w|, |y_l|) response tokens of both.

    Responses are response-aligned (column 0 = first token), so the kept tokens are the columns before the
    shorter length. EOS counts as a token: the longer response loses its EOS. The same masks are applied to
    the reference log-probs, and the prompt is untouched (it is not part of these tensors).
    """
    keep = torch.minimum(chosen_mask.sum(1), rejected_mask.sum(1))
    cols = torch.arange(chosen_mask.shape[1], device=chosen_mask.device)
    within = cols[None, :] < keep[:, None]
    return chosen_mask & within, rejected_mask & within


def weighted(values: Tensor, mask: Tensor, weights: Tensor | None) -> Tensor:
    """Zero outside the mask; multiplied by per-token weights where given (cADPO, arXiv 2411.19943 eq. 5)."""
    out = values.masked_fill(~mask, 0.0)
    return out if weights is None else out * weights.to(out.dtype)


def ld_weights(chosen_mask: Tensor, rejected_mask: Tensor, alpha: float,
               dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
    """LD-DPO (Liu et al. 2024, arXiv 2409.06411, eq. 8): token weights 1 on the first min(|y_w|, |y_l|) response
    tokens and α on the longer response's tail, so that the excess length counts α-fold in every score (policy
    and reference alike). α = 1 is DPO; α = 0 drops the tail, which is POET's truncation."""
    keep = torch.minimum(chosen_mask.sum(1), rejected_mask.sum(1))
    cols = torch.arange(chosen_mask.shape[1], device=chosen_mask.device)
    tail = cols[None, :] >= keep[:, None]
    w = torch.ones(tail.shape, dtype=dtype, device=tail.device).masked_fill(tail, alpha)
    return w, w


def combine_weights(a: Tensor | None, b: Tensor) -> Tensor:
    """Product of two per-token weightings (cADPO's and LD-DPO's), either possibly absent."""
    return b if a is None else a.to(b.dtype) * b
