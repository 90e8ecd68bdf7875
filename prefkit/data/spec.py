"""DataSpec: what tokenizing and collating pairs read from a run's options, checked here."""

from __future__ import annotations

from dataclasses import dataclass

from prefkit.errors import ConfigError

TRUNCATION_MODES = ("keep_end", "keep_start")


@dataclass(frozen=True)
class DataSpec:
    """Built from a PrefConfig (:meth:`from_config`), whose fields hold the defaults: none are repeated here."""

    max_length: int | None
    max_prompt_length: int | None
    truncation_mode: str
    use_token_weights: bool  # cADPO: read per-token weights from the rows
    pad_to_multiple_of: int | None
    # static windows with --static_padding eos: the shorter response of a training pair is extended with scored
    # EOS tokens (the ADPO paper's padding); held-out scoring never pads
    static_eos_padding: bool

    @classmethod
    def from_config(cls, cfg) -> DataSpec:
        return cls(
            max_length=cfg.max_length, max_prompt_length=cfg.max_prompt_length, truncation_mode=cfg.truncation_mode,
            use_token_weights=cfg.use_token_weights, pad_to_multiple_of=cfg.pad_to_multiple_of,
            static_eos_padding=cfg.granularity == "static" and cfg.static_padding == "eos",
        )


def validate_data(spec: DataSpec) -> None:
    """Reject invalid tokenization options at start-up, naming the option to change."""

    def bad(option: str, msg: str) -> None:
        raise ConfigError(f"--{option}: {msg}")

    if spec.max_prompt_length is not None and spec.max_prompt_length < 1:
        bad("max_prompt_length", f"must be at least 1, got {spec.max_prompt_length}")
    if spec.max_length is not None and spec.max_length < 2:
        bad("max_length", f"must be at least 2, got {spec.max_length}")
    if spec.max_prompt_length is not None and spec.max_length is not None and spec.max_prompt_length >= spec.max_length:
        bad("max_prompt_length", f"({spec.max_prompt_length}) must be smaller than --max_length ({spec.max_length})")
    if spec.truncation_mode not in TRUNCATION_MODES:
        bad("truncation_mode", f"must be keep_end or keep_start, got {spec.truncation_mode!r}")
    if spec.pad_to_multiple_of is not None and spec.pad_to_multiple_of < 1:
        bad("pad_to_multiple_of", f"must be a positive integer, got {spec.pad_to_multiple_of}")
