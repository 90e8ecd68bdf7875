"""Attention over packed pairs: several (prompt, chosen, rejected) segments laid end to end in one row.

A packed batch (:class:`~prefkit.data.types.PairSegments`) has no padding between pairs. For each pair the
prompt+chosen queries attend causally to prompt+chosen, and the rejected queries to the prompt and, causally,
to the rejected tokens before them (never to chosen), so the prompt is computed once. transformers routes every
attention call of a model through ``config._attn_implementation``; :func:`register_segment_attention` registers
:data:`~prefkit.data.types.SEGMENT_ATTENTION` there (and in the mask registry), process-wide, which is why it
lives in the host layer and runs only when that is installed. It behaves exactly as ``sdpa`` unless the call
carries ``prefkit_segments``, so a model switched to it generates and scores as before.

Three ways to run it, all equal to the two-row layout (tests/test_logprobs.py), chosen per device by
:func:`segment_path` (docs/performance.md has the measurements):

- ``loop``: two sdpa calls per pair and layer, each over that pair's own tokens (no score across pairs);
- ``pairs``: one sdpa call per layer over the pairs gathered into a (pairs, heads, longest pair, dim) batch,
  with a mask built on the device from each token's (pair, part, logical position);
- ``row``: one sdpa call per layer over the whole row with a block-diagonal mask built the same way (scores
  across pairs are computed and masked: quadratic in the row, kept for measurement).
"""

from __future__ import annotations

import os
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from prefkit.data.types import SEGMENT_ATTENTION, PairSegments
from prefkit.errors import ConfigError

PATHS = ("loop", "pairs", "row")
# part of a token in its pair: prompt, chosen, rejected; PAD for padding (the row's tail, a gathered pair's tail)
PROMPT, CHOSEN, REJECTED, PAD = 0, 1, 2, 3


def segment_path(device_type: str) -> str:
    """The segment attention's path on ``device_type``: ``PREFKIT_SEGMENT_ATTENTION`` (loop | pairs | row) when set,
    else the per-pair loop on a CPU (measured faster there) and the one gathered call elsewhere (a Python loop of
    small kernels is launch-bound on a GPU and cannot be captured in a CUDA graph)."""
    forced = os.environ.get("PREFKIT_SEGMENT_ATTENTION", "").strip().lower()
    if forced:
        if forced not in PATHS:
            raise ConfigError(f"PREFKIT_SEGMENT_ATTENTION: must be one of {', '.join(PATHS)} (or unset), got "
                              f"{forced!r}")
        return forced
    return "loop" if device_type == "cpu" else "pairs"


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
    run = _PATH_FUNCTIONS[segment_path(query.device.type)]
    if query.device.type != "cpu":
        return run(query, key, value, segments, dropout, scaling, window), None
    # on CPU, bf16 attention builds a kernel for every new segment length (each pair has its own) and fp32 runs
    # as fast at these sizes, so attention runs in fp32 there, autocast or not; the output keeps sdpa's dtype
    out_dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else query.dtype
    with torch.autocast("cpu", enabled=False):
        out = run(query.float(), key.float(), value.float(), segments, dropout, scaling, window)
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


def segment_ids(segments: PairSegments) -> tuple[Tensor, Tensor, Tensor]:
    """(pair, part, logical position) of every token of a packed row, on the CPU: the pair's index (-1 for the
    row's padding), its part (PROMPT, CHOSEN, REJECTED, PAD) and its position as in the pair's own row."""
    pair, part, pos = [], [], []
    for i, (p, c, r) in enumerate(segments.lengths):
        pair += [i] * (p + c + r)
        part += [PROMPT] * p + [CHOSEN] * c + [REJECTED] * r
        pos += [*range(p + c), *range(p, p + r)]
    pair += [-1] * segments.pad
    part += [PAD] * segments.pad
    pos += range(segments.pad)
    return torch.tensor(pair), torch.tensor(part), torch.tensor(pos)


def seen_by_ids(q_pair: Tensor, q_part: Tensor, q_pos: Tensor, k_pair: Tensor, k_part: Tensor, k_pos: Tensor,
                window: int | None) -> Tensor:
    """Which keys each query sees (broadcast over the ids' shapes): the same pair, causal in logical positions
    (within the window if one is given), and a key that is the prompt or in the query's own part (so rejected
    never sees chosen, and prompt or chosen never sees rejected). Padding sees padding, so no row is empty."""
    ahead = q_pos - k_pos
    seen = (q_pair == k_pair) & (ahead >= 0) & ((k_part == PROMPT) | (k_part == q_part))
    return seen & (ahead < window) if window is not None else seen


# The masks and gather indices of the last few (segments, device, window) seen: every layer of a forward asks
# for the same ones, so each is built and copied to the device once per batch, not once per layer.
_CACHE: OrderedDict[tuple, tuple[Tensor, ...]] = OrderedDict()
_CACHE_SIZE = 4


