"""Reward calibration (RC, arXiv 2604.18239, Sec. 5): rebalance d_w/d_l into the disentanglement band for any
objective without changing it.

Log-domain EMAs of the batch-mean d_w, d_l give r = d_w/d_l; of ‖s_w‖, ‖s_l‖ give r* = ‖s_l‖/‖s_w‖ (the band's
geometric centre); a linear EMA of ρ = cos(s_w, s_l) gives the band [ρ·r*, r*/ρ]. The calibrated ratio is
α²·r, with α (no gradient) scaling the chosen gradient and 1/α the rejected one:

- target ``centre`` (the authors'): α = sqrt(r*/r), every step;
- target ``band``: α = 1 while r is inside the band, else the ratio moves to the nearest edge
  (α = sqrt(edge/r)); with ρ ≤ 0 every ratio is inside, so α = 1.

Statistics are gathered over an optimizer step's micro-batches and committed once per step (averaged over
micro-batches and processes), so α is the same on every rank and a run with gradient accumulation matches a
multi-process run with the same global batch. Applied per token as x̂ = sg(x) + α·(x − sg(x)): the forward
value is bit-for-bit x (x − sg(x) is exactly 0), unlike α·x + (1−α)·sg(x), which rounds. The EMAs start from
the first observed value (no bias correction needed); α = 1 until all statistics the target needs have been seen.

Everything stays on the training device: statistics, EMAs and α are tensors, and which values count (finite,
positive, seen yet) is decided with ``torch.where``, so a training step asks the host for nothing (a GPU would
wait for its queue on every ``.item()``). Values reach the host only when they are logged or checkpointed.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from prefkit.dynamics.grad_norms import ScoreGradNorms
from prefkit.dynamics.incentives import Incentives
from prefkit.metrics import Weighted
from prefkit.objectives.types import PairLogps

_KEYS = ("log_d_w", "log_d_l", "log_norm_w", "log_norm_l", "cos")
# which EMAs (a slice of _KEYS) each kind of statistic feeds; a row is its values and a count of 1
_KINDS = {"incentives": slice(0, 2), "scores": slice(2, 5)}
TARGETS = ("centre", "band")


def _dtype(device: torch.device) -> torch.dtype:
    return torch.float32 if device.type == "mps" else torch.float64  # MPS has no float64


def _scaled(x: Tensor, a: Tensor | float) -> Tensor:
    sg = x.detach()
    return sg + a * (x - sg)


def _log_shift(log_r: Tensor, log_r_star: Tensor, cos: Tensor, cos_seen: Tensor, target: str) -> Tensor:
    """log(α²): how far RC moves log(d_w/d_l). ``cos`` (with whether it has been seen) matters only to ``band``."""
    if target == "centre":
        return log_r_star - log_r
    half = -torch.log(cos.clamp(max=1.0))
    lower, upper = log_r_star - half, log_r_star + half
    shift = torch.minimum((lower - log_r).clamp(min=0.0), upper - log_r)
    return torch.where(cos_seen & (cos > 0), shift, 0.0)  # no cosine yet, or ρ ≤ 0: the band is (0, ∞)


class RewardCalibrator:
    def __init__(self, ema: float = 0.98, reduce_mean: Callable[[Tensor], Tensor] | None = None,
                 target: str = "centre", fixed_alpha: float | None = None):
        if target not in TARGETS:
            raise ValueError(f"RC target must be one of {TARGETS}, got {target!r}")
        if fixed_alpha is not None and not (math.isfinite(fixed_alpha) and fixed_alpha > 0):
            raise ValueError(f"RC fixed alpha must be finite and > 0, got {fixed_alpha!r}")
        self.ema = ema
        self.target = target
        # a control: statistics, norms and metrics as configured, but this α is applied instead of RC's own
        self.fixed_alpha = fixed_alpha
        # under distributed training every rank must use the same α: batch means are reduced across ranks
        self.reduce_mean = reduce_mean or (lambda t: t)
        self._values: Tensor | None = None  # (5,) the EMAs in _KEYS order; None until the first commit
        self._seen: Tensor | None = None  # (5,) bool: which EMAs have a first value
        self._alpha: Tensor | None = None  # α of the committed EMAs
        self._pending: dict[str, Tensor | None] = dict.fromkeys(_KINDS)  # the step's summed rows, count last

    def _add(self, kind: str, row: Tensor, ok: Tensor | None) -> None:
        """Add a row (values, then a count); one with any non-finite value (or ``ok`` false) adds zeros, count too."""
        keep = torch.isfinite(row).all()
        if ok is not None:
            keep = keep & ok.to(row.device, non_blocking=True).reshape(())
        row = torch.where(keep, row, 0.0)
        old = self._pending[kind]
        self._pending[kind] = row if old is None else old.to(row.device) + row

    @staticmethod
    def _row(*values: Tensor | float) -> Tensor:
        """One micro-batch's row: its values and a count of 1, on the values' device."""
        device = next((v.device for v in values if isinstance(v, Tensor)), torch.device("cpu"))
        dtype = _dtype(device)
        return torch.stack([torch.as_tensor(v, device=device).to(dtype).reshape(()) for v in (*values, 1.0)])

    def update_incentives(self, inc: Incentives, ok: Tensor | None = None) -> None:
        """Record one micro-batch's mean incentives (committed at the end of the optimizer step); ``ok`` (a bool
        tensor) false leaves the micro-batch out, as a non-finite value does."""
        dtype = _dtype(inc.d_w.device)
        self._add("incentives", self._row(inc.d_w.to(dtype).mean(), inc.d_l.to(dtype).mean()), ok)

    def update_grad_norms(self, stats: ScoreGradNorms, ok: Tensor | None = None) -> None:
        self._add("scores", self._row(stats.norm_chosen, stats.norm_rejected, stats.cos), ok)

    def commit(self, device: torch.device | None = None) -> None:
        """Fold the step's statistics into the EMAs: averaged over micro-batches, then over processes.

        Every process calls this at the same step boundaries and reduces both kinds (zeros when it has none),
        so the collectives match even where only some ranks measured. A micro-batch with any non-finite value
        was left out whole (its count too) when it was added: one NaN or inf must neither reach an EMA nor move
        one half of a ratio without the other. A kind whose means are not both > 0 (log-domain ratios) moves no
        EMA this step. ``device``: where the statistics live when this process has none yet (after a resume)."""
        held = [t for t in (self._values, *self._pending.values()) if t is not None]
        device = device or (held[0].device if held else torch.device("cpu"))
        dtype = _dtype(device)
        if self._values is None:
            self._values = torch.zeros(len(_KEYS), dtype=dtype, device=device)
            self._seen = torch.zeros(len(_KEYS), dtype=torch.bool, device=device)
        # a resumed run's state is loaded on the CPU: moved once, here, to where this run's statistics are
        self._values, self._seen = self._values.to(device, dtype), self._seen.to(device)
        self._pending = {k: None if t is None else t.to(device, dtype) for k, t in self._pending.items()}
        for kind, keys in _KINDS.items():
            width = keys.stop - keys.start + 1
            local = self._pending[kind]
            total = self.reduce_mean(local if local is not None else torch.zeros(width, dtype=dtype, device=device))
            count = total[-1]
            means = total[:-1] / torch.where(count > 0, count, 1.0)
            valid = (count > 0) & (means[0] > 0) & (means[1] > 0) & torch.isfinite(means).all()
            x = torch.cat([means[:2].log(), means[2:]])  # the cosine stays linear; an invalid log is not used
            old, seen = self._values[keys], self._seen[keys]
            new = torch.where(seen, self.ema * old + (1 - self.ema) * x, x)
            self._values[keys] = torch.where(valid, new, old)
            self._seen[keys] = seen | valid
        self.discard_pending()
        self._alpha = self._own_alpha()

    def discard_pending(self) -> None:
        """Forget the statistics recorded since the last commit (an optimizer step that will not happen)."""
        self._pending = dict.fromkeys(_KINDS)

    def _logs(self) -> tuple[Tensor, Tensor, Tensor]:
        """log r, log r* and whether both are known (all four of their EMAs seen)."""
        v = self._values
        return v[0] - v[1], v[3] - v[2], self._seen[:4].all()

    def _own_alpha(self) -> Tensor:
        log_r, log_r_star, known = self._logs()
        shift = _log_shift(log_r, log_r_star, self._values[4], self._seen[4], self.target)
        return torch.where(known, torch.exp(0.5 * shift), 1.0)

    def _applied_alpha(self) -> Tensor | float:
        if self.fixed_alpha is not None:
            return self.fixed_alpha
        return self._alpha if self._alpha is not None else 1.0

    def alpha(self) -> float:
        """The α applied now, read on the host."""
        return float(self._applied_alpha())

    def metrics(self) -> dict[str, Tensor | float | Weighted]:
        """rc/alpha always; once a step has been committed, the EMA ratio r, target r* and whether r is inside the
        band, each counted in the logged mean only on micro-batches where its statistics are known (``Weighted``)."""
        out: dict[str, Tensor | float | Weighted] = {"rc/alpha": self._applied_alpha()}
        if self._values is not None:
            log_r, log_r_star, known = self._logs()
            out["rc/ratio"] = Weighted(torch.exp(log_r), known)
            out["rc/target"] = Weighted(torch.exp(log_r_star), known)
            inside = _log_shift(log_r, log_r_star, self._values[4], self._seen[4], "band") == 0
            out["rc/in_band"] = Weighted(inside.to(self._values.dtype), known & self._seen[4])
        return out

    def apply(self, logps: PairLogps) -> PairLogps:
        a = self._applied_alpha()
        return logps.replace(chosen=_scaled(logps.chosen, a), rejected=_scaled(logps.rejected, 1.0 / a))

    @property
    def state(self) -> dict[str, float | None]:
        """The EMAs on the host, None where not seen yet."""
        if self._values is None:
            return dict.fromkeys(_KEYS)
        values, seen = self._values.tolist(), self._seen.tolist()
        return {k: v if s else None for k, v, s in zip(_KEYS, values, seen)}

    def state_dict(self) -> dict:
        # pending as rows of (values..., count), as when every micro-batch was a row: the saved sum is one row
        pending = {k: [] if t is None else [t.tolist()] for k, t in self._pending.items()}
        return {**self.state, "pending": {k: [r for r in rows if r[-1] > 0] for k, rows in pending.items()}}

    def load_state_dict(self, state: dict) -> None:
        values = [state.get(k) for k in _KEYS]
        if all(v is None for v in values):
            self._values = self._seen = self._alpha = None
        else:
            self._values = torch.tensor([0.0 if v is None else v for v in values], dtype=torch.float64)
            self._seen = torch.tensor([v is not None for v in values])
            self._alpha = self._own_alpha()
        self.discard_pending()
        for kind, rows in (state.get("pending") or {}).items():
            for row in rows:
                self._add(kind, torch.tensor(row, dtype=torch.float64), None)
