"""Critical-token weights by contrastive estimation (cDPO, "Critical Tokens Matter", arXiv 2411.19943, eq. 3-5).

A positive model (fine-tuned on correct solutions) and a negative model (on incorrect ones) score every
response token: s_t = softmax(2·logits_pos − logits_neg)[y_t] (the contrastive distribution, with the paper's
β = 1 giving the coefficients (1+β) and β). Rejected tokens get weight 1 − s_t — tokens the positive model
would not write matter most — and chosen tokens optionally s_t. cADPO (arXiv 2602.09533) applies these
weights to token log-ratios inside each feedback unit. Choice: weights are detached constants computed once
offline, so training needs neither model.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from prefkit.logprobs import response_positions


@torch.no_grad()
def critical_token_weights(
    pos_model: nn.Module,
    neg_model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor,
    response_start: Tensor,
    response_len: Tensor,
) -> Tensor:
    """(R, T) response-aligned s_t for every row of a PairBatch layout (0 past each response)."""
    lp = pos_model(input_ids=input_ids, attention_mask=attention_mask).logits.float()
    ln = neg_model(input_ids=input_ids, attention_mask=attention_mask).logits.float()
    contrast = torch.softmax(2 * lp - ln, dim=-1)
    pos, mask = response_positions(response_start, response_len, input_ids.shape[1])
    rows = torch.arange(input_ids.shape[0], device=input_ids.device)[:, None].expand_as(pos)
    targets = input_ids[rows, pos]
    s = contrast[rows, (pos - 1).clamp(min=0)].gather(-1, targets[..., None]).squeeze(-1)
    return s * mask


def pair_weights(scores: Tensor, num_pairs: int) -> tuple[Tensor, Tensor]:
    """(chosen weights s_t, rejected weights 1 − s_t) from the (2B, T) scores of a PairBatch."""
    return scores[:num_pairs], 1.0 - scores[num_pairs:]
