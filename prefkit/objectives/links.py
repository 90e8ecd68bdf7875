"""Link losses: the per-feedback-unit loss of each preference objective.

Every link maps :class:`UnitLogps` — per pair and feedback unit (ADPO granularity; one unit = classic
response level) the summed policy and reference token log-probs and token counts — to a (B, U) loss.
Formulas follow the cited papers and, for the names TRL has, TRL's ``DPOTrainer`` exactly (tests compare).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

if TYPE_CHECKING:
    from prefkit.objectives.spec import ObjectiveSpec

F_DIVERGENCES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")


@dataclass
class UnitLogps:
    """Per pair (rows) and feedback unit (columns): sums of token log-probs over the unit's kept tokens."""

    policy_chosen: Tensor
    policy_rejected: Tensor
    ref_chosen: Tensor
    ref_rejected: Tensor
    count_chosen: Tensor
    count_rejected: Tensor

    @property
    def logratio_chosen(self) -> Tensor:
        return self.policy_chosen - self.ref_chosen

    @property
    def logratio_rejected(self) -> Tensor:
        return self.policy_rejected - self.ref_rejected

    @property
    def delta(self) -> Tensor:
        """h = log-ratio margin (chosen − rejected): DPO's implicit reward difference / β."""
        return self.logratio_chosen - self.logratio_rejected


def token_mean(total: Tensor, count: Tensor) -> Tensor:
    """A unit's sum divided by its token count (a unit without tokens has sum 0 and stays 0)."""
    return total / count.clamp(min=1)


def f_rewards(u: UnitLogps, p: ObjectiveSpec) -> tuple[Tensor, Tensor]:
    """f-DPO (Wang et al. 2023, arXiv 2309.16240, Thm. 1): the implicit reward of a response is f′(π/π_ref) for the
    f-divergence regularising the policy; reverse KL (f′(t) = log t + 1, constants cancel) gives the log-ratio
    of DPO. forward KL: 1 − 1/t; Jensen-Shannon: log 2t/(t+1); α-divergence: (t^(α−1) − 1)/(α−1) (TRL's forms)."""
    lc, lr = u.logratio_chosen, u.logratio_rejected
    kind, a = p.f_divergence_type, p.f_alpha_divergence_coef
    if kind == "reverse_kl" or (kind == "alpha_divergence" and abs(a - 1.0) < 1e-6):
        return lc, lr
    if kind == "forward_kl":
        return 1 - torch.exp(-lc), 1 - torch.exp(-lr)
    if kind == "js_divergence":
        return math.log(2) + F.logsigmoid(lc), math.log(2) + F.logsigmoid(lr)
    # exp clamped, as TRL, so that a large log-ratio stays finite
    return (torch.exp(((a - 1) * lc).clamp(max=80.0)) - 1) / (a - 1), (torch.exp(((a - 1) * lr).clamp(max=80.0)) - 1) / (a - 1)


def margin(u: UnitLogps, p: ObjectiveSpec) -> Tensor:
    """h: the implicit-reward margin / β, chosen − rejected (the log-ratio margin under reverse KL)."""
    if p.f_divergence_type == "reverse_kl":
        return u.delta
    sc, sr = f_rewards(u, p)
    return sc - sr


def smoothed_logistic(z: Tensor, eps: float) -> Tensor:
    """−(1−ε)·log σ(z) − ε·log σ(−z): the logistic loss with label smoothing ε (conservative DPO's form)."""
    return -(1 - eps) * F.logsigmoid(z) - eps * F.logsigmoid(-z)


def sigmoid(u: UnitLogps, p: ObjectiveSpec) -> Tensor:
    """DPO (Rafailov et al. 2023, arXiv 2305.18290, eq. 7): −log σ(β·h); with label smoothing ε the
    conservative DPO of Mitchell (2023): −(1−ε)·log σ(β·h) − ε·log σ(−β·h)."""
    z = p.beta * margin(u, p)
    return smoothed_logistic(z, p.label_smoothing)


def sigmoid_norm(u: UnitLogps, p: ObjectiveSpec) -> Tensor:
    """Length-normalised DPO (TRL's ``sigmoid_norm``; SimPO's per-token normalisation, arXiv 2405.14734, with the
    reference kept): −log σ(β·h̄), h̄ the margin of *mean* token log-ratios; label smoothing as ``sigmoid``."""
    sc, sr = f_rewards(u, p)
    z = p.beta * (token_mean(sc, u.count_chosen) - token_mean(sr, u.count_rejected))
    return smoothed_logistic(z, p.label_smoothing)


