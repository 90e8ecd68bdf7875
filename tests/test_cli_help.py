"""The command line a person meets first: --help / -h on every command, prefkit's option groups before
transformers', --version, no internal detail on a default run; TRL's names resolved alike on the command line
and in Python."""

from __future__ import annotations

import dataclasses
import logging
import os
import platform
import re
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest
from transformers import TrainingArguments

from prefkit.aliases import ALIASES, REFUSED, TRANSLATED
from prefkit.cli import COMMANDS, main
from prefkit.config import OPTION_GROUPS, TRAINER_GROUP, PrefConfig, option_groups, option_names
from prefkit.configfile import parse_config
from prefkit.errors import ConfigError
from tests.test_train_e2e import write_pairs

ROOT = Path(__file__).parents[1]


def _sections(help_text: str) -> dict[str, list[str]]:
    """Group heading → the options listed under it, in the order of the help."""
    sections: dict[str, list[str]] = {}
    current = None
    for line in help_text.splitlines():
        if line and not line.startswith(" ") and line.endswith(":"):
            current = sections.setdefault(line[:-1], [])
        elif current is not None and (m := re.match(r"  (-h, )?(--\w+)", line)):
            current.append(m.group(2))
    return sections


def _help(capsys, *argv: str) -> str:
    assert main(list(argv)) == 0
    return capsys.readouterr().out


@pytest.mark.parametrize("flag", ["-h", "--help"])
@pytest.mark.parametrize("command", list(COMMANDS))
def test_help_on_every_command_shows_its_own_options(capsys, command, flag):
    out = _help(capsys, command, flag)
    assert out.startswith(f"usage: prefkit {command} ")
    own = {"train": "--loss_type", "eval": "--output_file", "plot": "--out_dir", "critical-tokens": "--positive_model",
           "pairs": "--scorer", "bench": "--methods"}
    assert own[command] in out
    if command != "train":  # eval printed the training parser before
        assert "--loss_type" not in out and "--lr_scheduler_type" not in out


def test_top_level_help_lists_the_commands_and_version(capsys):
    out = _help(capsys, "--help")
    assert all(re.search(rf"^  {re.escape(name)} ", out, re.M) for name in COMMANDS)
    assert "--version" in out
    for flag in ("--version", "-V"):
        assert _help(capsys, flag).strip() == f"prefkit {version('prefkit')}"


def test_train_help_groups_prefkit_options_first_and_each_option_in_its_group(capsys):
    sections = _sections(_help(capsys, "train", "--help"))
    titles = [t for t in sections if t != "general"]
    assert titles == list(OPTION_GROUPS) and titles[0] == "objective / loss" and titles[-1] == TRAINER_GROUP
    groups = option_groups()
    inherited = {f.name for f in dataclasses.fields(TrainingArguments)}
    own = [name for name in option_names() if name not in inherited]
    assert len(own) > 80
    misplaced = [name for name in own if groups[name] == TRAINER_GROUP]
    assert not misplaced, f"prefkit options outside prefkit's groups: {misplaced}"
    for name in option_names():  # the parser prints each option under the group option_groups names, once
        assert [t for t, flags in sections.items() if f"--{name}" in flags] == [groups[name]], name
    assert all(sections[t] for t in OPTION_GROUPS)  # no group is left empty by a renamed field
    assert "learning_rate" not in own and groups["learning_rate"] == TRAINER_GROUP


def test_eval_help_leads_with_the_options_eval_reads(capsys):
    sections = _sections(_help(capsys, "eval", "-h"))
    assert list(sections)[0] == "eval" and "--output_file" in sections["eval"]
    assert {"--model_name_or_path", "--dataset_name", "--beta"} <= set(sections["eval"])
    assert "objective / loss" not in sections and TRAINER_GROUP not in sections


def test_help_wins_over_other_options_and_a_bad_config(capsys, tmp_path):
    out = _help(capsys, "train", "--config", str(tmp_path / "missing.yaml"), "--beta", "x", "-h")
    assert out.startswith("usage: prefkit train")


@pytest.mark.parametrize("argv", [["train", "--help"], ["--help"], ["--version"]])
def test_output_into_a_closed_pipe_ends_quietly(argv):
    """`prefkit train --help | head`: the reader is gone before prefkit writes, as when head has read its lines."""
    read, write = os.pipe()
    os.close(read)
    try:
        proc = subprocess.run([sys.executable, "-m", "prefkit", *argv], stdout=write, stderr=subprocess.PIPE,
                              env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)
    finally:
        os.close(write)
    assert proc.stderr.decode() == ""
    assert proc.returncode == 141


glibc = pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only")


@glibc
def test_malloc_tuning_is_logged_at_debug_level_and_log_level_debug_shows_it(monkeypatch, caplog, tmp_path):
    import prefkit.accel.malloc as allocator

    monkeypatch.setattr(allocator, "_done", False)
    monkeypatch.setattr(allocator.ctypes, "CDLL", lambda name: type("Libc", (), {"mallopt": lambda *a: 1})())
    monkeypatch.delenv("PREFKIT_MALLOC_TUNING", raising=False)
    with caplog.at_level(logging.INFO, logger="prefkit"):
        assert allocator.tune_cpu_malloc()
    assert not [r for r in caplog.records if "mmap threshold" in r.getMessage()]
    prefkit_logger = logging.getLogger("prefkit")
    level = prefkit_logger.level
    try:
        parse_config(["--output_dir", str(tmp_path), "--log_level", "debug"])
        assert prefkit_logger.getEffectiveLevel() == logging.DEBUG
    finally:
        prefkit_logger.setLevel(level)


