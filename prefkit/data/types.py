"""Typed values of the data stage: tokenized pairs and collated batches."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field, fields, replace

import torch
from torch import Tensor

# The attention implementation that reads packed rows: the name transformers knows it by once the host layer
# (prefkit.accel) has registered it, and the keyword that carries a batch's PairSegments to it.
SEGMENT_ATTENTION = "prefkit_segments"


@dataclass(frozen=True)
class PairSegments:
    """Token counts (prompt, chosen, rejected) of the pairs laid end to end in a packed row, in order, and the
    padding after them (``pad`` tokens that attend to nothing and output zeros)."""

    lengths: tuple[tuple[int, int, int], ...]
    pad: int = 0

    def split_sizes(self) -> list[int]:
        """Piece sizes along the row: prompt+chosen, then rejected, for each pair; then the padding."""
        return [n for p, c, r in self.lengths for n in (p + c, r)] + ([self.pad] if self.pad else [])


@dataclass
class SharedMask:
    """The shared-prompt layout's attention, described per row by the token counts (prompt, chosen, rejected)
    of its pair (``lengths``, (rows, 3)), so the collator ships a few integers and :meth:`dense` builds the
    (rows, 1, W, W) additive mask where the forward runs: prompt + chosen causal, rejected causal over the prompt
    and itself (never the chosen tokens), padding attending to itself only (no row without a key). ``window``:
    a sliding window in logical positions (the keys within ``window`` positions of the query's own); with
    ``mask_types`` one mask per layer type, of which only ``sliding_attention`` is windowed."""

    lengths: Tensor
    width: int
    window: int | None = None
    mask_types: tuple[str, ...] | None = None

    def to(self, device: torch.device | str, non_blocking: bool = False) -> SharedMask:
        return replace(self, lengths=self.lengths.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> SharedMask:
        return replace(self, lengths=self.lengths.pin_memory())

    def dense(self, position_ids: Tensor, dtype: torch.dtype) -> Tensor | dict[str, Tensor]:
        """The additive mask(s) in ``dtype`` on the device of ``lengths``; ``position_ids`` (rows, W) are the
        batch's logical positions, which the window is counted in."""
        dev = self.lengths.device
        prompt, chosen, rejected = (x[:, None, None] for x in self.lengths.unbind(1))
        q = torch.arange(self.width, device=dev)[None, :, None]
        k = torch.arange(self.width, device=dev)[None, None, :]
        end, split = prompt + chosen + rejected, prompt + chosen
        allowed = (k <= q) & (q < end) & ~((q >= split) & (k >= prompt) & (k < split))
        allowed |= (q >= end) & (q == k)
        windowed = allowed
        if self.window is not None:  # allowed keys never lie ahead of their query, so the difference is ≥ 0
            windowed = allowed & ((position_ids[:, :, None] - position_ids[:, None, :]) < self.window)

        def additive(keep: Tensor) -> Tensor:
            return torch.zeros(keep.shape[0], 1, *keep.shape[1:], dtype=dtype, device=dev).masked_fill(
                ~keep[:, None], torch.finfo(dtype).min)

        if self.mask_types is None:
            return additive(windowed)
        return {t: additive(windowed if t == "sliding_attention" else allowed) for t in self.mask_types}


@dataclass
class PairBatch:
    """A collated batch of B pairs laid out for one forward pass over chosen and rejected.

    Responses 0..B-1 are the chosen ones, B..2B-1 the rejected ones. In the plain layout input row i holds
    prompt+response i (2B rows, right-padded). In the shared-prompt layout (``position_ids`` set) a row segment
    holds prompt, chosen and rejected of one pair, with ``attention_mask`` a :class:`SharedMask`, which the
    forward turns into the 4D additive mask that hides the chosen tokens from the rejected ones (one per layer
    type, ``{layer type: mask}``, for a model whose windowed and full layers need different masks), and
    ``position_ids`` that restart the rejected response after the prompt, so the prompt is computed once. In the
    packed layout (``segments`` set) all pairs lie end to end in one row without padding and attention follows
    ``segments`` (``attention_mask`` is an empty placeholder, see :mod:`prefkit.accel.attention`).
    ``response_start[i]`` is the position of response i's first token in row ``response_row[i]``,
    ``response_len[i]`` its number of tokens (ending with EOS unless truncated), and ``first_pred[i]`` the
    position whose output predicts its first token (the last prompt token). Token weights and precomputed
    reference log-probs are response-aligned (B, T), T = the longest response.
    ``response_mask`` (2B, T) and the gather index of every response token in that mask's order
    (``token_row``, ``token_pos`` its position, ``token_pred`` the position whose output predicts it) are worked
    out from those when the batch is built, on the host: the forward then gathers with them and never asks the
    device for a length or a mask's count (a host sync on a GPU).
    ``pad_to_multiple_of``: the collator's length multiple, which the fused LM head also rounds its token count
    up to (kernels built per shape see a few repeated shapes).
    """

    input_ids: Tensor
    attention_mask: Tensor | SharedMask
    response_start: Tensor
    response_len: Tensor
    row_ids: Tensor
    response_row: Tensor | None = None
    first_pred: Tensor | None = None
    position_ids: Tensor | None = None
    chosen_weights: Tensor | None = None
    rejected_weights: Tensor | None = None
    ref_chosen: Tensor | None = None
    ref_rejected: Tensor | None = None
    segments: PairSegments | None = None
    pad_to_multiple_of: int | None = None
    response_mask: Tensor | None = None
    token_row: Tensor | None = None
    token_pos: Tensor | None = None
    token_pred: Tensor | None = None

    def __post_init__(self) -> None:
        if self.response_mask is None:
            self.response_mask, self.token_row, self.token_pos, self.token_pred = response_index(
                self.response_start, self.response_len, self.input_ids.shape[1], self.response_row, self.first_pred)

    @property
    def num_pairs(self) -> int:
        return self.row_ids.shape[0]

    # transformers.Trainer probes batches like mappings ("labels" in batch, batch["input_ids"])
    def __contains__(self, key: str) -> bool:
        return key in self.__dataclass_fields__ and getattr(self, key) is not None

    def __getitem__(self, key: str) -> Tensor:
        return getattr(self, key)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> PairBatch:
        """The batch on ``device``; ``non_blocking`` copies from pinned memory asynchronously."""
        return self._map(lambda v: v.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> PairBatch:
        """The batch in page-locked memory where an accelerator exists (the DataLoader's ``pin_memory`` calls
        this), so :meth:`to` with ``non_blocking`` overlaps the copy with compute; unchanged where none does."""
        if not torch.accelerator.is_available():
            return self
        return self._map(lambda v: v.pin_memory())

    def _map(self, move) -> PairBatch:
        return PairBatch(**{f.name: move(v) if isinstance(v := getattr(self, f.name), (Tensor, SharedMask)) else v
                            for f in fields(self)})


def response_index(response_start: Tensor, response_len: Tensor, seq_len: int, response_row: Tensor | None = None,
                   first_pred: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(mask (R, T), row, position, predicting position) of every response token, T the longest response: the
    j-th token of response i lies at ``response_start[i] + j`` of row ``response_row[i]`` (row i when None) and
    is predicted by the output one position before it, or at ``first_pred[i]`` for j = 0 when given."""
    width = int(response_len.max()) if response_len.numel() else 0
    j = torch.arange(width, device=response_len.device)
    mask = j[None, :] < response_len[:, None]
    pos = (response_start[:, None] + j[None, :]).clamp(max=seq_len - 1)
    row = response_row if response_row is not None else torch.arange(response_len.shape[0], device=pos.device)
    pred = pos - 1
    if first_pred is not None:
        pred = torch.cat([first_pred[:, None], pred[:, 1:]], dim=1)
    return mask, row[:, None].expand_as(pos)[mask], pos[mask], pred[mask]


@dataclass
class SkipReport:
    """Rows left out of a dataset, counted by reason (never silently dropped)."""

    total: int = 0
    skipped: Counter = field(default_factory=Counter)
    examples: dict[str, str] = field(default_factory=dict)

    def add(self, reason: str, where: str) -> None:
        self.skipped[reason] += 1
        self.examples.setdefault(reason, where)

    @property
    def kept(self) -> int:
        return self.total - sum(self.skipped.values())

    def summary(self) -> str:
        if not self.skipped:
            return f"{self.total} pairs, none skipped"
        parts = ", ".join(f"{n} {reason} (e.g. {self.examples[reason]})" for reason, n in self.skipped.most_common())
        return f"{self.kept} of {self.total} pairs kept; skipped: {parts}"
