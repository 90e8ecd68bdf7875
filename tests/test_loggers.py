"""--report_to: installed loggers receive the metrics; a missing one is one line naming the pip install."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from prefkit.cli import main
from tests.test_train_e2e import write_pairs


def _args(model_dir: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--model_name_or_path", str(model_dir), "--dataset_name", str(data), "--output_dir", str(out),
            "--max_steps", "2", "--per_device_train_batch_size", "2", "--logging_steps", "1", "--max_length", "32",
            "--learning_rate", "1e-3", *extra]


@pytest.mark.skipif(importlib.util.find_spec("tensorboard") is None, reason="tensorboard is not installed")
@pytest.mark.slow
def test_tensorboard_event_file_has_the_loss(tmp_path, model_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    data = write_pairs(tmp_path / "p.jsonl", 8)
    out = tmp_path / "run"
    assert main(_args(model_dir, data, out, "--report_to", "tensorboard")) == 0
    events = list(out.rglob("events.out.tfevents.*"))
    assert events
    acc = EventAccumulator(str(events[0].parent))
    acc.Reload()
    assert {"train/loss", "train/rewards/margins"} <= set(acc.Tags()["scalars"])
    assert [e.step for e in acc.Scalars("train/loss")] == [1, 2]


@pytest.mark.skipif(importlib.util.find_spec("wandb") is None, reason="wandb is not installed (pip install wandb)")
def test_wandb_offline(tmp_path, model_dir, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    data = write_pairs(tmp_path / "p.jsonl", 8)
    assert main(_args(model_dir, data, tmp_path / "run", "--report_to", "wandb")) == 0
    assert list(tmp_path.rglob("offline-run-*"))


@pytest.mark.parametrize("logger", ["wandb", "trackio", "mlflow", "tensorboard"])
def test_missing_logger_is_one_line_naming_the_install(tmp_path, capsys, logger):
    if importlib.util.find_spec(logger) is not None:
        pytest.skip(f"{logger} is installed")
    assert main(["train", "--report_to", logger, "--dataset_name", "x", "--output_dir", str(tmp_path / "o")]) == 2
    assert capsys.readouterr().err == f"prefkit: error: --report_to: {logger} is not installed: pip install {logger}\n"
