"""User-facing errors: one clear message, a non-zero exit, no traceback (``--debug_traceback`` shows it)."""

from __future__ import annotations


class PrefkitError(Exception):
    """An error the user can fix; the CLI prints ``prefkit: error: <message>`` and exits with ``exit_code``."""

    exit_code = 2


class ConfigError(PrefkitError):
    """An invalid option value or combination, raised before any training starts."""


class DataError(PrefkitError):
    """Bad input data. The message names the file, the line/row and the field."""

    def __init__(self, message: str, *, source: str | None = None, row: int | None = None, field: str | None = None):
        where = ", ".join(
            p for p in (source, f"row {row}" if row is not None else None, f"field {field!r}" if field else None) if p
        )
        super().__init__(f"{where}: {message}" if where else message)
        self.source, self.row, self.field = source, row, field


class ModelError(PrefkitError):
    """A model or tokenizer that cannot be used (not found, not a causal LM, pickled weights…)."""


class TrainingFault(PrefkitError):
    """A numerical fault during training (NaN/inf loss or gradient)."""

    exit_code = 3


def one_line(e: BaseException) -> str:
    """A library exception's message on one line (transformers' validation messages span several)."""
    return " ".join(str(e).split()) or type(e).__name__
