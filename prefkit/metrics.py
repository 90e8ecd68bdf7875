"""MetricMeans: the per-batch statistics of training and held-out evaluation, summed as tensors between logs.

A batch adds its metrics as (detached) tensors; nothing is copied to the host until :meth:`MetricMeans.pop` at a
logging step, which returns each metric's mean over the batches since the last pop (over processes too, with a
``reduce``)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

MODES = ("train", "eval")


@dataclass(frozen=True)
class Weighted:
    """A metric that is known on some batches only (a bool or 0/1 ``weight`` tensor, decided on the device): its
    logged mean counts the batches with weight, and a log none of whose batches has any leaves it out."""

    value: Tensor
    weight: Tensor


class MetricMeans:
    def __init__(self) -> None:
        self._sums: dict[str, dict[str, Tensor]] = {m: {} for m in MODES}
        self._counts: dict[str, dict[str, int | Tensor]] = {m: {} for m in MODES}

    def add(self, mode: str, metrics: Mapping[str, Tensor | float | Weighted]) -> None:
        sums, counts = self._sums[mode], self._counts[mode]
        for key, value in metrics.items():
            if isinstance(value, Weighted):
                w = value.weight.detach().float()
                v = torch.where(w > 0, value.value.detach().float(), 0.0) * w  # an unknown value may be NaN
            else:
                w = 1
                v = value.detach().float() if isinstance(value, Tensor) else torch.tensor(float(value))
            sums[key] = sums[key] + v.to(sums[key].device) if key in sums else v
            counts[key] = counts[key] + w if key in counts else w

    def pop(self, mode: str, device: torch.device | str = "cpu",
            reduce: Callable[[Tensor], Tensor] | None = None) -> dict[str, float]:
        """Each metric's mean since the last pop of ``mode``, and forget them. ``reduce`` (a mean over
        processes) sees one stacked tensor, so every process must hold the same keys."""
        sums, counts = self._sums[mode], self._counts[mode]
        keys = sorted(sums)
        if not keys:
            return {}
        weights = [torch.as_tensor(counts[k], dtype=torch.float32).to(device) for k in keys]
        means = torch.stack([(sums[k].to(device) / w) for k, w in zip(keys, weights)] + weights)
        if reduce is not None:
            means = reduce(means)
        sums.clear()
        counts.clear()
        values = means.tolist()
        return {k: v for k, v, w in zip(keys, values, values[len(keys):]) if w > 0}
