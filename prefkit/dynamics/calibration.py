"""Reward calibration (RC, arXiv 2604.18239, Sec. 5): rebalance d_w/d_l into the disentanglement band for any
objective without changing it.

Log-domain EMAs of the batch-mean d_w, d_l give r = d_w/d_l; of ‖s_w‖, ‖s_l‖ give r* = ‖s_l‖/‖s_w‖ (the band's
geometric centre). α = sqrt(r*/r) (no gradient) scales the chosen gradient by α and the rejected one by 1/α,
so the effective ratio becomes r*. Applied per token as x̂ = sg(x) + α·(x − sg(x)): the forward value is
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

    def _push(self, key: str, value: float) -> None:
        if not math.isfinite(value):
            return
        old = self.state[key]
        self.state[key] = value if old is None else self.ema * old + (1 - self.ema) * value

    def update_incentives(self, inc: Incentives) -> None:
        means = self.reduce_mean(torch.stack([inc.d_w.mean(), inc.d_l.mean()]).double())
        dw, dl = means.tolist()
        if dw > 0 and dl > 0:  # a log-domain ratio needs both incentives positive
            self._push("log_d_w", math.log(dw))
            self._push("log_d_l", math.log(dl))

    def update_scores(self, stats: ScoreStats) -> None:
        norms = self.reduce_mean(torch.tensor([stats.norm_chosen, stats.norm_rejected], dtype=torch.float64))
        nw, nl = norms.tolist()
        if nw > 0 and nl > 0:
            self._push("log_norm_w", math.log(nw))
            self._push("log_norm_l", math.log(nl))

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

    def state_dict(self) -> dict[str, float | None]:
        return dict(self.state)

    def load_state_dict(self, state: dict[str, float | None]) -> None:
        self.state = {k: state.get(k) for k in _KEYS}
