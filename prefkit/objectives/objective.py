"""Compose the pieces into one objective.

    token log-probs → masks/weights (POET, cADPO) → feedback units (granularity) → per-unit scores
    → link loss per unit → sum (ADPO paper) or mean over units → mean over pairs → Σ_k w_k·loss_k
    (+ chosen NLL for cpo / orpo; rpo_alpha is the ``sft`` link with weight rpo_alpha, as in TRL 1.16)
"""

from __future__ import annotations

import torch
from torch import Tensor

from prefkit.objectives.granularity import assign_units, unit_sums
from prefkit.objectives.links import UnitLogps, margin
from prefkit.objectives.masks import combine_weights, ld_weights, poet_masks, weighted
from prefkit.objectives.registry import LINKS
from prefkit.objectives.spec import ObjectiveSpec
from prefkit.objectives.types import LossOutput, LossStats, PairLogps


class Objective:
    """A preference objective: ``objective(logps) -> LossOutput``. Pure: no state, no model access."""

    def __init__(self, spec: ObjectiveSpec):
        self.spec = spec
        self.link_specs = [LINKS[t] for t in spec.loss_type]
        self.weights = spec.loss_weights or (1.0,) * len(spec.loss_type)
        if spec.rpo_alpha:  # TRL 1.16 spells RPO loss_type [sigmoid, sft] with loss_weights [1, α]
            self.link_specs = [*self.link_specs, LINKS["sft"]]
            self.weights = (*self.weights, spec.rpo_alpha)
        self.needs_reference = any(s.needs_reference for s in self.link_specs)
        self.score_reduction = "mean" if any(s.length_normalized for s in self.link_specs) else "sum"
        # what reads the reference token by token rather than summed over the whole response: finer units,
        # POET's cut, per-token weights (cADPO, LD-DPO)
        self.needs_token_reference = self.needs_reference and (
            spec.granularity != "response" or spec.poet or spec.use_token_weights or spec.ld_alpha is not None)

    def kept_masks(self, logps: PairLogps) -> tuple[Tensor, Tensor]:
        """Token masks after POET: the tokens the loss sees."""
        if self.spec.poet:
            return poet_masks(logps.chosen_mask, logps.rejected_mask)
        return logps.chosen_mask, logps.rejected_mask

    def _nll_weight(self) -> float:
        w = 0.0
        for spec, lw in zip(self.link_specs, self.weights):
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
        wc, wr = logps.chosen_weights, logps.rejected_weights
        if s.ld_alpha is not None:
            ldc, ldr = ld_weights(mw, ml, s.ld_alpha, logps.chosen.dtype)
            wc, wr = combine_weights(wc, ldc), combine_weights(wr, ldr)

        def sums(values: Tensor | None, mask: Tensor, weights: Tensor | None, index: Tensor) -> Tensor:
            if values is None:
                return torch.zeros(mask.shape[0], n, dtype=logps.chosen.dtype, device=mask.device)
            return unit_sums(weighted(values, mask, weights), index, n)

        u = UnitLogps(
            policy_chosen=sums(logps.chosen, mw, wc, units.chosen),
            policy_rejected=sums(logps.rejected, ml, wr, units.rejected),
            ref_chosen=sums(logps.ref_chosen, mw, wc, units.chosen),
            ref_rejected=sums(logps.ref_rejected, ml, wr, units.rejected),
            count_chosen=unit_sums(mw.to(logps.chosen.dtype), units.chosen, n),
            count_rejected=unit_sums(ml.to(logps.chosen.dtype), units.rejected, n),
        )
        valid = units.valid.to(logps.chosen.dtype)
        pair_w = wpo_weights(logps, mw, ml) if s.use_weighting else None
        loss = logps.chosen.new_zeros(())
        for spec, w in zip(self.link_specs, self.weights):
            if spec.batch_level:
                loss = loss + w * spec.fn(u, s)
                continue
            per_unit = spec.fn(u, s) * valid
            per_pair = per_unit.sum(1)
            if s.unit_reduction == "mean":
                per_pair = per_pair / valid.sum(1)
            if pair_w is not None:
                per_pair = per_pair * pair_w
            loss = loss + w * per_pair.mean()
        len_w = mw.sum(1).clamp(min=1)
        nll = -(logps.chosen * mw).sum(1) / len_w  # mean token NLL of the kept chosen tokens
        nll_weight = self._nll_weight()
        if nll_weight:
            loss = loss + nll_weight * nll.mean()
        return LossOutput(loss, self._stats(logps, u, units.mu_prime, nll, units.valid))

    def _stats(self, logps: PairLogps, u: UnitLogps, mu: Tensor, nll: Tensor, valid: Tensor) -> LossStats:
        beta = self.spec.beta
        with torch.no_grad():
            pw, pl = u.policy_chosen.sum(1), u.policy_rejected.sum(1)
            first = self.link_specs[0]
            # sft alone needs no reference, but TRL logs implicit rewards whenever one is at hand
            if first.needs_reference or (first.batch_level and logps.ref_chosen is not None):
                rw, rl = beta * (pw - u.ref_chosen.sum(1)), beta * (pl - u.ref_rejected.sum(1))
            elif first.length_normalized:
                rw = beta * pw / u.count_chosen.sum(1).clamp(min=1)
                rl = beta * pl / u.count_rejected.sum(1).clamp(min=1)
            else:
                rw, rl = beta * pw, beta * pl
            extra = {"nll_loss": nll.detach()}
            if self.spec.granularity == "adaptive":
                extra["objective/effective_m"] = mu.detach()
            if self.spec.loss_type[0] == "sigmoid" and logps.ref_chosen is not None:
                extra.update(self._unit_weights(u, valid))
            return LossStats(rw.detach(), rl.detach(), pw.detach(), pl.detach(), mu.detach(), extra)

    def _unit_weights(self, u: UnitLogps, valid: Tensor) -> dict[str, Tensor]:
        """What separates ADPO's gradient from DPO's (docs/dynamics.md): DPO weights a pair's summed gradient by
        σ(−β·Σ_uΔ_u), ADPO (sum over units) each unit's by σ(−β·Δ_u), Δ the margin the loss uses. Logged: DPO's
        response weight per pair and, with units finer than the response, the mean and the (population) spread
        of the unit weights over the batch's valid units."""
        beta = self.spec.beta
        h = margin(u, self.spec)
        out = {"adpo/response_weight": torch.sigmoid(-beta * (h * valid).sum(1)).detach()}
        if self.spec.granularity != "response":
            # masked sums, not a boolean gather: its output size would be read on the host (a sync per step)
            w, m = torch.sigmoid(-beta * h.detach()), valid.to(h.dtype)
            n = m.sum().clamp(min=1)
            mean = (w * m).sum() / n
            out["adpo/unit_weight_mean"] = mean
            out["adpo/unit_weight_std"] = (((w - mean) ** 2 * m).sum() / n).sqrt()
        return out


