"""Typed values of the data stage: tokenized pairs and collated batches."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field, fields

import torch
from torch import Tensor


@dataclass
class PairBatch:
    """A collated batch of B pairs laid out for one forward pass over chosen and rejected.

    Rows 0..B-1 are prompt+chosen, rows B..2B-1 prompt+rejected, right-padded. ``response_start[i]`` is the
    position of row i's first response token and ``response_len[i]`` its number of response tokens (the
    response ends with EOS unless it was truncated). Token weights and precomputed reference log-probs are
    response-aligned (B, T) tensors, T = the longest response in the batch.
    """

    input_ids: Tensor
    attention_mask: Tensor
    response_start: Tensor
    response_len: Tensor
    row_ids: Tensor
    chosen_weights: Tensor | None = None
    rejected_weights: Tensor | None = None
    ref_chosen: Tensor | None = None
    ref_rejected: Tensor | None = None

    @property
    def num_pairs(self) -> int:
        return self.row_ids.shape[0]

    # transformers.Trainer probes batches like mappings ("labels" in batch, batch["input_ids"])
    def __contains__(self, key: str) -> bool:
        return key in self.__dataclass_fields__ and getattr(self, key) is not None

    def __getitem__(self, key: str) -> Tensor:
        return getattr(self, key)

    def to(self, device: torch.device | str) -> PairBatch:
        moved = {
            f.name: (getattr(self, f.name).to(device) if isinstance(getattr(self, f.name), Tensor) else None)
            for f in fields(self)
        }
        return PairBatch(**moved)


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
