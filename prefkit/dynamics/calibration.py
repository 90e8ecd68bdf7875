"""Reward calibration (RC, arXiv 2604.18239, Sec. 5): rebalance d_w/d_l into the disentanglement band for any
objective without changing it.

Log-domain EMAs of the batch-mean d_w, d_l give r = d_w/d_l; of ‖s_w‖, ‖s_l‖ give r* = ‖s_l‖/‖s_w‖ (the band's
geometric centre). α = sqrt(r*/r) (no gradient) scales the chosen gradient by α and the rejected one by 1/α,
so the effective ratio becomes r*. Statistics are gathered over an optimizer step's micro-batches and
committed once per step (averaged over micro-batches and processes), so α is the same on every rank and a
run with gradient accumulation matches a multi-process run with the same global batch. Applied per token as x̂ = sg(x) + α·(x − sg(x)): the forward value is
bit-for-bit x (x − sg(x) is exactly 0), unlike α·x + (1−α)·sg(x), which rounds. The EMAs start from the first
observed value (no bias correction needed); α = 1 until both statistics have been seen.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from prefkit.dynamics.incentives import Incentives
from prefkit.dynamics.scores import ScoreStats
from prefkit.objectives.types import PairLogps

_KEYS = ("log_d_w", "log_d_l", "log_norm_w", "log_norm_l")


def _scaled(x: Tensor, a: float) -> Tensor:
    sg = x.detach()
    return sg + a * (x - sg)


class RewardCalibrator:
    def __init__(self, ema: float = 0.98, reduce_mean: Callable[[Tensor], Tensor] | None = None):
        self.ema = ema
        # under distributed training every rank must use the same α: batch means are reduced across ranks
        self.reduce_mean = reduce_mean or (lambda t: t)
        self.state: dict[str, float | None] = dict.fromkeys(_KEYS)
        self.pending: dict[str, list[float]] = {"incentives": [], "scores": []}

    def _push(self, key: str, value: float) -> None:
        if not math.isfinite(value):
            return
        old = self.state[key]
        self.state[key] = value if old is None else self.ema * old + (1 - self.ema) * value

    def update_incentives(self, inc: Incentives) -> None:
        """Record one micro-batch's mean incentives (committed at the end of the optimizer step)."""
        self.pending["incentives"].append([inc.d_w.double().mean().item(), inc.d_l.double().mean().item(), 1.0])

    def update_scores(self, stats: ScoreStats) -> None:
        self.pending["scores"].append([stats.norm_chosen, stats.norm_rejected, 1.0])

    def commit(self) -> None:
        """Fold the step's statistics into the EMAs: averaged over micro-batches, then over processes.

        Every process calls this at the same step boundaries, with the same pending kinds."""
        for kind, keys in (("incentives", ("log_d_w", "log_d_l")), ("scores", ("log_norm_w", "log_norm_l"))):
            rows = self.pending[kind]
            local = torch.tensor(rows, dtype=torch.float64).sum(0) if rows else torch.zeros(3, dtype=torch.float64)
            total = self.reduce_mean(local)
            if total[2] <= 0:
                continue
            a, b = (total[:2] / total[2]).tolist()
            if a > 0 and b > 0:  # a log-domain ratio needs both positive
                self._push(keys[0], math.log(a))
                self._push(keys[1], math.log(b))
        self.pending = {"incentives": [], "scores": []}

    def alpha(self) -> float:
        s = self.state
        if any(v is None for v in s.values()):
            return 1.0
        log_r = s["log_d_w"] - s["log_d_l"]
        log_r_star = s["log_norm_l"] - s["log_norm_w"]
        return math.exp(0.5 * (log_r_star - log_r))

    def apply(self, logps: PairLogps) -> PairLogps:
        a = self.alpha()
        return logps.replace(chosen=_scaled(logps.chosen, a), rejected=_scaled(logps.rejected, 1.0 / a))

    def state_dict(self) -> dict:
        return {**self.state, "pending": {k: [list(r) for r in v] for k, v in self.pending.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.state = {k: state.get(k) for k in _KEYS}
        pending = state.get("pending") or {}
        self.pending = {"incentives": list(pending.get("incentives", [])), "scores": list(pending.get("scores", []))}
