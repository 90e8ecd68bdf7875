"""Bad inputs and faults, as a user meets them: each case ends with a non-zero exit (or the documented outcome)
and exactly one ``prefkit: error:`` line naming what and where, never a traceback (docs/reliability.md)."""

from __future__ import annotations

import errno
import json

import pytest

from prefkit import cli
from prefkit.cli import main


def run(argv: list[str], capsys) -> tuple[int, str]:
    code = main(argv)
    out = capsys.readouterr()
    return code, out.out + out.err


def assert_clean(code: int, text: str, *match: str) -> str:
    errors = [ln for ln in text.splitlines() if ln.startswith("prefkit: error:")]
    assert code != 0, text
    assert len(errors) == 1, text
    assert "Traceback" not in text, text
    for m in match:
        assert m in errors[0], errors[0]
    return errors[0]


# ---- the error boundary: whatever a command raises ends as one line ---------------------------------------

def _raiser(exc: BaseException):
    def command(argv):
        raise exc
    return command


@pytest.mark.parametrize("exc, match", [
    (OSError(errno.ENOSPC, "No space left on device", "/out/model.safetensors"), "/out/model.safetensors: no space"),
    (OSError(errno.EROFS, "Read-only file system", "/ro/x"), "/ro/x: read-only file system"),
    (PermissionError(errno.EACCES, "Permission denied", "/root/x"), "/root/x: permission denied"),
    (RecursionError("maximum recursion depth exceeded"), "nested too deeply"),
    (EOFError("Compressed file ended before the end-of-stream marker was reached"), "ends early"),
    (json.JSONDecodeError("Expecting value", "x", 0), "malformed JSON"),
    (MemoryError(), "out of memory"),
    (RuntimeError("expected scalar type Half but found Float"), "dtype mismatch"),
    (ZeroDivisionError("division by zero"), "PREFKIT_DEBUG=1"),
    (KeyError("oops"), "unexpected KeyError"),
])
def test_boundary_turns_library_exceptions_into_one_line(monkeypatch, capsys, exc, match):
    monkeypatch.delenv("PREFKIT_DEBUG", raising=False)
    monkeypatch.setitem(cli.COMMANDS, "train", (_raiser(exc), ""))
    assert_clean(*run(["train"], capsys), match)


def test_prefkit_debug_shows_the_traceback(monkeypatch, capsys):
    monkeypatch.setitem(cli.COMMANDS, "train", (_raiser(ZeroDivisionError("x")), ""))
    monkeypatch.setenv("PREFKIT_DEBUG", "1")
    with pytest.raises(ZeroDivisionError):
        main(["train"])
