"""Collate tokenized pairs into a :class:`PairBatch`: chosen rows then rejected rows, right-padded."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from prefkit.data.types import PairBatch

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from prefkit.config import PrefConfig


def _response_matrix(values: list[list[float]], width: int, fill: float) -> torch.Tensor:
    out = torch.full((len(values), width), fill, dtype=torch.float32)
    for i, v in enumerate(values):
        out[i, : len(v)] = torch.tensor(v[:width], dtype=torch.float32)
    return out


@dataclass
class PairCollator:
    """Builds the one-forward layout for B pairs (rows 0..B-1 prompt+chosen, B..2B-1 prompt+rejected).

    ``static_eos_padding``: extend the shorter response of each pair with real EOS tokens to the longer one's
    length — the ADPO paper's padding for static windows (those EOS tokens are scored).
    ``share_prompt``: one row per pair, prompt computed once (see :class:`PairBatch`).
    ``pack_pairs`` (with ``share_prompt``): several pairs per row, bin-packed (:func:`pack_rows`).
    """

    pad_token_id: int
    eos_token_id: int | None = None
    static_eos_padding: bool = False
    pad_to_multiple_of: int | None = None
    share_prompt: bool = False
    pack_pairs: bool = False

    @classmethod
    def for_config(cls, cfg: PrefConfig, tokenizer: PreTrainedTokenizerBase, *, training: bool = True) -> PairCollator:
        """The layout a run's options ask for; ``training=False`` (held-out scoring) never adds EOS padding."""
        return cls(
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            static_eos_padding=training and cfg.granularity == "static" and cfg.static_padding == "eos",
            share_prompt=cfg.share_prompt,
            pack_pairs=cfg.share_prompt and cfg.pack_pairs,
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
        if self.share_prompt:
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
        if "rejected_token_weights" in features[0]:
            batch.chosen_weights = _response_matrix([f["chosen_token_weights"] for f in features], t, 1.0)
            batch.rejected_weights = _response_matrix([f["rejected_token_weights"] for f in features], t, 1.0)
        if "ref_chosen_logps" in features[0]:
            batch.ref_chosen = _response_matrix([f["ref_chosen_logps"] for f in features], t, 0.0)
            batch.ref_rejected = _response_matrix([f["ref_rejected_logps"] for f in features], t, 0.0)
        return batch

    def _width(self, longest: int) -> int:
        m = self.pad_to_multiple_of
        return -(-longest // m) * m if m else longest

    def _pad(self, seqs: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        width = self._width(max(len(s) for s in seqs))
        input_ids = torch.full((len(seqs), width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for i, s in enumerate(seqs):
            input_ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
            attention_mask[i, : len(s)] = 1
        return input_ids, attention_mask

    def _shared(self, prompts, chosen, rejected, row_ids) -> PairBatch:
        """prompt + chosen + rejected of a pair in one row segment; rejected attends to the prompt and itself
        only. With ``pack_pairs`` several pairs share a row, each attending only within its own segment."""
        lengths = [len(p) + len(c) + len(r) for p, c, r in zip(prompts, chosen, rejected)]
        width = self._width(max(lengths))
        place = pack_rows(lengths, width) if self.pack_pairs else [(i, 0) for i in range(len(lengths))]
        rows = max(r for r, _ in place) + 1
        input_ids = torch.full((rows, width), self.pad_token_id, dtype=torch.long)
        allowed = torch.eye(width, dtype=torch.bool).repeat(rows, 1, 1)  # padding attends to itself (no NaN rows)
        position_ids = torch.zeros(rows, width, dtype=torch.long)
        causal = torch.ones(width, width, dtype=torch.bool).tril()
        for (row, o), p, c, r in zip(place, prompts, chosen, rejected):
            n_p, n_c, n = len(p), len(c), len(p) + len(c) + len(r)
            input_ids[row, o : o + n] = torch.tensor(p + c + r, dtype=torch.long)
            allowed[row, o : o + n, o : o + n] = causal[:n, :n]
            allowed[row, o + n_p + n_c : o + n, o + n_p : o + n_p + n_c] = False  # rejected never sees chosen
            position_ids[row, o : o + n_p + n_c] = torch.arange(n_p + n_c)
            position_ids[row, o + n_p + n_c : o + n] = torch.arange(n_p, n_p + len(r))
        mask = torch.zeros(rows, 1, width, width, dtype=torch.float32).masked_fill(
            ~allowed[:, None], torch.finfo(torch.float32).min
        )
        row = torch.tensor([r for r, _ in place], dtype=torch.long)
        start = torch.tensor([o + len(p) for (_, o), p in zip(place, prompts)], dtype=torch.long)
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


def pack_rows(lengths: list[int], width: int) -> list[tuple[int, int]]:
    """(row, offset) of each segment, first-fit decreasing into rows of ``width`` tokens.

    Rows stay as wide as the longest pair, so attention cost per row does not grow, while the rows needed
    (and with them the padded tokens every layer computes) drop to roughly total / width.
    """
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    used: list[int] = []
    place = [(0, 0)] * len(lengths)
    for i in order:
        row = next((k for k, u in enumerate(used) if u + lengths[i] <= width), len(used))
        if row == len(used):
            used.append(0)
        place[i] = (row, used[row])
        used[row] += lengths[i]
    return place
