"""prefkit: preference alignment of Hugging Face causal LMs.

DPO-family objectives x ADPO feedback granularity x POET x reward calibration, composable, on transformers.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

__version__ = "0.1.0"
__all__ = ["PrefConfig", "PrefTrainer", "__version__"]

if TYPE_CHECKING:
    from prefkit.config import PrefConfig
    from prefkit.trainer import PrefTrainer


def __getattr__(name: str):
    # Lazy so that `import prefkit` and `prefkit --help` stay fast.
    if name == "PrefConfig":
        from prefkit.config import PrefConfig

        return PrefConfig
    if name == "PrefTrainer":
        from prefkit.trainer import PrefTrainer

        return PrefTrainer
    raise AttributeError(name)