@pytest.mark.slow
@pytest.mark.long  # the CLI end to end; the test above checks the same logging in-process
@glibc
def test_malloc_tuning_line_only_with_debug_logging(tmp_path, model_dir):
    data = write_pairs(tmp_path / "p.jsonl", 4)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    env.pop("PREFKIT_MALLOC_TUNING", None)
    argv = [sys.executable, "-m", "prefkit", "eval", "--model_name_or_path", str(model_dir), "--dataset_name",
            str(data), "--max_length", "32", "--output_file", str(tmp_path / "e.json")]
    default = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=300)
    assert default.returncode == 0, default.stderr
    assert "mmap threshold" not in default.stdout + default.stderr
    debug = subprocess.run(argv + ["--log_level", "debug"], capture_output=True, text=True, env=env, timeout=300)
    assert debug.returncode == 0 and "prefkit: glibc malloc: mmap threshold 32 MB" in debug.stderr


# TRL name → (the value given in Python, the same on the command line, the PrefConfig value it resolves to)
ALIAS_VALUES: dict[str, tuple[object, list[str], object]] = {
    "model_dtype": ("float32", ["float32"], "float32"),
    "dataset_train_split": ("tr", ["tr"], "tr"),
    "dataset_test_split": ("dev", ["dev"], "dev"),
    "test_split_size": (0.25, ["0.25"], 0.25),
    "padding_free": (True, ["true"], True),
    "gradient_checkpointing": (True, [], True),
    "gradient_checkpointing_kwargs": ({"use_reentrant": False}, ['{"use_reentrant": false}'], {"use_reentrant": False}),
    "warmup_ratio": (0.1, ["0.1"], 0.1),
}


def test_every_trl_alias_has_a_case_here():
    assert set(ALIAS_VALUES) == {a for a, t in {**ALIASES, **TRANSLATED}.items() if t not in REFUSED}


@pytest.mark.parametrize("alias", list(ALIAS_VALUES))
def test_alias_resolves_the_same_on_the_command_line_and_in_python(tmp_path, alias):
    target = ALIASES.get(alias) or TRANSLATED[alias]
    value, argv, expected = ALIAS_VALUES[alias]
    out = ["--output_dir", str(tmp_path)]
    py = PrefConfig(output_dir=str(tmp_path), **{alias: value})
    cli = parse_config(out + [f"--{alias}", *argv])
    assert getattr(py, target) == getattr(cli, target) == expected != getattr(PrefConfig(), target)
    assert py.to_dict() == PrefConfig(output_dir=str(tmp_path), **{target: expected}).to_dict()
    assert cli.to_dict() == py.to_dict()


def test_alias_and_its_target_with_different_values_are_refused_on_both_paths(tmp_path):
    with pytest.raises(ConfigError, match="padding_free is TRL's name of pack_pairs; give one of them"):
        PrefConfig(padding_free=True, pack_pairs=False)
    with pytest.raises(ConfigError, match="--padding_free true and --pack_pairs false: both set --pack_pairs"):
        parse_config(["--output_dir", str(tmp_path), "--padding_free", "--pack_pairs", "false"])
    assert PrefConfig(padding_free=True, pack_pairs=True).pack_pairs is True  # the same value twice is fine


def test_copies_of_a_config_keep_transformers_rule_for_its_deprecated_names():
    cfg = PrefConfig(gradient_checkpointing=True)
    assert cfg.activation_checkpointing is True and cfg.gradient_checkpointing is True
    copy = dataclasses.replace(cfg, activation_checkpointing=False)  # passes gradient_checkpointing=True too
    assert copy.activation_checkpointing is False and copy.gradient_checkpointing is False


def test_every_dpoconfig_field_name_is_accepted_by_prefconfig():
    trl = pytest.importorskip("trl")
    for f in dataclasses.fields(trl.DPOConfig):
        if f.init:  # at TRL's default every option is either understood or off
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            PrefConfig(**{"output_dir": "/tmp/prefkit-unused", f.name: default})


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_refused_trl_option_in_python_is_a_value_error_naming_it(name):
    with pytest.raises(ValueError, match=rf"^{name}=True: not supported by prefkit; {re.escape(REFUSED[name].reason)}"):
        PrefConfig(**{name: True})
    with pytest.raises(ConfigError, match=rf"--{name} true: not supported by prefkit"):
        parse_config(["--output_dir", "/tmp/prefkit-unused", f"--{name}", "true"])


def test_streaming_alias_is_refused_in_python_as_on_the_command_line():
    with pytest.raises(ValueError, match="dataset_streaming=True: not supported"):
        PrefConfig(streaming=True)
    assert PrefConfig(streaming=False).output_dir  # off: nothing to do
