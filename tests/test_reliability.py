"""Process faults: `kill -9` of a real training process, then `--resume_from_checkpoint latest`, reproduces the
uninterrupted run's loss curve; runs work with HF_HUB_OFFLINE=1."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.test_train_e2e import write_pairs

pytestmark = pytest.mark.slow  # real training subprocesses


def _cmd(model_dir: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "prefkit", "train", "--model_name_or_path", str(model_dir), "--dataset_name",
            str(data), "--output_dir", str(out), "--max_steps", "40", "--per_device_train_batch_size", "2",
            "--logging_steps", "1", "--save_steps", "5", "--learning_rate", "3e-3", "--max_length", "64",
            "--seed", "5", "--reward_calibration", "true", "--dynamics_steps", "3", *extra]


ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def _losses(out: Path) -> dict[int, float]:
    recs = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    return {r["step"]: r["loss"] for r in recs if "loss" in r}


def test_kill_9_then_resume_latest_reproduces_the_run(tmp_path, model_dir):
    data = write_pairs(tmp_path / "p.jsonl", 60)
    ref = tmp_path / "uninterrupted"
    subprocess.run(_cmd(model_dir, data, ref), check=True, capture_output=True, env=ENV, timeout=600)

    out = tmp_path / "killed"
    proc = subprocess.Popen(_cmd(model_dir, data, out), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV)
    deadline = time.time() + 300
    while not list(out.glob("checkpoint-1[05]")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the kill missed the window: the run ended before it (make it longer)"
    kept = _losses(out)
    assert kept and max(kept) < 40  # a partial run: the resume below really has steps left to do
    subprocess.run(_cmd(model_dir, data, out, "--resume_from_checkpoint", "latest"), check=True, capture_output=True,
                   env=ENV, timeout=600)
    recs = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    steps = [r["step"] for r in recs if "loss" in r]
    assert steps == list(range(1, 41))  # steps past the checkpoint were dropped: none appears twice
    full, resumed = _losses(ref), _losses(out)
    assert sorted(full) == list(range(1, 41))
    for step in full:
        assert resumed[step] == pytest.approx(full[step], rel=1e-5, abs=1e-7), step


def test_offline_run_with_hub_disabled(tmp_path, model_dir):
    data = write_pairs(tmp_path / "p.jsonl", 8)
    proc = subprocess.run(_cmd(model_dir, data, tmp_path / "o", "--max_steps", "1"), capture_output=True, text=True,
                          env=ENV, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