def _cached(kind: str, segments: PairSegments, device: torch.device, window: int | None, build) -> tuple[Tensor, ...]:
    key = (kind, segments.lengths, segments.pad, str(device), window)
    hit = _CACHE.get(key)
    if hit is None:
        hit = _CACHE[key] = build()
        while len(_CACHE) > _CACHE_SIZE:
            _CACHE.popitem(last=False)
    else:
        _CACHE.move_to_end(key)
    return hit


def repeats_kv(device_type: str) -> bool:
    """Whether a masked call repeats grouped key/value heads instead of passing ``enable_gqa`` (CUDA)."""
    return device_type == "cuda"


def _sdpa(query: Tensor, key: Tensor, value: Tensor, mask: Tensor, dropout: float, scaling: float | None) -> Tensor:
    """sdpa with a boolean mask. Grouped-query heads: sdpa's ``enable_gqa`` on a CPU; on CUDA the kernel that
    takes an arbitrary mask (memory-efficient) has no GQA, and GQA with a mask falls back to the math kernel,
    so there key/value heads are repeated for their query heads instead."""
    groups = query.shape[1] // key.shape[1]
    if groups > 1 and repeats_kv(query.device.type):
        key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
        groups = 1
    return F.scaled_dot_product_attention(query, key, value, attn_mask=mask, dropout_p=dropout, scale=scaling,
                                          enable_gqa=groups > 1)


def _one_row(query: Tensor, key: Tensor, value: Tensor, segments: PairSegments, dropout: float,
             scaling: float | None, window: int | None = None) -> Tensor:
    """One sdpa call over the whole row with the block-diagonal (T x T) mask of its pairs."""
    def build() -> tuple[Tensor, ...]:
        pair, part, pos = (x.to(query.device) for x in segment_ids(segments))
        keep = (part != PAD)[None, :, None, None]  # (1, T, 1, 1): padding outputs zeros, as in the loop
        return seen_by_ids(pair[:, None], part[:, None], pos[:, None], pair, part, pos, window), keep

    mask, keep = _cached("row", segments, query.device, window, build)
    out = _sdpa(query, key, value, mask, dropout, scaling).transpose(1, 2)
    return out * keep if segments.pad else out


def _gathered(query: Tensor, key: Tensor, value: Tensor, segments: PairSegments, dropout: float,
              scaling: float | None, window: int | None = None) -> Tensor:
    """One sdpa call over the pairs gathered into a (pairs, H, longest pair, D) batch, each pair's own
    (L x L) mask; the outputs are put back in the row's order."""
    n, width = len(segments.lengths), max(p + c + r for p, c, r in segments.lengths)

    def build() -> tuple[Tensor, ...]:
        pair, part, pos = segment_ids(segments)
        sizes = torch.tensor([p + c + r for p, c, r in segments.lengths])
        starts = torch.cumsum(sizes, 0) - sizes
        j = torch.arange(width)
        inside = j[None, :] < sizes[:, None]  # (pairs, width)
        # row index of each gathered slot (a pair's first token for the slots past its end, masked below)
        take = torch.where(inside, starts[:, None] + j[None, :], starts[:, None])
        g_part = torch.where(inside, part[take], PAD)
        g_pos = torch.where(inside, pos[take], j[None, :])
        g_pair = torch.zeros_like(take)  # one pair per gathered row
        mask = seen_by_ids(g_pair[:, :, None], g_part[:, :, None], g_pos[:, :, None],
                           g_pair[:, None, :], g_part[:, None, :], g_pos[:, None, :], window)[:, None]
        real = part != PAD
        # slot of each real token in the flattened (pairs x width) output
        back = pair[real] * width + (torch.arange(len(pair))[real] - starts[pair[real]])
        return tuple(x.to(query.device) for x in (take.reshape(-1), mask, back))

    take, mask, back = _cached("pairs", segments, query.device, window, build)

    def gather(x: Tensor) -> Tensor:  # (1, H, T, D) -> (pairs, H, width, D)
        return x[0].index_select(1, take).unflatten(1, (n, width)).transpose(0, 1)

    out = _sdpa(gather(query), gather(key), gather(value), mask, dropout, scaling)  # (pairs, H, width, D)
    out = out.transpose(1, 2).flatten(0, 1).index_select(0, back)  # (T without padding, H, D)
    if segments.pad:
        out = torch.cat([out, out.new_zeros(segments.pad, *out.shape[1:])])
    return out[None]


_PATH_FUNCTIONS = {"loop": _per_pair, "pairs": _gathered, "row": _one_row}


def register_segment_attention() -> None:
    """Make :data:`~prefkit.data.types.SEGMENT_ATTENTION` known to transformers' attention and mask registries
    (process-wide, idempotent)."""
    AttentionInterface.register(SEGMENT_ATTENTION, segment_attention)
    AttentionMaskInterface.register(SEGMENT_ATTENTION, sdpa_mask)
