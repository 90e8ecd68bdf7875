"""Attention over packed pairs: several (prompt, chosen, rejected) segments laid end to end in one row.

A packed batch (:class:`~prefkit.data.types.PairSegments`) has no padding and no (T x T) mask. For each pair
the prompt+chosen queries attend causally to prompt+chosen, and the rejected queries to the prompt and,
causally, to the rejected tokens before them (never to chosen), so the prompt is computed once and no attention
score is computed across pairs or into masked blocks. transformers routes every attention call of a model
through ``config._attn_implementation``; :func:`register_segment_attention` registers
:data:`~prefkit.data.types.SEGMENT_ATTENTION` there (and in the mask registry), process-wide, which is why it
lives in the host layer and runs only when that is installed. It behaves exactly as ``sdpa`` unless the call
carries ``prefkit_segments``, so a model switched to it generates and scores as before.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from prefkit.data.types import SEGMENT_ATTENTION, PairSegments


def segment_attention(
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs,
) -> tuple[Tensor, None]:
    """transformers attention function: (1, H, T, D) query -> (1, T, H, D) output over packed pairs."""
    segments: PairSegments | None = kwargs.get("prefkit_segments")
    if segments is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    # a windowed layer's window, counted in each pair's logical positions (as in its own row)
    window = kwargs.get("sliding_window")
    if query.device.type != "cpu":
        return _per_pair(query, key, value, segments, dropout, scaling, window), None
    # on CPU, bf16 attention builds a kernel for every new segment length (each pair has its own) and fp32 runs
    # as fast at these sizes, so attention runs in fp32 there, autocast or not; the output keeps sdpa's dtype
    out_dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else query.dtype
    with torch.autocast("cpu", enabled=False):
        out = _per_pair(query.float(), key.float(), value.float(), segments, dropout, scaling, window)
    return out.to(out_dtype), None


def _seen(q_pos: Tensor, k_pos: Tensor, window: int | None) -> Tensor:
    """Which keys each query sees, from their logical positions: causal, and within the window if one is given."""
    ahead = q_pos[:, None] - k_pos[None, :]
    return (ahead >= 0) & (ahead < window) if window is not None else ahead >= 0


def _per_pair(query: Tensor, key: Tensor, value: Tensor, segments: PairSegments, dropout: float,
              scaling: float | None, window: int | None = None) -> Tensor:
    sizes = segments.split_sizes()
    # grouped-query heads share their key/value head inside sdpa instead of a repeated copy per query head
    gqa = query.shape[1] != key.shape[1]
    # split along tokens once (its backward is one concatenation; slicing the full row per pair is not)
    qs, ks, vs = (x.transpose(1, 2).split(sizes, dim=1) for x in (query, key, value))
    outs = []
    dev = query.device
    for i, (p, c, r) in enumerate(segments.lengths):
        q_pc, k_pc, v_pc = (x[2 * i].transpose(1, 2) for x in (qs, ks, vs))
        if window is None or p + c <= window:
            outs.append(F.scaled_dot_product_attention(q_pc, k_pc, v_pc, dropout_p=dropout, scale=scaling,
                                                       is_causal=True, enable_gqa=gqa))
        else:
            pos = torch.arange(p + c, device=dev)
            outs.append(F.scaled_dot_product_attention(q_pc, k_pc, v_pc, attn_mask=_seen(pos, pos, window),
                                                       dropout_p=dropout, scale=scaling, enable_gqa=gqa))
        k_r = torch.cat([ks[2 * i][:, :p], ks[2 * i + 1]], dim=1).transpose(1, 2)
        v_r = torch.cat([vs[2 * i][:, :p], vs[2 * i + 1]], dim=1).transpose(1, 2)
        # rejected token t (logical position p + t) sees the prompt and rejected tokens 0..t (p..p + t)
        seen = _seen(torch.arange(p, p + r, device=dev), torch.arange(p + r, device=dev),
                     window if window is not None and p + r > window else None)
        outs.append(F.scaled_dot_product_attention(qs[2 * i + 1].transpose(1, 2), k_r, v_r, attn_mask=seen,
                                                   dropout_p=dropout, scale=scaling, enable_gqa=gqa))
    if segments.pad:
        outs.append(query.new_zeros(1, query.shape[1], segments.pad, query.shape[3]))
    return torch.cat([o.transpose(1, 2) for o in outs], dim=1)


def register_segment_attention() -> None:
    """Make :data:`~prefkit.data.types.SEGMENT_ATTENTION` known to transformers' attention and mask registries
    (process-wide, idempotent)."""
    AttentionInterface.register(SEGMENT_ATTENTION, segment_attention)
    AttentionMaskInterface.register(SEGMENT_ATTENTION, sdpa_mask)
