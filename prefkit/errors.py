"""User-facing errors: one clear message, a non-zero exit, no traceback (``--debug_traceback`` shows it)."""

from __future__ import annotations


class PrefkitError(Exception):
    """An error the user can fix; the CLI prints ``prefkit: error: <message>`` and exits with ``exit_code``."""

    exit_code = 2


class ConfigError(PrefkitError, ValueError):
    """An invalid option value or combination, raised before any training starts. A ValueError, as TRL's and
    transformers' checks of their options are, so code written to catch those catches it too."""


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


DEBUG_HINT = "run with PREFKIT_DEBUG=1 for the traceback"


def describe(e: BaseException) -> tuple[str, int]:
    """(one-line message, exit code) for an exception that reached the command line's boundary. Known library
    causes are named with what to do; anything else gets its type and message and the PREFKIT_DEBUG hint."""
    import errno
    import json

    if isinstance(e, PrefkitError):
        return str(e), e.exit_code
    msg = one_line(e)
    if isinstance(e, OSError):
        where = " ".join(str(p) for p in (e.filename, e.filename2) if p) or "a file"
        if e.errno == errno.ENOSPC:
            return f"{where}: no space left on the device; free space or choose another --output_dir", 4
        if e.errno == errno.EROFS:
            return f"{where}: read-only file system; choose another --output_dir", 4
        if isinstance(e, PermissionError):
            return f"{where}: permission denied; choose a path you can write (or read)", 4
        if isinstance(e, (FileNotFoundError, NotADirectoryError, IsADirectoryError, FileExistsError)):
            return f"{where}: {e.strerror or msg}; check the path", 4
    if isinstance(e, RecursionError):
        return "input nested too deeply to read (a JSON value nested thousands of levels?)", 2
    if isinstance(e, EOFError):
        return f"a compressed or serialized file ends early (truncated?): {msg}", 2
    if isinstance(e, json.JSONDecodeError):
        return f"malformed JSON ({e.msg} at line {e.lineno}, column {e.colno})", 2
    if type(e).__name__ == "SafetensorError":
        return f"a .safetensors file is corrupt or truncated ({msg}); re-save or re-download it", 2
    if isinstance(e, MemoryError) or type(e).__name__ == "OutOfMemoryError":
        return ("out of memory; lower --per_device_train_batch_size / --per_device_eval_batch_size or "
                "--max_length"), 5
    if isinstance(e, (RuntimeError, TypeError)) and any(
            s in str(e) for s in ("dtype", "scalar type", "not implemented for 'Half'", "not implemented for 'BFloat16'")):
        return f"a dtype mismatch ({msg}); on a CPU drop --fp16, or pass --dtype float32", 2
    library = _raised_in(e, ("transformers", "peft", "accelerate", "datasets", "safetensors", "tokenizers"))
    if isinstance(e, (ValueError, ImportError)) and library:  # their checks of options and inputs
        return f"{msg} (from {library}: change the option or input it names)", 2
    return f"unexpected {type(e).__name__}: {msg} ({DEBUG_HINT})", 1


def _raised_in(e: BaseException, packages: tuple[str, ...]) -> str | None:
    """The package among ``packages`` whose code raised ``e`` (its innermost frame), if any."""
    import traceback

    frames = traceback.extract_tb(e.__traceback__) if e.__traceback__ else []
    if not frames:
        return None
    parts = frames[-1].filename.replace("\\", "/").split("/")
    return next((p for p in packages if p in parts), None)
