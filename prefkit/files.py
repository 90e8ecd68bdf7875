"""Files a run reads and writes beside its work: writability checks before the work, atomic writes under unique
temporary names, the output dir's lock, and metrics.jsonl read tolerantly."""

from __future__ import annotations

import tempfile
from pathlib import Path

from prefkit.errors import ConfigError


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
