"""Load preference rows from files, ``save_to_disk`` dirs or the hub, keeping source row numbers.

Every row gets ``__row__``: the 1-based line number for JSONL (so messages read file:line) and the 0-based
row index otherwise.
"""

from __future__ import annotations

import gzip
import itertools
import json
import os
import zlib
from collections.abc import Iterator
from pathlib import Path

import datasets
from datasets import Dataset, DatasetDict

from prefkit.errors import DataError

ROW = "__row__"
# the HH-RLHF helpful-base sample (MIT, Anthropic; licence beside it) that the embedded demo trains on
BUNDLED_SAMPLE = Path(__file__).resolve().parent.parent / "resources" / "hh_rlhf_helpful_base_sample.jsonl"
_TABULAR = {".json": "json", ".parquet": "parquet", ".csv": "csv"}


def _suffixes(path: Path) -> tuple[str, bool]:
    name = path.name.lower()
    gz = name.endswith(".gz")
    base = name[:-3] if gz else name
    return Path(base).suffix, gz


# Caps on what one file may make prefkit hold: a line (one row) and a .gz file's decompressed bytes. Both are
# far above real preference data and far below what would exhaust a machine's memory.
MAX_LINE_BYTES = int(os.environ.get("PREFKIT_MAX_LINE_BYTES", 64 << 20))
MAX_DECOMPRESSED_BYTES = int(os.environ.get("PREFKIT_MAX_DECOMPRESSED_BYTES", 16 << 30))


def _lines(path: Path, gz: bool) -> Iterator[tuple[int, bytes]]:
    """(line number, line) streamed from the file, un-gzipped on the fly, each line and the whole stream capped."""
    opener = gzip.open if gz else open
    total = 0
    try:
        with opener(path, "rb") as f:
            for lineno in itertools.count(1):
                line = f.readline(MAX_LINE_BYTES + 1)
                if not line:
                    return
                if len(line) > MAX_LINE_BYTES and not line.endswith(b"\n"):
                    raise DataError(f"line longer than {MAX_LINE_BYTES >> 20} MiB (PREFKIT_MAX_LINE_BYTES); "
                                    "one row that large is not preference data", source=f"{path}:{lineno}")
                total += len(line)
                if gz and total > MAX_DECOMPRESSED_BYTES:
                    raise DataError(f"decompresses to more than {MAX_DECOMPRESSED_BYTES >> 20} MiB "
                                    "(PREFKIT_MAX_DECOMPRESSED_BYTES); a damaged or hostile .gz file?", source=str(path))
                yield lineno, line
    except (OSError, EOFError, zlib.error) as e:
        if not gz or isinstance(e, (PermissionError, FileNotFoundError)):
            raise DataError(f"cannot read the file ({e})", source=str(path)) from e
        raise DataError(f"not a valid or complete gzip file ({e})", source=str(path)) from e


def _read_jsonl(path: Path, gz: bool) -> Dataset:
    rows: list[dict] = []
    for lineno, line in _lines(path, gz):
        try:
            # utf-8-sig on line 1: Windows tools (Notepad, PowerShell) start UTF-8 files with a byte-order mark
            text = line.decode("utf-8-sig" if lineno == 1 else "utf-8")
        except UnicodeDecodeError as e:
            raise DataError(f"invalid UTF-8 at byte {e.start} of the line", source=f"{path}:{lineno}") from e
        if not text.strip():
            continue
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"malformed JSON ({e.msg} at column {e.colno})", source=f"{path}:{lineno}") from e
        except RecursionError as e:
            raise DataError("JSON nested too deeply to read", source=f"{path}:{lineno}") from e
        if not isinstance(obj, dict):
            raise DataError(f"expected a JSON object, got {type(obj).__name__}", source=f"{path}:{lineno}")
        obj[ROW] = lineno
        rows.append(obj)
    return _from_rows(rows, str(path))


