"""Objective algebra: masks (POET, cADPO) → feedback units (ADPO) → link losses → reduction."""

from prefkit.objectives.objective import Objective, ObjectiveSpec, build_objective
from prefkit.objectives.types import LossOutput, LossStats, PairLogps

__all__ = ["LossOutput", "LossStats", "Objective", "ObjectiveSpec", "PairLogps", "build_objective"]
