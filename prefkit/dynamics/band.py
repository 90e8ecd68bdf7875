"""The disentanglement band (arXiv 2604.18239, Thm. 1): with ρ = cos(s_w, s_l) > 0, to first order the chosen
log-prob rises and the rejected falls iff ρ·‖s_l‖/‖s_w‖ ≤ d_w/d_l ≤ (1/ρ)·‖s_l‖/‖s_w‖."""

from __future__ import annotations

import math

from torch import Tensor


def band_edges(norm_chosen: float, norm_rejected: float, cos: float) -> tuple[float, float]:
    """(lower, upper) edges of d_w/d_l; for ρ ≤ 0 both likelihoods can move apart at any ratio ((0, ∞))."""
    r = norm_rejected / max(norm_chosen, 1e-30)
    if cos <= 0:
        return 0.0, math.inf
    return cos * r, r / cos


def in_band(ratio: Tensor, lower: float, upper: float) -> Tensor:
    return (ratio >= lower) & (ratio <= upper)


def fraction_in_band(ratio: Tensor, lower: float, upper: float) -> float:
    return in_band(ratio, lower, upper).float().mean().item() if ratio.numel() else float("nan")