def wpo_weights(logps: PairLogps, chosen_mask: Tensor, rejected_mask: Tensor) -> Tensor:
    """WPO (Zhou et al. 2024, arXiv 2406.11827, eq. 2 with TRL's alignment): per pair, the detached product over
    chosen and rejected of exp(mean over kept tokens of log π(y_t) − log Σ_v π(v)²), the probability of the
    response under the current policy relative to the policy's own sampling sharpness."""
    if logps.chosen_sq is None or logps.rejected_sq is None:
        raise ValueError("--use_weighting needs log Σ p² per token: compute the log-probs with want_sq=True")

    def mean_aligned(lp: Tensor, sq: Tensor, mask: Tensor) -> Tensor:
        return ((lp.detach() - sq) * mask).sum(1) / mask.sum(1).clamp(min=1)

    return torch.exp(mean_aligned(logps.chosen, logps.chosen_sq, chosen_mask)
                     + mean_aligned(logps.rejected, logps.rejected_sq, rejected_mask))


def build_objective(cfg_or_spec) -> Objective:
    """The objective of an ObjectiveSpec, or of a config's objective options."""
    spec = cfg_or_spec if isinstance(cfg_or_spec, ObjectiveSpec) else ObjectiveSpec.from_config(cfg_or_spec)
    return Objective(spec)
