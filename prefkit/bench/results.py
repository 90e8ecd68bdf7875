"""The record of one bench run, as the runner fills it and the report reads and writes it, and the names of
its files."""

from __future__ import annotations

from dataclasses import asdict, dataclass


def point_label(point: dict) -> str:
    """``{"learning_rate": 3e-05}`` → ``"learning_rate=3e-05"``; ``""`` without a sweep."""
    return ", ".join(f"{k}={v}" for k, v in point.items())


@dataclass
class RunResult:
    method: str
    seed: int
    point: str = ""
    accuracy: float | None = None
    val_accuracy: float | None = None
    kl: float | None = None
    gen_length: float | None = None
    d_logp_chosen: float | None = None
    d_logp_rejected: float | None = None
    reward_accuracy: float | None = None
    reward_margin: float | None = None
    ranking_accuracy: float | None = None
    in_band: float | None = None
    train_seconds: float | None = None
    commit: str = ""

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def key(self) -> tuple[str, str, int]:
        return self.method, self.point, self.seed


def trajectory_name(label: str, seed: int) -> str:
    return f"{slug(label)}_seed{seed}.json" if label else f"seed{seed}.json"


def slug(name: str) -> str:
    """A method or sweep-point name as a file or directory name."""
    return "".join(c if c.isalnum() else "_" for c in name).strip("_").lower()
