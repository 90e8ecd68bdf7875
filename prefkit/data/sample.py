"""The bundled HH-RLHF helpful-base sample (MIT, Anthropic) used by the embedded demo."""

from __future__ import annotations

from pathlib import Path

RESOURCES = Path(__file__).resolve().parent.parent / "resources"


def bundled_sample_path() -> str:
    return str(RESOURCES / "hh_rlhf_helpful_base_sample.jsonl")


def bundled_license_path() -> str:
    return str(RESOURCES / "HH_RLHF_LICENSE")
