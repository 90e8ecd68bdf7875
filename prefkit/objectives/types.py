"""Typed values passed between the log-prob stage, the objective pieces and the trainer."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from torch import Tensor


@dataclass
class PairLogps:
    """Per-token log-probs of a batch of B pairs, *response-aligned*: column 0 is the first response token.

    ``chosen``/``rejected`` are (B, T) policy log-probs (T = the longer response in the batch), 0 where the
    mask is False. ``ref_*`` are the reference model's, same layout (None for reference-free objectives).
    ``*_weights`` are optional per-token weights (cADPO critical-token weights), 1 where absent.
    ``*_sq`` are log Σ_v π(v)² per token, present only when the objective needs them (WPO).
    """

    chosen: Tensor
    rejected: Tensor
    chosen_mask: Tensor
    rejected_mask: Tensor
    ref_chosen: Tensor | None = None
    ref_rejected: Tensor | None = None
    chosen_weights: Tensor | None = None
    rejected_weights: Tensor | None = None
    chosen_sq: Tensor | None = None  # log Σ_v π(v)² per token (no grad), for WPO's weights
    rejected_sq: Tensor | None = None

    @property
    def batch_size(self) -> int:
        return self.chosen.shape[0]

    def replace(self, **changes: Tensor | None) -> PairLogps:
        return replace(self, **changes)


@dataclass
class LossStats:
    """Detached per-pair statistics of one objective evaluation (shape (B,) unless noted)."""

    rewards_chosen: Tensor
    rewards_rejected: Tensor
    logps_chosen: Tensor
    logps_rejected: Tensor
    num_units: Tensor
    extra: dict[str, Tensor] = field(default_factory=dict)

    def metric_tensors(self) -> dict[str, Tensor]:
        """Batch means under TRL's metric names, as 0-d tensors on the batch's device (no host copy)."""
        margins = self.rewards_chosen - self.rewards_rejected
        out = {
            "rewards/chosen": self.rewards_chosen.float().mean(),
            "rewards/rejected": self.rewards_rejected.float().mean(),
            "rewards/margins": margins.float().mean(),
            "rewards/accuracies": (margins > 0).float().mean(),
            "logps/chosen": self.logps_chosen.float().mean(),
            "logps/rejected": self.logps_rejected.float().mean(),
            "objective/num_units": self.num_units.float().mean(),
        }
        out.update({k: v.float().mean() for k, v in self.extra.items()})
        return out

    def metrics(self) -> dict[str, float]:
        """:meth:`metric_tensors` as numbers."""
        return {k: v.item() for k, v in self.metric_tensors().items()}


@dataclass
class LossOutput:
    """A scalar loss (with grad) and its detached statistics."""

    loss: Tensor
    stats: LossStats

