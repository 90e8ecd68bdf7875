"""Files a run reads and writes beside its work: writability checks before the work, atomic writes under unique
temporary names, the output dir's lock, and metrics.jsonl read tolerantly."""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

from prefkit.errors import ConfigError, DataError

logger = logging.getLogger("prefkit")


def check_writable_dir(path: Path, option: str, *, create: bool) -> None:
    """ConfigError naming ``option`` unless files can be written in ``path`` (created first when ``create``)."""
    above = next((p for p in [path, *path.parents] if p.exists()), None)
    if above is not None and not above.is_dir():
        raise ConfigError(f"{option}: {path} lies under {above}, which is a file; choose another path")
    try:
        if create:
            path.mkdir(parents=True, exist_ok=True)
        elif not path.is_dir():
            raise ConfigError(f"{option}: the folder {path} does not exist; create it or choose another path")
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as e:
        raise ConfigError(f"{option}: cannot write in {path} ({e.strerror or e}); choose a writable path") from e


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file of a unique name in the same folder (so two writers
    never share one), flushed to disk, then renamed over ``path``: a reader sees the old or the new text."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with tmp.open("w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def output_dir_lock(path: Path, lock_name: str) -> Iterator[None]:
    """An exclusive lock on the output dir while the block runs (the OS releases it when the process ends, also
    on kill -9), so that two runs never write into one dir. Only the main process of a launch takes it."""
    if os.environ.get("RANK", "0") != "0":
        yield
        return
    path.mkdir(parents=True, exist_ok=True)
    with (path / lock_name).open("a+") as f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            f.seek(0)
            holder = f.read().strip() or "?"
            raise ConfigError(f"--output_dir: {path} is in use by another prefkit run (pid {holder}); wait for it "
                              "to end or choose another directory") from e
        f.seek(0)
        f.truncate()
        f.write(str(os.getpid()))
        f.flush()
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def read_jsonl_tolerant(path: Path) -> tuple[list[dict], bool]:
    """(records, whether a torn last line was dropped) of a JSONL log that a killed writer may have cut mid-line;
    a bad line anywhere else is damage, named by file and line."""
    lines = path.read_text(errors="replace").splitlines()
    records, torn = [], False
    for i, ln in enumerate(lines, start=1):
        if not ln.strip():
            continue
        try:
            rec = json.loads(ln)
        except json.JSONDecodeError as e:
            if i == len(lines):
                torn = True
                continue
            raise DataError(f"malformed JSON ({e.msg}); only a torn last line is dropped by itself",
                            source=f"{path}:{i}") from e
        if not isinstance(rec, dict):
            raise DataError("expected a JSON object", source=f"{path}:{i}")
        records.append(rec)
    if torn:
        logger.warning("%s: dropped a torn last line (a run was killed while writing it)", path)
    return records, torn
