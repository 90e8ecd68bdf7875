"""Reward calibration (RC, arXiv 2604.18239, Sec. 5): rebalance d_w/d_l into the disentanglement band for any
objective without changing it.

Log-domain EMAs of the batch-mean d_w, d_l give r = d_w/d_l; of ‖s_w‖, ‖s_l‖ give r* = ‖s_l‖/‖s_w‖ (the band's
geometric centre); a linear EMA of ρ = cos(s_w, s_l) gives the band [ρ·r*, r*/ρ]. The calibrated ratio is
α²·r, with α (no gradient) scaling the chosen gradient and 1/α the rejected one:

- target ``centre`` (the authors'): α = sqrt(r*/r), every step;
- target ``band``: α = 1 while r is inside the band, else the ratio moves to the nearest edge
  (α = sqrt(edge/r)); with ρ ≤ 0 every ratio is inside, so α = 1.

Statistics are gathered over an optimizer step's micro-batches and committed once per step (averaged over
micro-batches and processes), so α is the same on every rank and a run with gradient accumulation matches a
multi-process run with the same global batch. Applied per token as x̂ = sg(x) + α·(x − sg(x)): the forward
value is bit-for-bit x (x − sg(x) is exactly 0), unlike α·x + (1−α)·sg(x), which rounds. The EMAs start from
the first observed value (no bias correction needed); α = 1 until all statistics the target needs have been seen.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from prefkit.dynamics.grad_norms import ScoreGradNorms
from prefkit.dynamics.incentives import Incentives
from prefkit.objectives.types import PairLogps

_KEYS = ("log_d_w", "log_d_l", "log_norm_w", "log_norm_l", "cos")
TARGETS = ("centre", "band")


def _scaled(x: Tensor, a: float) -> Tensor:
    sg = x.detach()
    return sg + a * (x - sg)


def calibration_log_shift(log_r: float, log_r_star: float, cos: float | None, target: str) -> float:
    """log(α²): how far RC moves log(d_w/d_l). ``cos`` is needed only by the ``band`` target."""
    if target == "centre":
        return log_r_star - log_r
    if cos is None or cos <= 0:
        return 0.0  # no cosine yet, or ρ ≤ 0: the band is (0, ∞)
    half = -math.log(min(cos, 1.0))
    lower, upper = log_r_star - half, log_r_star + half
    return min(max(0.0, lower - log_r), upper - log_r)


class RewardCalibrator:
    def __init__(self, ema: float = 0.98, reduce_mean: Callable[[Tensor], Tensor] | None = None,
                 target: str = "centre", fixed_alpha: float | None = None):
        if target not in TARGETS:
            raise ValueError(f"RC target must be one of {TARGETS}, got {target!r}")
        if fixed_alpha is not None and not (math.isfinite(fixed_alpha) and fixed_alpha > 0):
            raise ValueError(f"RC fixed alpha must be finite and > 0, got {fixed_alpha!r}")
        self.ema = ema
        self.target = target
        # a control: statistics, norms and metrics as configured, but this α is applied instead of RC's own
        self.fixed_alpha = fixed_alpha
        # under distributed training every rank must use the same α: batch means are reduced across ranks
        self.reduce_mean = reduce_mean or (lambda t: t)
        self.state: dict[str, float | None] = dict.fromkeys(_KEYS)
        self.pending: dict[str, list[list[float]]] = {"incentives": [], "scores": []}

    def _push(self, key: str, value: float) -> None:
        old = self.state[key]
        self.state[key] = value if old is None else self.ema * old + (1 - self.ema) * value

    def update_incentives(self, inc: Incentives) -> None:
        """Record one micro-batch's mean incentives (committed at the end of the optimizer step)."""
        self.pending["incentives"].append([inc.d_w.double().mean().item(), inc.d_l.double().mean().item(), 1.0])

    def update_grad_norms(self, stats: ScoreGradNorms) -> None:
        self.pending["scores"].append([stats.norm_chosen, stats.norm_rejected, stats.cos, 1.0])

    def commit(self) -> None:
        """Fold the step's statistics into the EMAs: averaged over micro-batches, then over processes.

        Every process calls this at the same step boundaries and reduces both kinds (zeros when it has none),
        so the collectives match even where only some ranks measured. A micro-batch with any non-finite value
        is left out whole (its count too), before anything is averaged: one NaN or inf must neither reach an EMA
        nor move one half of a ratio without the other."""
        for kind, width in (("incentives", 3), ("scores", 4)):
            rows = [r for r in self.pending[kind] if all(math.isfinite(x) for x in r)]
            local = torch.tensor(rows, dtype=torch.float64).sum(0) if rows else torch.zeros(width, dtype=torch.float64)
            total = self.reduce_mean(local)
            if total[-1] <= 0:
                continue
            means = (total[:-1] / total[-1]).tolist()
            a, b = means[:2]
            if not (a > 0 and b > 0 and all(math.isfinite(m) for m in means)):  # log-domain ratios need both > 0
                continue
            if kind == "incentives":
                self._push("log_d_w", math.log(a))
                self._push("log_d_l", math.log(b))
            else:
                self._push("log_norm_w", math.log(a))
                self._push("log_norm_l", math.log(b))
                self._push("cos", means[2])
        self.pending = {"incentives": [], "scores": []}

    def _logs(self) -> tuple[float, float] | None:
        s = self.state
        if any(s[k] is None for k in _KEYS[:4]):
            return None
        return s["log_d_w"] - s["log_d_l"], s["log_norm_l"] - s["log_norm_w"]

    def alpha(self) -> float:
        if self.fixed_alpha is not None:
            return self.fixed_alpha
        logs = self._logs()
        if logs is None:
            return 1.0
        return math.exp(0.5 * calibration_log_shift(*logs, self.state["cos"], self.target))

    def metrics(self) -> dict[str, float]:
        """rc/alpha always; the EMA ratio r, target r* and whether r is inside the band once they are known."""
        out = {"rc/alpha": self.alpha()}
        logs = self._logs()
        if logs is not None:
            log_r, log_r_star = logs
            out["rc/ratio"] = math.exp(log_r)
            out["rc/target"] = math.exp(log_r_star)
            cos = self.state["cos"]
            if cos is not None:
                out["rc/in_band"] = float(calibration_log_shift(log_r, log_r_star, cos, "band") == 0.0)
        return out

    def apply(self, logps: PairLogps) -> PairLogps:
        a = self.alpha()
        return logps.replace(chosen=_scaled(logps.chosen, a), rejected=_scaled(logps.rejected, 1.0 / a))

    def state_dict(self) -> dict:
        return {**self.state, "pending": {k: [list(r) for r in v] for k, v in self.pending.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.state = {k: state.get(k) for k in _KEYS}
        pending = state.get("pending") or {}
        self.pending = {"incentives": list(pending.get("incentives", [])), "scores": list(pending.get("scores", []))}
