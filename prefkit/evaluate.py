"""Held-out preference metrics: ranking accuracy, implicit-reward accuracy and margin, mean log-probs.

Ranking accuracy compares the *mean token* log-prob of chosen vs rejected, so it is meaningful before any
training (when the implicit reward is still 0). Implicit rewards are β·(log π_θ − log π_ref) summed over the
response, as in DPO and TRL.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from prefkit.data import PairCollator
from prefkit.data.types import PairBatch
from prefkit.logprobs import compute_pair_logps, eval_mode


@dataclass
class PairLogpSums:
    """Summed response log-probs and response token counts for each held-out pair, in dataset order."""

    chosen_sum: Tensor
    rejected_sum: Tensor
    chosen_len: Tensor
    rejected_len: Tensor

    @property
    def chosen_mean(self) -> Tensor:
        return self.chosen_sum / self.chosen_len.clamp(min=1)

    @property
    def rejected_mean(self) -> Tensor:
        return self.rejected_sum / self.rejected_len.clamp(min=1)


@dataclass
class EvalResult:
    num_pairs: int
    ranking_accuracy: float
    logps_chosen_mean: float
    logps_rejected_mean: float
    implicit_reward_accuracy: float | None = None
    reward_margin: float | None = None
    rewards_chosen: float | None = None
    rewards_rejected: float | None = None

    def to_dict(self) -> dict[str, float | int | None]:
        return asdict(self)


def batches_of(dataset, collator: PairCollator, batch_size: int) -> DataLoader:
    """A prepared dataset (columns prompt_ids, chosen_ids, rejected_ids) in order, as batches of pairs."""
    return DataLoader(dataset, batch_size=batch_size, collate_fn=collator)


@torch.no_grad()
def pair_logp_sums(
    model: nn.Module, batches: Iterable[PairBatch], *, desc: str = "scoring", autocast: torch.dtype | None = None,
    gather: Callable[[Tensor], Tensor] | None = None,
) -> PairLogpSums:
    """Held-out scoring, the one path `prefkit eval` and the trainer's before/after metrics share: one no-grad
    forward per batch, under ``autocast`` when given (the dtype a run's --bf16 / --fp16 autocasts to, as its
    training steps do). ``gather`` (accelerate's ``gather_for_metrics``) joins the shards that the processes of
    a multi-process run score, in dataset order."""
    device = next(model.parameters()).device
    parts: list[Tensor] = []
    with eval_mode(model), torch.autocast(device.type, dtype=autocast, enabled=autocast is not None):
        for batch in tqdm(batches, desc=desc, leave=False):
            lp = compute_pair_logps(model, batch.to(device))
            part = torch.stack([lp.chosen.sum(1).float(), lp.rejected.sum(1).float(),
                                lp.chosen_mask.sum(1).float(), lp.rejected_mask.sum(1).float()], dim=1)
            parts.append((part if gather is None else gather(part)).cpu())
    cat = torch.cat(parts).double() if parts else torch.zeros(0, 4, dtype=torch.float64)
    return PairLogpSums(cat[:, 0], cat[:, 1], cat[:, 2].long(), cat[:, 3].long())


def summarize(policy: PairLogpSums, reference: PairLogpSums | None, beta: float) -> EvalResult:
    """Metrics of a policy's summed log-probs, with implicit rewards when the reference's are given."""
    result = EvalResult(
        num_pairs=int(policy.chosen_sum.numel()),
        ranking_accuracy=(policy.chosen_mean > policy.rejected_mean).double().mean().item(),
        logps_chosen_mean=policy.chosen_mean.mean().item(),
        logps_rejected_mean=policy.rejected_mean.mean().item(),
    )
    if reference is not None:
        rc = beta * (policy.chosen_sum - reference.chosen_sum)
        rr = beta * (policy.rejected_sum - reference.rejected_sum)
        result.implicit_reward_accuracy = (rc > rr).double().mean().item()
        result.reward_margin = (rc - rr).mean().item()
        result.rewards_chosen = rc.mean().item()
        result.rewards_rejected = rr.mean().item()
    return result