def robust(u: UnitLogps, p: ObjectiveSpec) -> Tensor:
    """Robust DPO (Chowdhury et al. 2024, arXiv 2403.00409, eq. 9): unbiased under label-flip rate ε."""
    z = p.beta * margin(u, p)
    eps = p.label_smoothing
    return (-(1 - eps) * F.logsigmoid(z) + eps * F.logsigmoid(-z)) / (1 - 2 * eps)


def hinge(u: UnitLogps, p: ObjectiveSpec) -> Tensor:
    """SLiC-HF (Zhao et al. 2023, arXiv 2305.10425, eq. 2) on log-ratios: max(0, 1 − β·h)."""
    return torch.relu(1 - p.beta * margin(u, p))


def ipo(u: UnitLogps, p: ObjectiveSpec) -> Tensor:
    """IPO (Azar et al. 2023, arXiv 2310.12036, eq. 17): (h̄ − 1/(2β))², h̄ the margin of *mean* token
    log-ratios (TRL's normalisation, confirmed by the IPO authors)."""
    sc, sr = f_rewards(u, p)
    h = token_mean(sc, u.count_chosen) - token_mean(sr, u.count_rejected)
    return (h - 1 / (2 * p.beta)) ** 2


def exo_pair(u: UnitLogps, p: ObjectiveSpec) -> Tensor:
    """EXO (Ji et al. 2024, arXiv 2402.00856, eq. 16): KL(p_θ ‖ p_ε) over {chosen, rejected}, ε = label_smoothing
    (TRL's default 1e-3 when 0 is given, since log ε must be finite)."""
    eps = p.label_smoothing or 1e-3
    z = p.beta * margin(u, p)
    qw, ql = torch.sigmoid(z), torch.sigmoid(-z)
    return qw * (F.logsigmoid(z) - math.log1p(-eps)) + ql * (F.logsigmoid(-z) - math.log(eps))


def nca_pair(u: UnitLogps, p: ObjectiveSpec) -> Tensor:
    """NCA (Chen et al. 2024, arXiv 2402.05369, eq. 12): −log σ(r_w) − ½log σ(−r_w) − ½log σ(−r_l), r = β·log-ratio."""
    rw, rl = p.beta * u.logratio_chosen, p.beta * u.logratio_rejected
    return -F.logsigmoid(rw) - 0.5 * F.logsigmoid(-rw) - 0.5 * F.logsigmoid(-rl)


def bco_pair(u: UnitLogps, p: ObjectiveSpec) -> Tensor:
    """BCO on pairs (Jung et al. 2024, arXiv 2404.04656, eq. 3 without the running shift δ, as TRL):
    −log σ(r_w) − log σ(−r_l)."""
    return -F.logsigmoid(p.beta * u.logratio_chosen) - F.logsigmoid(-p.beta * u.logratio_rejected)


def sppo_hard(u: UnitLogps, p: ObjectiveSpec) -> Tensor:
    """SPPO with hard win probabilities (Wu et al. 2024, arXiv 2405.00675, eq. 4.7, P=1 for the winner):
    (log-ratio_w − 1/(2β))² + (log-ratio_l + 1/(2β))²."""
    return (u.logratio_chosen - 0.5 / p.beta) ** 2 + (u.logratio_rejected + 0.5 / p.beta) ** 2


def aot(u: UnitLogps, p: ObjectiveSpec) -> Tensor:
    """AOT (Melnyk et al. 2024, arXiv 2406.05882, eq. 9): DPO on the batch-sorted policy and reference margins,
    i.e. first-order stochastic dominance over the batch (so a pair's loss depends on its batch mates)."""
    pol = torch.sort(u.policy_chosen - u.policy_rejected, dim=0).values
    ref = torch.sort(u.ref_chosen - u.ref_rejected, dim=0).values
    z = p.beta * (pol - ref)
    return smoothed_logistic(z, p.label_smoothing)


