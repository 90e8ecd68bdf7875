"""Feedback units: ADPO's feedback length μ′ (Autoregressive DPO, arXiv 2602.09533, Sec. 4).

ADPO moves the sum over tokens outside the log-sigmoid: −Σ_i log σ(β·S^w_i − β·S^l_i), S_i the summed token
log-ratios of feedback unit i. Units are given as a unit index per token, then summed with scatter_add:
- ``response``: one unit per response (μ′ = 1, classic DPO);
- ``static`` k: windows of k tokens from the first response token, paired by index, μ′ = ⌈max(T_w, T_l)/k⌉;
  the shorter response contributes log-ratio 0 to windows past its end (``static_padding zero``) — or, with
  ``static_padding eos``, the collator has appended real scored EOS tokens so both have equal length;
- ``adaptive`` m: each response split into m_eff = min(m, T_w, T_l) contiguous near-equal non-empty pieces
  with boundaries ⌊i·T/m_eff⌋, piece i of chosen paired with piece i of rejected (the paper needs m ≤ T);
- ``token``: static with k = 1.
T counts kept tokens (after POET), so POET composes with every granularity.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

GRANULARITIES = ("response", "static", "adaptive", "token")


@dataclass(frozen=True)
class Units:
    """Unit index per token for chosen and rejected ((B, T) long; masked tokens map to a spill column U).
    ``num_units`` U is the width of the unit tensors, a bound from the batch's shape; ``valid`` and ``mu_prime``
    say which units each pair has."""

    chosen: Tensor
    rejected: Tensor
    num_units: int
    valid: Tensor  # (B, U) bool: the unit exists for that pair
    mu_prime: Tensor  # (B,) feedback length per pair


def assign_units(
    chosen_mask: Tensor, rejected_mask: Tensor, granularity: str, window_size: int = 4, num_segments: int = 256
) -> Units:
    b, t = chosen_mask.shape
    dev = chosen_mask.device
    cols = torch.arange(t, device=dev)[None, :].expand(b, t)
    tw, tl = chosen_mask.sum(1), rejected_mask.sum(1)
    if granularity == "response":
        uc = torch.zeros_like(cols)
        ur = torch.zeros_like(cols)
        mu = torch.ones(b, dtype=torch.long, device=dev)
    elif granularity in ("static", "token"):
        k = 1 if granularity == "token" else window_size
        uc = ur = cols // k
        mu = (torch.maximum(tw, tl) + k - 1) // k
    elif granularity == "adaptive":
        mu = torch.minimum(torch.full_like(tw, num_segments), torch.minimum(tw, tl)).clamp(min=1)
        # token j of a length-T response is in piece i iff ⌊iT/m⌋ ≤ j < ⌊(i+1)T/m⌋, i.e. i = ⌊((j+1)m − 1)/T⌋
        uc = ((cols + 1) * mu[:, None] - 1) // tw.clamp(min=1)[:, None]
        ur = ((cols + 1) * mu[:, None] - 1) // tl.clamp(min=1)[:, None]
    else:
        raise ValueError(f"unknown granularity {granularity!r}; expected one of {GRANULARITIES}")
    # the width of the unit tensors: the most units a response as wide as the batch can have, known from shapes
    # (mu's largest value would be a host sync per step on a GPU); units past a pair's mu are invalid, so the
    # spare columns hold zeros that every link masks and every sum ignores
    if granularity == "response":
        u = 1
    elif granularity == "adaptive":
        u = max(1, min(num_segments, t))
    else:
        u = max(1, -(-t // k))
    spill = torch.full_like(cols, u)
    uc = torch.where(chosen_mask, uc, spill)
    ur = torch.where(rejected_mask, ur, spill)
    valid = torch.arange(u, device=dev)[None, :] < mu[:, None]
    return Units(uc, ur, u, valid, mu)


def unit_sums(values: Tensor, unit_index: Tensor, num_units: int) -> Tensor:
    """(B, U) sums of (B, T) token values per unit; the spill column (masked tokens) is dropped."""
    out = values.new_zeros(values.shape[0], num_units + 1)
    return out.scatter_add(1, unit_index, values)[:, :num_units]
