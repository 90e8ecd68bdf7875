"""Objective algebra: masks (POET, cADPO) → feedback units (ADPO) → link losses → reduction."""

from prefkit.objectives.objective import Objective, build_objective
from prefkit.objectives.spec import ObjectiveSpec
from prefkit.objectives.types import LossOutput, LossStats, PairLogps

__all__ = ["LossOutput", "LossStats", "Objective", "ObjectiveSpec", "PairLogps", "build_objective"]