def aot_unpaired(u: UnitLogps, p: ObjectiveSpec) -> Tensor:
    """AOT for unpaired data (arXiv 2406.05882, eq. 8): DPO on the batch-sorted chosen log-ratios minus the
    batch-sorted rejected ones — the chosen log-ratio distribution dominates the rejected one."""
    z = p.beta * (torch.sort(u.logratio_chosen, dim=0).values - torch.sort(u.logratio_rejected, dim=0).values)
    return smoothed_logistic(z, p.label_smoothing)


def sft(u: UnitLogps, p: ObjectiveSpec) -> Tensor:
    """Supervised NLL of the chosen responses (TRL's ``sft``; with weight α the RPO term of Pang et al. 2024,
    arXiv 2404.19733): −Σ log π(y_w) / Σ |y_w| over the batch's kept chosen tokens. A *batch* link: a scalar."""
    return -u.policy_chosen.sum() / u.count_chosen.sum().clamp(min=1)


def apo_zero(u: UnitLogps, p: ObjectiveSpec) -> Tensor:
    """APO-zero (D'Oosterlinck et al. 2024, arXiv 2408.06266, eq. 7): raise chosen, lower rejected likelihood:
    1 − σ(r_w) + σ(r_l)."""
    return 1 - torch.sigmoid(p.beta * u.logratio_chosen) + torch.sigmoid(p.beta * u.logratio_rejected)


def apo_down(u: UnitLogps, p: ObjectiveSpec) -> Tensor:
    """APO-down (arXiv 2408.06266, eq. 8): lower both, rejected more: σ(r_w) + 1 − σ(β·h)."""
    return torch.sigmoid(p.beta * u.logratio_chosen) + 1 - torch.sigmoid(p.beta * u.delta)


def discopop(u: UnitLogps, p: ObjectiveSpec) -> Tensor:
    """DiscoPOP / log-ratio modulated loss (Chan Lu et al. 2024, arXiv 2406.08414, eq. 5):
    blend of logistic and exponential losses, mixed by σ(β·h/τ)."""
    z = p.beta * margin(u, p)
    mix = torch.sigmoid(z / p.discopop_tau)
    return -F.logsigmoid(z) * (1 - mix) + torch.exp(-z) * mix


def dpop(u: UnitLogps, p: ObjectiveSpec) -> Tensor:
    """DPO-Positive (Pal et al. 2024, arXiv 2402.13228, eq. 3): −log σ(β·(h − λ·max(0, −log π/π_ref(y_w)))): DPO
    plus a penalty, inside the sigmoid, once the chosen response falls below its reference likelihood."""
    return -F.logsigmoid(p.beta * (u.delta - p.dpop_lambda * torch.relu(-u.logratio_chosen)))


def simpo(u: UnitLogps, p: ObjectiveSpec) -> Tensor:
    """SimPO (Meng et al. 2024, arXiv 2405.14734, eq. 6): −log σ(β·(z̄_w − z̄_l) − γ), z̄ the *mean* token log-prob
    of the policy (no reference); per unit under ADPO granularity. Label smoothing as in TRL's CPOTrainer."""
    z = p.beta * (token_mean(u.policy_chosen, u.count_chosen) - token_mean(u.policy_rejected, u.count_rejected)) - p.simpo_gamma
    return smoothed_logistic(z, p.label_smoothing)


def cpo(u: UnitLogps, p: ObjectiveSpec) -> Tensor:
    """CPO (Xu et al. 2024, arXiv 2401.08417, eq. 3): −log σ(β·(z_w − z_l)) on summed policy log-probs, no
    reference; the behaviour-cloning NLL on chosen (weight cpo_alpha) is added by the objective."""
    z = p.beta * (u.policy_chosen - u.policy_rejected)
    return smoothed_logistic(z, p.label_smoothing)


def orpo(u: UnitLogps, p: ObjectiveSpec) -> Tensor:
    """ORPO (Hong et al. 2024, arXiv 2403.07691, eq. 6-7): −β·log σ(log odds(ȳ_w) − log odds(ȳ_l)) with
    odds = p/(1−p) of the mean token log-prob; the NLL on chosen (weight 1) is added by the objective."""
    mw = token_mean(u.policy_chosen, u.count_chosen)
    ml = token_mean(u.policy_rejected, u.count_rejected)
    # log(1 − e^m) for m < 0, stable near 0
    log_odds = (mw - ml) - (torch.log(-torch.expm1(mw)) - torch.log(-torch.expm1(ml)))
    return -p.beta * F.logsigmoid(log_odds)
