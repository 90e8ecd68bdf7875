"""Incentives d_w, d_l of any objective (arXiv 2604.18239, Sec. 3, eq. 4): ∇ℓ = −d_w·s_w + d_l·s_l.

Computed by autograd on detached copies of the policy token log-probs, so it works for every link,
granularity, POET and token weighting without hand derivations, and never touches the training graph.
With g_t = ∂ℓ/∂log π(y_t) and c_t = ∂z/∂log π(y_t) over kept tokens (1 for summed scores, 1/T for mean
scores), d_w = −Σ_t g^w_t / Σ_t c_t: exactly −∂ℓ/∂z_w whenever ℓ depends on z_w only (DPO, IPO, SimPO…),
and the token-averaged incentive for ADPO units, where ℓ is not a function of z_w alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from prefkit.objectives.types import PairLogps


@dataclass
class Incentives:
    d_w: Tensor  # (B,) per pair
    d_l: Tensor

    def ratio(self, eps: float = 1e-12) -> Tensor:
        return self.d_w / self.d_l.clamp(min=eps)


def compute_incentives(objective, logps: PairLogps, reduction: str | None = None) -> Incentives:
    """Per-pair d_w, d_l with respect to summed or mean scores (``reduction``; default: the objective's own).

    The pair (z, d) must match the score norms it is compared with: mean scores give s/T and d·T per pair."""
    with torch.enable_grad():
        pw = logps.chosen.detach().clone().requires_grad_(True)
        pl = logps.rejected.detach().clone().requires_grad_(True)
        leaf = logps.replace(
            chosen=pw,
            rejected=pl,
            ref_chosen=None if logps.ref_chosen is None else logps.ref_chosen.detach(),
            ref_rejected=None if logps.ref_rejected is None else logps.ref_rejected.detach(),
        )
        gw, gl = torch.autograd.grad(objective(leaf).loss, [pw, pl], allow_unused=True)
    gw = torch.zeros_like(pw) if gw is None else gw
    gl = torch.zeros_like(pl) if gl is None else gl
    mw, ml = objective.kept_masks(logps)
    b = logps.batch_size  # the loss is a batch mean; incentives are per pair
    if (reduction or objective.score_reduction) == "mean":
        cw = cl = torch.ones(b, dtype=gw.dtype, device=gw.device)
    else:
        cw, cl = mw.sum(1).clamp(min=1).to(gw.dtype), ml.sum(1).clamp(min=1).to(gw.dtype)
    return Incentives(d_w=-b * gw.sum(1) / cw, d_l=b * gl.sum(1) / cl)
