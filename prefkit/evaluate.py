"""Held-out preference metrics: ranking accuracy, implicit-reward accuracy and margin, mean log-probs.

Ranking accuracy compares the *mean token* log-prob of chosen vs rejected, so it is meaningful before any
training (when the implicit reward is still 0). Implicit rewards are β·(log π_θ − log π_ref) summed over the
response, as in DPO and TRL.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from prefkit.data import PairCollator
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


@torch.no_grad()
def pair_logp_sums(
    model: nn.Module, dataset, collator: PairCollator, *, batch_size: int = 8, desc: str = "scoring",
    autocast: torch.dtype | None = None,
) -> PairLogpSums:
    """One no-grad forward per batch over a prepared dataset (columns prompt_ids, chosen_ids, rejected_ids),
    under ``autocast`` when given (the dtype a run's --bf16 / --fp16 autocasts to, as its training steps do)."""
    device = next(model.parameters()).device
    parts: dict[str, list[Tensor]] = {"cs": [], "rs": [], "cl": [], "rl": []}
    with eval_mode(model), torch.autocast(device.type, dtype=autocast, enabled=autocast is not None):
        for start in tqdm(range(0, len(dataset), batch_size), desc=desc, leave=False):
            rows = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
            batch = collator(rows).to(device)
            lp = compute_pair_logps(model, batch)
            parts["cs"].append(lp.chosen.sum(1).cpu())
            parts["rs"].append(lp.rejected.sum(1).cpu())
            parts["cl"].append(lp.chosen_mask.sum(1).cpu())
            parts["rl"].append(lp.rejected_mask.sum(1).cpu())
    cat = {k: torch.cat(v) if v else torch.zeros(0) for k, v in parts.items()}
    return PairLogpSums(cat["cs"].double(), cat["rs"].double(), cat["cl"], cat["rl"])


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
