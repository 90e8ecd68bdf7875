"""Collate tokenized pairs into a :class:`PairBatch`: chosen rows then rejected rows, right-padded."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from prefkit.data.types import PairBatch, PairSegments, SharedMask

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from prefkit.data.spec import DataSpec
    from prefkit.layouts import Layout


def _response_matrix(values: list[list[float]], width: int, fill: float) -> torch.Tensor:
    out = torch.full((len(values), width), fill, dtype=torch.float32)
    for i, v in enumerate(values):
        out[i, : len(v)] = torch.tensor(v[:width], dtype=torch.float32)
    return out


def _per_token(ref: list[float] | float) -> list[float]:
    """Reference log-probs per response token: prefkit's cache holds them so; TRL's column holds one per response,
    which lies on the first token (zeros after it), so that every sum over the whole response is exact. Only
    objectives that sum over the whole response may read it (``Objective.needs_token_reference`` is False; the
    trainer refuses the others)."""
    return [ref] if isinstance(ref, (int, float)) else ref


@dataclass
class PairCollator:
    """Builds the one-forward layout for B pairs (rows 0..B-1 prompt+chosen, B..2B-1 prompt+rejected).

    ``static_eos_padding``: extend the shorter response of each pair with real EOS tokens to the longer one's
    length — the ADPO paper's padding for static windows (those EOS tokens are scored).
    ``share_prompt``: one row per pair, prompt computed once (see :class:`PairBatch`).
    ``pack_pairs`` (with ``share_prompt``): all pairs end to end in one row without padding, attention per pair
    (:mod:`prefkit.accel.attention`; needs the host layer installed).
    ``pad_to_multiple_of``: round every row's length up to a multiple (fewer distinct shapes, for kernels that are
    built per shape).
    ``window`` (with ``share_prompt``): the model's sliding window, applied in logical positions (a rejected token
    at position p + j sees the keys within the window of p + j, as in its own row); ``mask_types``: the layer types
    of a model that takes one mask per type, of which only ``sliding_attention`` is windowed. Which layout is exact
    on a model is :func:`prefkit.layouts.resolve_layout`'s decision (``for_spec`` takes it).
    """

    pad_token_id: int
    eos_token_id: int | None = None
    static_eos_padding: bool = False
    share_prompt: bool = False
    pack_pairs: bool = False
    pad_to_multiple_of: int | None = None
    window: int | None = None
    mask_types: tuple[str, ...] | None = None

    @classmethod
    def for_spec(cls, data: DataSpec, tokenizer: PreTrainedTokenizerBase, layout: Layout, *,
                 training: bool = True) -> PairCollator:
        """The collator of a run's data options in the ``layout`` resolved for its models; ``training=False``
        (held-out scoring) never adds EOS padding."""
        return cls(
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            static_eos_padding=training and data.static_eos_padding,
            share_prompt=layout.share_prompt,
            pack_pairs=layout.pack_pairs,
            pad_to_multiple_of=data.pad_to_multiple_of,
            window=layout.window,
            mask_types=layout.mask_types,
        )

    def __call__(self, features: list[dict]) -> PairBatch:
        prompts = [f["prompt_ids"] for f in features]
        chosen = [list(f["chosen_ids"]) for f in features]
        rejected = [list(f["rejected_ids"]) for f in features]
        if self.static_eos_padding and self.eos_token_id is not None:
            for c, r in zip(chosen, rejected):
                n = max(len(c), len(r))
                c.extend([self.eos_token_id] * (n - len(c)))
                r.extend([self.eos_token_id] * (n - len(r)))
        resp_len = [len(c) for c in chosen] + [len(r) for r in rejected]
        t = max(resp_len)
        row_ids = torch.tensor([f["row_id"] for f in features], dtype=torch.long)
        if self.pack_pairs:
            batch = self._packed(prompts, chosen, rejected, row_ids)
        elif self.share_prompt:
            batch = self._shared(prompts, chosen, rejected, row_ids)
        else:
            seqs = [p + c for p, c in zip(prompts, chosen)] + [p + r for p, r in zip(prompts, rejected)]
            input_ids, attention_mask = self._pad(seqs)
            batch = PairBatch(
                input_ids=input_ids,
                attention_mask=attention_mask,
                response_start=torch.tensor([len(p) for p in prompts] * 2, dtype=torch.long),
                response_len=torch.tensor(resp_len, dtype=torch.long),
                row_ids=row_ids,
            )
        batch.pad_to_multiple_of = self.pad_to_multiple_of
        if "rejected_token_weights" in features[0]:
            batch.chosen_weights = _response_matrix([f["chosen_token_weights"] for f in features], t, 1.0)
            batch.rejected_weights = _response_matrix([f["rejected_token_weights"] for f in features], t, 1.0)
        if "ref_chosen_logps" in features[0]:
            batch.ref_chosen = _response_matrix([_per_token(f["ref_chosen_logps"]) for f in features], t, 0.0)
            batch.ref_rejected = _response_matrix([_per_token(f["ref_rejected_logps"]) for f in features], t, 0.0)
        return batch

    def _width(self, n: int) -> int:
        m = self.pad_to_multiple_of
        return -(-n // m) * m if m else n

    def _pad(self, seqs: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        width = self._width(max(len(s) for s in seqs))
        input_ids = torch.full((len(seqs), width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for i, s in enumerate(seqs):
            input_ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
            attention_mask[i, : len(s)] = 1
        return input_ids, attention_mask

    def _shared(self, prompts, chosen, rejected, row_ids) -> PairBatch:
        """prompt + chosen + rejected of a pair in one row; rejected attends to the prompt and itself only (the
        mask is described by the pieces' lengths and built on the device, :class:`SharedMask`)."""
        width = self._width(max(len(p) + len(c) + len(r) for p, c, r in zip(prompts, chosen, rejected)))
        rows = len(prompts)
        input_ids = torch.full((rows, width), self.pad_token_id, dtype=torch.long)
        position_ids = torch.zeros(rows, width, dtype=torch.long)
        for row, (p, c, r) in enumerate(zip(prompts, chosen, rejected)):
            input_ids[row, : len(p) + len(c) + len(r)] = torch.tensor(p + c + r, dtype=torch.long)
            position_ids[row] = _pair_positions(len(p), len(c), len(r), width)
        lengths = torch.tensor([(len(p), len(c), len(r)) for p, c, r in zip(prompts, chosen, rejected)],
                               dtype=torch.long)
        mask = SharedMask(lengths, width, self.window, self.mask_types)
        start = torch.tensor([len(p) for p in prompts], dtype=torch.long)
        return self._shared_batch(input_ids, mask, position_ids, torch.arange(rows), start, chosen, rejected, row_ids)

    def _packed(self, prompts, chosen, rejected, row_ids) -> PairBatch:
        """All pairs end to end in one row (padded only to ``pad_to_multiple_of``); attention follows
        :class:`PairSegments`."""
        lengths = tuple((len(p), len(c), len(r)) for p, c, r in zip(prompts, chosen, rejected))
        offsets = torch.tensor([0] + [sum(x) for x in lengths], dtype=torch.long).cumsum(0)
        ids = [t for p, c, r in zip(prompts, chosen, rejected) for t in p + c + r]
        pad = self._width(len(ids)) - len(ids)
        ids += [self.pad_token_id] * pad
        position_ids = torch.cat([_pair_positions(*x, sum(x)) for x in lengths] + [torch.zeros(pad, dtype=torch.long)])
        start = offsets[:-1] + torch.tensor([x[0] for x in lengths], dtype=torch.long)
        # a 4D mask reaches the attention function as is; this empty one only stops transformers from building
        # a (T x T) mask, and fails loudly in any attention that is not the segment one
        placeholder = torch.zeros(1, 1, 0, 0)
        batch = self._shared_batch(torch.tensor([ids], dtype=torch.long), placeholder, position_ids[None],
                                   torch.zeros(len(lengths), dtype=torch.long), start, chosen, rejected, row_ids)
        batch.segments = PairSegments(lengths, pad)
        return batch

    @staticmethod
    def _shared_batch(input_ids, mask, position_ids, row, start, chosen, rejected, row_ids) -> PairBatch:
        n_c = torch.tensor([len(c) for c in chosen], dtype=torch.long)
        return PairBatch(
            input_ids=input_ids,
            attention_mask=mask,
            response_start=torch.cat([start, start + n_c]),
            response_len=torch.tensor([len(c) for c in chosen] + [len(r) for r in rejected], dtype=torch.long),
            row_ids=row_ids,
            response_row=row.repeat(2),
            first_pred=torch.cat([start - 1, start - 1]),
            position_ids=position_ids,
        )


def _pair_positions(n_p: int, n_c: int, n_r: int, width: int) -> torch.Tensor:
    """Positions of prompt, chosen, rejected in a shared segment: rejected restarts after the prompt."""
    pos = torch.zeros(width, dtype=torch.long)
    pos[: n_p + n_c] = torch.arange(n_p + n_c)
    pos[n_p + n_c : n_p + n_c + n_r] = torch.arange(n_p, n_p + n_r)
    return pos
