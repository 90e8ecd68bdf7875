"""Renamed metrics and their deprecated names (docs/dynamics.md).

For a deprecation period ``metrics.jsonl`` carries both names, so tools reading the old ones keep working;
every reader in prefkit reads the new name and falls back to the old one, so runs logged before the rename
(committed results included) still read.
"""

from __future__ import annotations

from collections.abc import Mapping

# new name → deprecated name
DEPRECATED: dict[str, str] = {
    "band/lower": "db/lower",
    "band/upper": "db/upper",
    "band/in_band": "db/in_band",
    "score_grad/norm_chosen": "score/norm_chosen",
    "score_grad/norm_rejected": "score/norm_rejected",
    "score_grad/cos": "score/cos",
}


def with_deprecated_names(metrics: Mapping[str, float]) -> dict[str, float]:
    """``metrics`` plus, for each renamed metric it holds, the same value under the deprecated name."""
    return {**metrics, **{old: metrics[new] for new, old in DEPRECATED.items() if new in metrics}}


def with_current_names(record: Mapping) -> dict:
    """A logged record with every renamed metric under its new name, taken from the deprecated one where only
    that was logged."""
    return {**record, **{new: record[old] for new, old in DEPRECATED.items() if new not in record and old in record}}
