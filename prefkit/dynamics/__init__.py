"""Preference dynamics (arXiv 2604.18239): incentives, score norms, the disentanglement band, and RC."""

from prefkit.dynamics.band import band_edges, fraction_in_band, in_band
from prefkit.dynamics.calibration import RewardCalibrator
from prefkit.dynamics.incentives import Incentives, compute_incentives
from prefkit.dynamics.monitor import DynamicsMonitor
from prefkit.dynamics.scores import ScoreStats, score_stats, select_params

__all__ = [
    "DynamicsMonitor",
    "Incentives",
    "RewardCalibrator",
    "ScoreStats",
    "band_edges",
    "compute_incentives",
    "fraction_in_band",
    "in_band",
    "score_stats",
    "select_params",
]
