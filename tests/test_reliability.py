"""Process faults: `kill -9` of a real training process, then `--resume_from_checkpoint latest`, reproduces the
uninterrupted run's loss curve and weights (once, and in a loop of kills at random moments across checkpoint
writes); runs work with HF_HUB_OFFLINE=1."""

from __future__ import annotations

import json
import multiprocessing
import os
import random
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


@pytest.mark.long  # the kill -9 loop below covers recovery in make test
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


# ---- a loop of kills at random moments across checkpoint writes ----------------------------------------------

LOOP_STEPS = 40


def _cli_child(argv: list[str], log: str) -> None:
    """One `prefkit` command in a child of the fork server (prefkit already imported there), output to ``log``."""
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    import torch

    from prefkit.cli import main

    torch.set_num_threads(1)
    sys.exit(main(argv))


def _loop_cmd(model_dir: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--model_name_or_path", str(model_dir), "--dataset_name", str(data), "--output_dir", str(out),
            "--max_steps", str(LOOP_STEPS), "--per_device_train_batch_size", "2", "--logging_steps", "1",
            "--save_steps", "1", "--learning_rate", "3e-3", "--max_length", "64", "--seed", "5", "--report_to",
            "none", *extra]


def _complete(out: Path) -> dict[int, Path]:
    """The checkpoints whose save finished (their completion marker is there), by step."""
    found = {}
    for p in out.glob("checkpoint-*"):
        if (p / "prefkit_checkpoint_complete").is_file():
            found[int(p.name.split("-")[1])] = p
    return found


def _logged_steps(out: Path) -> list[int]:
    from prefkit.files import read_jsonl_tolerant

    if not (out / "metrics.jsonl").is_file():
        return []
    return [r["step"] for r in read_jsonl_tolerant(out / "metrics.jsonl")[0] if "loss" in r]


def _inode(path: Path) -> int | None:
    try:
        return path.stat().st_ino
    except FileNotFoundError:
        return None


def _new_step_logged(out: Path, before: int | None, last: int) -> bool:
    """Whether the run started when metrics.jsonl had inode ``before`` has logged a step past ``last``."""
    inode = _inode(out / "metrics.jsonl")
    if inode is None or inode == before:
        return False
    try:
        return any(s > last for s in _logged_steps(out))
    except Exception:  # caught mid-rewrite: look again
        return False


def _weights(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path))


def test_kill_9_loop_resumes_to_the_uninterrupted_run(tmp_path, model_dir, monkeypatch):
    """Ten kills, each a random 0-120 ms after a new checkpoint's folder appears (so inside its write, or in the
    step after it), plus two while a resumed run starts up; each followed by `--resume_from_checkpoint latest`.
    A kill inside the last step's save or the final model save is not part of it (docs/reliability.md)."""
    for k, v in {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}.items():
        monkeypatch.setenv(k, v)  # read by the fork server when it starts
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["prefkit.cli", "prefkit.run", "tests.test_reliability"])
    data = write_pairs(tmp_path / "p.jsonl", 60)
    logs = tmp_path / "logs"
    logs.mkdir()

    def start(argv: list[str], name: str):
        proc = ctx.Process(target=_cli_child, args=(argv, str(logs / name)))
        proc.start()
        return proc

    ref = tmp_path / "uninterrupted"
    proc = start(_loop_cmd(model_dir, data, ref), "ref.log")
    proc.join(300)
    assert proc.exitcode == 0, (logs / "ref.log").read_text()[-3000:]

    rng = random.Random(34)
    out = tmp_path / "killed"
    seen: dict[Path, tuple[int, int]] = {}  # a complete checkpoint's weights file: (inode, mtime), never rewritten
    kills, last = [], 0
    plan = ["save"] * 10 + ["startup"] * 2
    rng.shuffle(plan)
    plan.insert(0, plan.pop(plan.index("save")))  # the first run must leave a checkpoint to resume from
    for i, when in enumerate(plan):
        argv = _loop_cmd(model_dir, data, out, *(["--resume_from_checkpoint", "latest"] if i else []))
        before = _inode(out / "metrics.jsonl")  # a resumed run rewrites the file (steps past its checkpoint go)
        proc = start(argv, f"run-{i}.log")
        deadline = time.time() + 120
        if when == "startup":
            time.sleep(rng.uniform(0.0, 1.5))
        else:  # wait for this run's log of step last + 1: the save of its checkpoint follows at once
            while time.time() < deadline and proc.is_alive() and not _new_step_logged(out, before, last):
                time.sleep(0.002)
            # the first run is killed only once its checkpoint is complete: under load (a second test worker on
            # the same cores) its write can take longer than the random delay
            while i == 0 and time.time() < deadline and proc.is_alive() and not _complete(out):
                time.sleep(0.002)
            time.sleep(rng.uniform(0.0, 0.12))
        assert proc.is_alive(), f"run {i} ended before its kill: " + (logs / f"run-{i}.log").read_text()[-3000:]
        os.kill(proc.pid, signal.SIGKILL)
        proc.join(60)
        assert proc.exitcode == -signal.SIGKILL
        complete = _complete(out)
        latest = max(complete, default=0)
        kills.append((when, latest))
        assert latest >= last, "a complete checkpoint went missing"
        assert latest < LOOP_STEPS - 1, "the loop reached the run's last steps: make the run longer"
        steps = _logged_steps(out)
        assert steps == list(range(1, len(steps) + 1)) and len(steps) >= latest, steps  # each step once, in order
        for ckpt in complete.values():
            st = (ckpt / "model.safetensors").stat()
            assert seen.setdefault(ckpt, (st.st_ino, st.st_mtime_ns)) == (st.st_ino, st.st_mtime_ns), \
                f"{ckpt.name} was written again: a restart or a repeated step"
        last = latest
    assert len(kills) >= 10 and last > 1, kills

    proc = start(_loop_cmd(model_dir, data, out, "--resume_from_checkpoint", "latest"), "final.log")
    proc.join(300)
    assert proc.exitcode == 0, (logs / "final.log").read_text()[-3000:]
    for log in logs.iterdir():
        assert "Traceback" not in log.read_text() and "prefkit: error:" not in log.read_text(), log.name
    assert _logged_steps(out) == list(range(1, LOOP_STEPS + 1))
    full, resumed = _losses(ref), _losses(out)
    for step in full:
        assert resumed[step] == pytest.approx(full[step], rel=1e-6, abs=1e-8), step
    assert max(_complete(out)) == LOOP_STEPS and not (out / f"checkpoint-{LOOP_STEPS + 1}").exists()
    want, got = _weights(ref / "model.safetensors"), _weights(out / "model.safetensors")
    assert want.keys() == got.keys()
    for name in want:
        assert __import__("torch").allclose(got[name], want[name], rtol=1e-6, atol=1e-8), name
