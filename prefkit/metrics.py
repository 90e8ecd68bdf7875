"""MetricMeans: the per-batch statistics of training and held-out evaluation, summed as tensors between logs.

A batch adds its metrics as (detached) tensors; nothing is copied to the host until :meth:`MetricMeans.pop` at a
logging step, which returns each metric's mean over the batches since the last pop (over processes too, with a
``reduce``)."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import Tensor

MODES = ("train", "eval")


class MetricMeans:
    def __init__(self) -> None:
        self._sums: dict[str, dict[str, Tensor]] = {m: {} for m in MODES}
        self._counts: dict[str, dict[str, int]] = {m: {} for m in MODES}

    def add(self, mode: str, metrics: Mapping[str, Tensor | float]) -> None:
        sums, counts = self._sums[mode], self._counts[mode]
        for key, value in metrics.items():
            v = value.detach().float() if isinstance(value, Tensor) else torch.tensor(float(value))
            sums[key] = sums[key] + v.to(sums[key].device) if key in sums else v
            counts[key] = counts.get(key, 0) + 1

    def pop(self, mode: str, device: torch.device | str = "cpu",
            reduce: Callable[[Tensor], Tensor] | None = None) -> dict[str, float]:
        """Each metric's mean since the last pop of ``mode``, and forget them. ``reduce`` (a mean over
        processes) sees one stacked tensor, so every process must hold the same keys."""
        sums, counts = self._sums[mode], self._counts[mode]
        keys = sorted(sums)
        if not keys:
            return {}
        means = torch.stack([(sums[k] / counts[k]).to(device) for k in keys])
        if reduce is not None:
            means = reduce(means)
        sums.clear()
        counts.clear()
        return dict(zip(keys, means.tolist()))
