"""The GPU smoke test's dry run: benchmarks/gpu/smoke.sh at tiny sizes on the CPU, end to end, as a user runs it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CHECKS = ["bf16_step", "layouts", "adpo", "poet", "rc", "vs_trl_tiny", "pairs"]


def _smoke(*args: str, python: str = sys.executable) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHON": python, "OMP_NUM_THREADS": "1"}
    return subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu" / "smoke.sh"), *args], capture_output=True,
                          text=True, env=env, cwd=ROOT, timeout=600)


@pytest.mark.slow  # ~15 s: seven short training and sampling runs, TRL's among them
def test_the_smoke_scripts_dry_run_passes_every_check_and_writes_its_summary(tmp_path):
    out = tmp_path / "smoke.json"
    proc = _smoke("--dry-run", "--out", str(out))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = [ln for ln in proc.stdout.splitlines() if ln.split(" ", 1)[0] in ("PASS", "WARN", "FAIL")]
    assert [ln.split(" ", 2)[1].rstrip(":") for ln in lines] == CHECKS
    assert all(ln.startswith("PASS ") for ln in lines), lines
    summary = json.loads(out.read_text())
    assert summary["dry_run"] is True and summary["counts"] == {"PASS": len(CHECKS), "WARN": 0, "FAIL": 0}
    checks = {c["name"]: c for c in summary["checks"]}
    assert list(checks) == CHECKS
    assert max(d["logps"] for d in checks["layouts"]["diffs"].values()) <= 1e-4
    assert set(checks["layouts"]["diffs"]) == {"shared", "packed/loop", "packed/pairs", "packed/row"}
    assert [len(checks["vs_trl_tiny"]["runs"][f]) for f in ("trl", "prefkit")] == [2, 2]
    assert checks["pairs"]["summary"]["samples"] == 32


def test_the_smoke_script_refuses_a_missing_gpu_and_a_missing_package_in_one_line(tmp_path):
    import torch

    if not torch.cuda.is_available():
        proc = _smoke("--out", str(tmp_path / "x.json"))
        assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
            "prefkit: error: --device cuda: torch sees no CUDA GPU (torch.cuda.is_available() is False); run on a "
            "GPU machine with a CUDA build of torch, or pass --dry-run"]
    # an interpreter without the packages (the system one, not the project's environment, or none at all)
    bare = tmp_path / "python"
    bare.write_text(f"#!/bin/sh\nexec {sys.executable} -S -I \"$@\"\n")
    bare.chmod(0o755)
    proc = _smoke("--dry-run", python=str(bare))
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
    assert proc.stderr.startswith(f"prefkit: error: {bare} lacks torch transformers peft accelerate datasets trl")
    assert not (tmp_path / "x.json").exists()
