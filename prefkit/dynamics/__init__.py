"""Preference dynamics (arXiv 2604.18239): incentives, score norms, the disentanglement band, and RC."""

from prefkit.dynamics.band import band_edges, fraction_in_band, in_band
from prefkit.dynamics.calibration import RewardCalibrator
from prefkit.dynamics.grad_norms import ScoreGradNorms, score_grad_norms, select_params
from prefkit.dynamics.incentives import Incentives, compute_incentives
from prefkit.dynamics.monitor import DynamicsMonitor

__all__ = [
    "DynamicsMonitor",
    "Incentives",
    "RewardCalibrator",
    "ScoreGradNorms",
    "band_edges",
    "compute_incentives",
    "fraction_in_band",
    "in_band",
    "score_grad_norms",
    "select_params",
]
