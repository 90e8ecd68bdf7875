"""Compose the pieces into one objective.

    token log-probs → masks/weights (POET, cADPO) → feedback units (granularity) → per-unit scores
    → link loss per unit → sum (ADPO paper) or mean over units → mean over pairs → Σ_k w_k·loss_k
    (+ chosen NLL for cpo / orpo / rpo_alpha)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from prefkit.objectives.granularity import assign_units, unit_sums
from prefkit.objectives.links import LinkParams, UnitScores
from prefkit.objectives.masks import poet_masks, weighted
from prefkit.objectives.registry import LINKS
from prefkit.objectives.types import LossOutput, LossStats, PairLogps


@dataclass(frozen=True)
class ObjectiveSpec:
    loss_type: tuple[str, ...] = ("sigmoid",)
    loss_weights: tuple[float, ...] | None = None
    params: LinkParams = LinkParams()
    granularity: str = "response"
    window_size: int = 4
    num_segments: int = 256
    unit_reduction: str = "sum"
    poet: bool = False
    cpo_alpha: float = 1.0
    rpo_alpha: float | None = None

    @classmethod
    def from_config(cls, cfg) -> ObjectiveSpec:
        return cls(
            loss_type=tuple(cfg.loss_type),
            loss_weights=tuple(cfg.loss_weights) if cfg.loss_weights else None,
            params=LinkParams(cfg.beta, cfg.label_smoothing, cfg.simpo_gamma, cfg.discopop_tau),
            granularity=cfg.granularity,
            window_size=cfg.window_size,
            num_segments=cfg.num_segments,
            unit_reduction=cfg.unit_reduction,
            poet=cfg.poet,
            cpo_alpha=cfg.cpo_alpha,
            rpo_alpha=cfg.rpo_alpha,
        )


class Objective:
    """A preference objective: ``objective(logps) -> LossOutput``. Pure: no state, no model access."""

    def __init__(self, spec: ObjectiveSpec):
        self.spec = spec
        self.links = [LINKS[t] for t in spec.loss_type]
        self.weights = spec.loss_weights or (1.0,) * len(spec.loss_type)
        self.needs_reference = any(s.needs_reference for s in self.links)
        self.score_reduction = "mean" if any(s.length_normalized for s in self.links) else "sum"

    def kept_masks(self, logps: PairLogps) -> tuple[Tensor, Tensor]:
        """Token masks after POET: the tokens the loss sees."""
        if self.spec.poet:
            return poet_masks(logps.chosen_mask, logps.rejected_mask)
        return logps.chosen_mask, logps.rejected_mask

    def _nll_weight(self) -> float:
        w = self.spec.rpo_alpha or 0.0
        for spec, lw in zip(self.links, self.weights):
            if spec.nll_weight == "cpo_alpha":
                w += lw * self.spec.cpo_alpha
            elif spec.nll_weight == "one":
                w += lw
        return w

    def __call__(self, logps: PairLogps) -> LossOutput:
        s = self.spec
        mw, ml = self.kept_masks(logps)
        units = assign_units(mw, ml, s.granularity, s.window_size, s.num_segments)
        n = units.num_units

        def sums(values: Tensor | None, mask: Tensor, weights: Tensor | None, index: Tensor) -> Tensor:
            if values is None:
                return torch.zeros(mask.shape[0], n, dtype=logps.chosen.dtype, device=mask.device)
            return unit_sums(weighted(values, mask, weights), index, n)

        u = UnitScores(
            policy_chosen=sums(logps.chosen, mw, logps.chosen_weights, units.chosen),
            policy_rejected=sums(logps.rejected, ml, logps.rejected_weights, units.rejected),
            ref_chosen=sums(logps.ref_chosen, mw, logps.chosen_weights, units.chosen),
            ref_rejected=sums(logps.ref_rejected, ml, logps.rejected_weights, units.rejected),
            count_chosen=unit_sums(mw.to(logps.chosen.dtype), units.chosen, n),
            count_rejected=unit_sums(ml.to(logps.chosen.dtype), units.rejected, n),
        )
        valid = units.valid.to(logps.chosen.dtype)
        loss = logps.chosen.new_zeros(())
        for spec, w in zip(self.links, self.weights):
            per_unit = spec.fn(u, s.params) * valid
            per_pair = per_unit.sum(1)
            if s.unit_reduction == "mean":
                per_pair = per_pair / valid.sum(1)
            loss = loss + w * per_pair.mean()
        len_w = mw.sum(1).clamp(min=1)
        nll = -(logps.chosen * mw).sum(1) / len_w  # mean token NLL of the kept chosen tokens
        nll_weight = self._nll_weight()
        if nll_weight:
            loss = loss + nll_weight * nll.mean()
        return LossOutput(loss, self._stats(logps, u, units.mu_prime, nll))

    def _stats(self, logps: PairLogps, u: UnitScores, mu: Tensor, nll: Tensor) -> LossStats:
        beta = self.spec.params.beta
        with torch.no_grad():
            pw, pl = u.policy_chosen.sum(1), u.policy_rejected.sum(1)
            first = self.links[0]
            if first.needs_reference:
                rw, rl = beta * (pw - u.ref_chosen.sum(1)), beta * (pl - u.ref_rejected.sum(1))
            elif first.length_normalized:
                rw = beta * pw / u.count_chosen.sum(1).clamp(min=1)
                rl = beta * pl / u.count_rejected.sum(1).clamp(min=1)
            else:
                rw, rl = beta * pw, beta * pl
            extra = {"nll_loss": nll.detach()}
            if self.spec.granularity == "adaptive":
                extra["objective/effective_m"] = mu.detach()
            return LossStats(rw.detach(), rl.detach(), pw.detach(), pl.detach(), mu.detach(), extra)


def build_objective(cfg_or_spec) -> Objective:
    spec = cfg_or_spec if isinstance(cfg_or_spec, ObjectiveSpec) else ObjectiveSpec.from_config(cfg_or_spec)
    return Objective(spec)
