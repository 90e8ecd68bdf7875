"""DynamicsSpec: the options of preference dynamics and reward calibration, declared once and checked here.

:class:`prefkit.config.PrefConfig` takes these fields as its dynamics options (same names, defaults, help);
:class:`prefkit.dynamics.DynamicsMonitor` reads them from this spec.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from prefkit.errors import ConfigError

PARAM_SETS = ("auto", "lm_head", "last_block", "lora", "trainable")
RC_SCORES = ("mean", "sum")
RC_TARGETS = ("centre", "band")


def _opt(default, help: str):  # noqa: A002 - "help" is the metadata key HfArgumentParser reads
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class DynamicsSpec:
    dynamics_steps: int = _opt(0, "Log incentive/score/band diagnostics every N steps.")
    dynamics_params: str = _opt("auto", "Parameters for score norms: auto | lm_head | last_block | lora | trainable.")
    dynamics_probe_size: int = _opt(8, "Pairs in the fixed probe batch.")
    displacement_patience: int = _opt(3, "Warn after this many logs in a row with falling chosen log-prob.")
    reward_calibration: bool = _opt(False, "RC: rescale d_w/d_l into the band.")
    rc_ema: float = _opt(0.98, "EMA decay of RC statistics.")
    rc_scores: str = _opt("mean", "RC's scores z, whose gradient norms set r* = |s_l|/|s_w| (and the incentives d = "
                                  "dl/dz): mean (length-averaged log-probs, the authors') or sum (summed log-probs).")
    rc_target: str = _opt("centre", "RC's aim: centre (move d_w/d_l to r* every step, the authors') or band (leave it "
                                    "while inside the disentanglement band, else move it to the nearest edge).")
    rc_norm_steps: int = _opt(1, "Refresh RC's score norms every N optimizer steps (1: every step, the authors').")
    rc_fixed_alpha: float | None = _opt(None, "A control: RC runs as configured (statistics, score norms, logging) "
                                              "but applies this α (finite, > 0) instead of its own (unset: RC's α).")

    @classmethod
    def from_config(cls, cfg) -> DynamicsSpec:
        return cls(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(cls)})


def validate_dynamics(spec: DynamicsSpec) -> None:
    """Reject invalid dynamics / RC options at start-up, naming the option to change."""

    def bad(option: str, msg: str) -> None:
        raise ConfigError(f"--{option}: {msg}")

    if spec.dynamics_steps < 0:
        bad("dynamics_steps", f"must be >= 0, got {spec.dynamics_steps}")
    if spec.dynamics_params not in PARAM_SETS:
        bad("dynamics_params", f"must be {', '.join(PARAM_SETS[:-1])} or {PARAM_SETS[-1]}, got {spec.dynamics_params!r}")
    for option in ("dynamics_probe_size", "displacement_patience"):
        if getattr(spec, option) < 1:
            bad(option, f"must be at least 1, got {getattr(spec, option)}")
    if not (math.isfinite(spec.rc_ema) and 0.0 <= spec.rc_ema < 1.0):
        bad("rc_ema", f"must be in [0, 1), got {spec.rc_ema}")
    if spec.rc_scores not in RC_SCORES:
        bad("rc_scores", f"must be mean or sum, got {spec.rc_scores!r}")
    if spec.rc_target not in RC_TARGETS:
        bad("rc_target", f"must be centre or band, got {spec.rc_target!r}")
    if spec.rc_norm_steps < 1:
        bad("rc_norm_steps", f"must be a positive integer, got {spec.rc_norm_steps}")
    if spec.rc_fixed_alpha is not None and not (math.isfinite(spec.rc_fixed_alpha) and spec.rc_fixed_alpha > 0):
        bad("rc_fixed_alpha", f"must be a finite number > 0 (or unset), got {spec.rc_fixed_alpha}")
    if not spec.reward_calibration:
        # an RC option without RC would run plain training under an RC label: refused, not ignored
        for f in dataclasses.fields(spec):
            if f.name.startswith("rc_") and getattr(spec, f.name) != f.default:
                bad(f.name, "has no effect without --reward_calibration true; add it or drop this option")