def _from_rows(rows: list[dict], source: str) -> Dataset:
    keys: list[str] = []
    for r in rows:
        keys.extend(k for k in r if k not in keys)
    columns = {k: [r.get(k) for r in rows] for k in keys}
    try:
        return Dataset.from_dict(columns)
    except Exception:  # mixed value types in a column (e.g. str and list): keep them as Python objects
        return _ObjectRows(rows, keys)  # type: ignore[return-value]


class _ObjectRows(list):
    """Rows whose columns mix types that Arrow cannot hold in one column; validated row by row later."""

    def __init__(self, rows: list[dict], keys: list[str]):
        super().__init__({k: r.get(k) for k in keys} for r in rows)
        self.column_names = keys


def _with_index(ds: Dataset) -> Dataset:
    if ROW in ds.column_names:
        return ds
    return ds.add_column(ROW, list(range(len(ds))))


def has_split(name: str, split: str) -> bool:
    """Whether a ``save_to_disk`` directory or a cached hub dataset has ``split`` (a single file has only one)."""
    path = Path(name)
    if path.is_file():
        return False
    if path.is_dir():
        return (path / "dataset_dict.json").is_file() and split in json.loads(
            (path / "dataset_dict.json").read_text()).get("splits", [])
    try:
        return split in datasets.get_dataset_split_names(name)
    except Exception:  # offline or unknown: load_rows names the problem
        return True


def load_rows(
    name: str, split: str = "train", *, trust_remote_code: bool = False, config_name: str | None = None
) -> Dataset:
    """Rows of a preference dataset with a ``__row__`` column; raises DataError with file and line.
    ``config_name`` is a hub dataset's configuration (``load_dataset``'s ``name``)."""
    path = Path(name)
    if path.is_file():
        suffix, gz = _suffixes(path)
        if suffix == ".jsonl":
            return _read_jsonl(path, gz)
        if suffix in _TABULAR:
            if suffix == ".json" and not gz:
                return _read_json_file(path)
            try:
                ds = datasets.load_dataset(_TABULAR[suffix], data_files=str(path), split="train")
            except Exception as e:
                raise DataError(f"cannot read as {_TABULAR[suffix]} ({e})", source=str(path)) from e
            return _with_index(ds)
        raise DataError("unsupported file type; use .jsonl, .json, .parquet or .csv (optionally .gz)", source=name)
    if path.is_dir():
        try:
            loaded = datasets.load_from_disk(str(path))
        except Exception as e:
            raise DataError(
                "a directory without a dataset saved by datasets.save_to_disk (no dataset_info.json / "
                "dataset_dict.json found)", source=name
            ) from e
        if isinstance(loaded, DatasetDict):
            if split not in loaded:
                raise DataError(f"split {split!r} not found; splits: {sorted(loaded)}", source=name)
            loaded = loaded[split]
        return _with_index(loaded)
    if path.suffix or name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise DataError("file or directory does not exist", source=name)
    try:
        ds = datasets.load_dataset(name, config_name, split=split, trust_remote_code=trust_remote_code)
    except Exception as e:
        raise DataError(
            f"no such file or directory, and not loadable as a hub dataset (offline or unknown: {e})", source=name
        ) from e
    return _with_index(ds)


def _read_json_file(path: Path) -> Dataset:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise DataError("invalid UTF-8", source=str(path)) from e
    except json.JSONDecodeError as e:
        raise DataError(f"malformed JSON ({e.msg})", source=f"{path}:{e.lineno}") from e
    except RecursionError as e:
        raise DataError("JSON nested too deeply to read", source=str(path)) from e
    if isinstance(data, dict) and all(isinstance(v, list) for v in data.values()):
        n = len(next(iter(data.values()), []))
        data = [{k: v[i] for k, v in data.items()} for i in range(n)]
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise DataError("expected a JSON list of objects (or JSONL)", source=str(path))
    for i, r in enumerate(data):
        r[ROW] = i
    return _from_rows(data, str(path))


def bundled_sample_path() -> str:
    return str(BUNDLED_SAMPLE)
