"""DynamicsMonitor: the trainer's single hook into preference dynamics (arXiv 2604.18239).

Every step, before backward: RC (if on) measures this batch's incentives for its EMAs and, every
``rc_norm_steps`` steps, the score norms (two partial backward passes), both w.r.t. the ``rc_scores`` scores;
after backward, :meth:`DynamicsMonitor.settle` records them where the step's loss and gradient were finite.
Every ``dynamics_steps`` steps the diagnostics, w.r.t. the objective's own scores, are computed and returned
as metrics (names below); where both fall on one step with the same scores, the norms are computed once.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from torch import Tensor, nn

from prefkit.data.types import PairBatch
from prefkit.dynamics.band import band_edges, fraction_in_band
from prefkit.dynamics.calibration import RewardCalibrator
from prefkit.dynamics.grad_norms import ScoreGradNorms, score_grad_norms, select_params
from prefkit.dynamics.incentives import Incentives, compute_incentives
from prefkit.dynamics.spec import DynamicsSpec
from prefkit.logprobs import eval_mode
from prefkit.metric_names import with_deprecated_names
from prefkit.metrics import Weighted
from prefkit.objectives.types import LossOutput, PairLogps

logger = logging.getLogger("prefkit")


class DynamicsMonitor:
    def __init__(
        self,
        cfg: DynamicsSpec,
        objective,
        model: nn.Module,
        probe_batch: PairBatch | None,
        logps_fn: Callable[[nn.Module, PairBatch], PairLogps],
        reduce_mean: Callable[[Tensor], Tensor] | None = None,
        unwrap: Callable[[nn.Module], nn.Module] | None = None,
    ):
        self.objective = objective
        self.every = cfg.dynamics_steps
        self.rc = RewardCalibrator(cfg.rc_ema, reduce_mean, cfg.rc_target, cfg.rc_fixed_alpha) \
            if cfg.reward_calibration else None
        self.rc_every = cfg.rc_norm_steps
        self.rc_scores = cfg.rc_scores
        self.params = select_params(model, cfg.dynamics_params) if (self.every or self.rc) else []
        self.probe = probe_batch
        self.logps_fn = logps_fn
        self.patience = cfg.displacement_patience
        self.probe_start: tuple[float, float] | None = None
        self.last_probe_chosen: float | None = None
        self.falling = 0
        self.warned = False
        self.step: int | None = None
        self.rc_step: int | None = None
        self._staged: tuple[Incentives, ScoreGradNorms | None] | None = None  # this micro-step's RC statistics
        # Under DDP the score gradients come from a separate forward of the unwrapped module: autograd.grad
        # through DDP's own forward would interfere with its gradient synchronisation.
        self.unwrap = unwrap

    def calibrate(self, logps: PairLogps, step: int) -> PairLogps:
        """RC's α applied to the policy log-probs (identity without RC); called before the loss, every
        micro-batch. A new optimizer step first folds the previous step's statistics into the EMAs, so all
        micro-batches (and all processes) of a step use the same α."""
        if self.rc is None:
            return logps
        if self.rc_step is not None and step != self.rc_step:
            self.rc.commit(logps.chosen.device)
        self.rc_step = step
        return self.rc.apply(logps)

    def observe(
        self, step: int, model: nn.Module, logps: PairLogps, loss_out: LossOutput, batch: PairBatch | None = None
    ) -> dict[str, Tensor | float | Weighted]:
        new_step = step != self.step
        self.step = step
        log_now = bool(self.every) and step % self.every == 0
        if not log_now and self.rc is None:
            return {}
        own = self.objective.score_reduction
        rc_norms = self.rc is not None and step % self.rc_every == 0
        stats: ScoreGradNorms | None = None
        rc_stats: ScoreGradNorms | None = None
        if log_now or rc_norms:
            source = logps
            if self.unwrap is not None and batch is not None:
                with torch.enable_grad():
                    source = self.logps_fn(self.unwrap(model), batch)
            masks = self.objective.kept_masks(source)
            if log_now:
                stats = score_grad_norms(source, self.params, masks, own)
            if rc_norms:
                rc_stats = stats if stats is not None and own == self.rc_scores else score_grad_norms(
                    source, self.params, masks, self.rc_scores)
        metrics: dict[str, Tensor | float | Weighted] = {}
        if self.rc is not None:
            self._staged = (compute_incentives(self.objective, logps, self.rc_scores), rc_stats)
            metrics.update(self.rc.metrics())
        if log_now and stats is not None:
            inc = compute_incentives(self.objective, logps)
            ratio = inc.ratio()
            # a diagnostics step reads its values on the host (--dynamics_steps sets how often): one copy here
            norm_chosen, norm_rejected, cos = torch.stack(
                [torch.as_tensor(v) for v in (stats.norm_chosen, stats.norm_rejected, stats.cos)]).tolist()
            lower, upper = band_edges(norm_chosen, norm_rejected, cos)
            metrics.update({
                "incentive/d_w": inc.d_w.mean().item(),
                "incentive/d_l": inc.d_l.mean().item(),
                "incentive/ratio": (inc.d_w.mean() / inc.d_l.mean().clamp(min=1e-12)).item(),
                "score_grad/norm_chosen": norm_chosen,
                "score_grad/norm_rejected": norm_rejected,
                "score_grad/cos": cos,
                "band/lower": lower,
                "band/upper": upper,
                "band/in_band": fraction_in_band(ratio, lower, upper),
            })
            metrics = with_deprecated_names(metrics)
            if new_step:  # the probe batch is the same for every micro-batch: once per step
                metrics.update(self._probe(model, step))
        return metrics

    def settle(self, ok: Tensor) -> None:
        """Hand RC this micro-step's statistics, counted only where ``ok`` (a bool tensor: the step's loss and
        gradient were finite) holds. Decided on the device, so the NaN policy's one host read stays the only one;
        a step that policy skips or stops at leaves RC's statistics as they were."""
        if self._staged is None:
            return
        (inc, stats), self._staged = self._staged, None
        self.rc.update_incentives(inc, ok)
        if stats is not None:
            self.rc.update_grad_norms(stats, ok)

    def discard_step(self) -> None:
        """Drop what RC recorded of the optimizer step under way (its earlier micro-steps, under gradient
        accumulation): a stop checkpoint saves the state before that step, and a resumed run redoes it whole."""
        self._staged = None
        if self.rc is not None:
            self.rc.discard_pending()

    @torch.no_grad()
    def _probe(self, model: nn.Module, step: int) -> dict[str, float]:
        if self.probe is None:
            return {}
        with eval_mode(model):
            lp = self.logps_fn(model, self.probe)
        chosen, rejected = lp.chosen.sum(1).mean().item(), lp.rejected.sum(1).mean().item()
        if self.probe_start is None:
            self.probe_start = (chosen, rejected)
        if self.last_probe_chosen is not None and chosen < self.last_probe_chosen:
            self.falling += 1
        else:
            self.falling, self.warned = 0, False
        self.last_probe_chosen = chosen
        if self.falling >= self.patience and not self.warned:
            logger.warning(
                "likelihood displacement: the chosen log-prob on the probe batch has fallen for %d logs in a row "
                "(step %d, %+.2f since start). Consider --reward_calibration true or a smaller --learning_rate",
                self.falling, step, chosen - self.probe_start[0],
            )
            self.warned = True
        return {"logps/chosen_delta": chosen - self.probe_start[0], "logps/rejected_delta": rejected - self.probe_start[1]}

    def state_dict(self) -> dict:
        return {
            "rc": self.rc.state_dict() if self.rc is not None else None,
            "probe_start": self.probe_start,
            "last_probe_chosen": self.last_probe_chosen,
            "falling": self.falling,
            "step": self.step,
            "rc_step": self.rc_step,
        }

    def load_state_dict(self, state: dict) -> None:
        if self.rc is not None and state.get("rc") is not None:
            self.rc.load_state_dict(state["rc"])
        self.probe_start = tuple(state["probe_start"]) if state.get("probe_start") else None
        self.last_probe_chosen = state.get("last_probe_chosen")
        self.falling = state.get("falling", 0)
        self.step = state.get("step")
        self.rc_step = state.get("rc_step")
