"""Known library noise the user cannot act on, filtered by the CLI (never at import: the core has no
process-wide side effects). Each filter matches one message exactly; every other warning is kept."""

from __future__ import annotations

import logging
import warnings

# transformers 5 renamed gradient checkpointing to activation checkpointing; peft and Trainer still call the old
# names internally, so the deprecation is printed however the user spells the option
_RENAMED_CHECKPOINTING = r"`(is_)?gradient_checkpointing\w*` is deprecated and will be removed in v6"
# printed by deepspeed's accelerator probe, merely because deepspeed is installed, on machines without a GPU
_DEEPSPEED_CPU = "Setting accelerator to CPU."


class _DropMessage(logging.Filter):
    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefix)


def quiet_known_noise() -> None:
    warnings.filterwarnings("ignore", message=_RENAMED_CHECKPOINTING, category=FutureWarning)
    logging.getLogger("DeepSpeed").addFilter(_DropMessage(_DEEPSPEED_CPU))
