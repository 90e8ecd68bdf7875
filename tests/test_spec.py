"""The run spec: options declared once (the objective and dynamics specs are PrefConfig's options), checked once
per run, and a PrefConfig built in Python that probes nothing."""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path

import pytest
import torch

import prefkit.spec
from prefkit.cli import main
from prefkit.config import PrefConfig, option_groups
from prefkit.dynamics.spec import DynamicsSpec
from prefkit.errors import ConfigError
from prefkit.objectives.spec import ObjectiveSpec
from prefkit.spec import resolve_run
from tests.test_online import PROMPTS, _args
from tests.test_train_e2e import write_pairs

VALIDATORS = ("validate_config", "validate_objective", "validate_dynamics", "validate_data")


@pytest.mark.parametrize("spec", [ObjectiveSpec, DynamicsSpec])
def test_a_spec_field_is_a_pref_config_option_with_its_default_and_help(spec):
    options = {f.name: f for f in dataclasses.fields(PrefConfig)}
    hints = typing.get_type_hints(PrefConfig)
    for f in dataclasses.fields(spec):
        option = options[f.name]
        default = option.default_factory() if option.default_factory is not dataclasses.MISSING else option.default
        assert default == (list(f.default) if isinstance(f.default, tuple) else f.default), f.name
        assert option.metadata["help"] == f.metadata["help"] and f.metadata["help"], f.name
        assert "tuple" not in str(hints[f.name]), f.name  # the command line gives lists
    assert spec.from_config(PrefConfig(output_dir="x")) == spec()  # the defaults are the spec's


def test_spliced_options_land_in_their_help_groups():
    groups = option_groups()
    assert (groups["beta"], groups["discopop_tau"], groups["granularity"], groups["use_token_weights"],
            groups["poet"], groups["sync_ref_model"], groups["rc_norm_steps"]) == (
        "objective / loss", "objective / loss", "granularity (ADPO)", "granularity (ADPO)", "POET",
        "reference updates (TR-DPO)", "dynamics / reward calibration")


def test_a_pref_config_built_in_python_adds_no_hardware_probe(monkeypatch, tmp_path):
    """TrainingArguments' own __post_init__ sets up its device; PrefConfig's adds no probe to that."""
    from transformers import TrainingArguments

    real, calls = torch.cuda.is_available, []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: calls.append(1) or real())
    TrainingArguments(output_dir=str(tmp_path))
    plain = len(calls)
    cfg = PrefConfig(output_dir=str(tmp_path), loss_type="sigmoid,sft", beta=0.2)
    assert len(calls) - plain == plain
    assert cfg.loss_type == ["sigmoid", "sft"] and cfg.dataloader_pin_memory  # the resolution decides pinning


def test_resolution_turns_pinning_off_without_an_accelerator(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cfg = PrefConfig(output_dir="x")
    resolve_run(cfg)
    assert cfg.dataloader_pin_memory is False


@pytest.fixture
def counted(monkeypatch) -> dict[str, int]:
    """How often each validator of the run spec is called."""
    calls = dict.fromkeys(VALIDATORS, 0)
    for name in VALIDATORS:
        def counting(*args, _name=name, _real=getattr(prefkit.spec, name)):
            calls[_name] += 1
            return _real(*args)

        monkeypatch.setattr(prefkit.spec, name, counting)
    return calls


@pytest.mark.slow
def test_a_training_run_validates_its_options_once(tmp_path: Path, model_dir: Path, counted):
    data = write_pairs(tmp_path / "pairs.jsonl", 12)
    argv = ["train", "--model_name_or_path", str(model_dir), "--dataset_name", str(data), "--output_dir",
            str(tmp_path / "run"), "--max_steps", "2", "--per_device_train_batch_size", "4", "--eval_split_size", "4",
            "--eval_strategy", "steps", "--eval_steps", "1", "--max_length", "64", "--report_to", "none",
            "--reward_calibration", "true", "--dynamics_steps", "1"]
    assert main(argv) == 0
    assert counted == dict.fromkeys(VALIDATORS, 1)


@pytest.mark.slow
def test_a_run_of_rounds_validates_its_options_once(tmp_jsonl, tmp_path: Path, model_dir: Path, counted):
    (tmp_path / "round_scorers.py").write_text("def length(prompt, completion, row):\n    return float(len(completion))\n")
    import sys

    sys.path.insert(0, str(tmp_path))
    try:
        prompts = tmp_jsonl(PROMPTS, "prompts.jsonl")
        assert main(_args(model_dir, prompts, tmp_path / "run", "python:round_scorers:length", 2)) == 0
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("round_scorers", None)
    assert counted == dict.fromkeys(VALIDATORS, 1)


@pytest.mark.parametrize("option, value", [("samples_per_round", 8), ("online_temperature", 0.5),
                                           ("online_pairing", "all")])
def test_a_semi_online_option_without_rounds_is_refused(tmp_path: Path, option, value):
    from prefkit.online import check_no_online_options

    with pytest.raises(ConfigError, match=f"--{option}: has no effect without --rounds"):
        check_no_online_options(PrefConfig(output_dir=str(tmp_path), **{option: value}))
