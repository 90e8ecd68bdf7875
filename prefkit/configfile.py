"""Options of a run from the command line and YAML files: ``--config run.yaml`` supplies a base, command-line
options override it, and the host-performance layer (:mod:`prefkit.accel`) fills the options left unset.

Every command (`prefkit train | eval | critical-tokens | pairs | bench`) builds its
:class:`~prefkit.config.PrefConfig` here; a library user builds one directly and gets no host defaults.
"""

from __future__ import annotations

import difflib
import json
from pathlib import Path

import yaml

from prefkit.errors import ConfigError, one_line

# `prefkit train` with no model and no data runs the embedded default: SmolLM2-135M-Instruct + LoRA on the
# bundled HH-RLHF sample, sized to finish in about 10 minutes on 2 CPU cores.
DEMO_DEFAULTS: dict[str, object] = {
    "output_dir": "outputs/demo",
    "overwrite_output_dir": True,
    "use_peft": True,
    "learning_rate": 3e-4,
    "lr_scheduler_type": "constant",
    "per_device_train_batch_size": 4,
    "per_device_eval_batch_size": 8,
    "max_steps": 32,
    "max_length": 256,
    "max_prompt_length": 128,
    "eval_split_size": 64,
    "logging_steps": 4,
    "save_steps": 16,
    "dynamics_steps": 8,
}


def _option_token(tok: str) -> str | None:
    if tok.startswith("--") and len(tok) > 2:
        return tok[2:].split("=", 1)[0]
    return None


def options_to_argv(data: dict) -> list[str]:
    """``{option: value}`` → ``["--option", "value", …]`` (lists become several values, None is dropped)."""
    argv: list[str] = []
    for key, value in data.items():
        if value is None:
            continue
        argv.append(f"--{key}")
        if isinstance(value, list):
            argv.extend(str(v) for v in value)
        elif isinstance(value, dict):  # TrainingArguments reads its dict options from JSON text
            argv.append(json.dumps(value))
        elif isinstance(value, bool):
            argv.append("true" if value else "false")
        else:
            argv.append(str(value))
    return argv


def read_yaml_mapping(path: str, label: str) -> dict:
    """A YAML file holding a mapping; ConfigError naming ``label`` and the file otherwise."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{label}: {path} does not exist")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{label}: {path} is not valid YAML ({e})") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{label}: {path} must hold a mapping of key: value")
    return data


def _yaml_to_argv(path: str) -> list[str]:
    from prefkit.trl_compat import yaml_env

    return options_to_argv(yaml_env(read_yaml_mapping(path, "--config")))


def _check_known(argv: list[str], known: list[str], where: str) -> None:
    for tok in argv:
        name = _option_token(tok)
        if name is not None and name not in known:
            close = difflib.get_close_matches(name, known, n=1)
            hint = f"; did you mean --{close[0]}?" if close else ""
            raise ConfigError(f"unknown option --{name}{where}{hint}")


def _split_config(argv: list[str]) -> tuple[list[str], list[str]]:
    """(options from the ``--config`` YAML, the command-line options without ``--config FILE``), both in
    prefkit's spelling."""
    from prefkit.trl_compat import normalize_argv

    argv = list(argv)
    base: list[str] = []
    for i, tok in enumerate(argv):
        if tok == "--config" or tok.startswith("--config="):
            path = tok.partition("=")[2] or (argv[i + 1] if i + 1 < len(argv) else None)
            if not path:
                raise ConfigError("--config needs a YAML file")
            base = normalize_argv(_yaml_to_argv(path))
            del argv[i : i + (1 if "=" in tok else 2)]
            break
    return base, normalize_argv(argv)


def given_options(argv: list[str]) -> set[str]:
    """The option names a user set, on the command line or in the ``--config`` file."""
    base, argv = _split_config(argv)
    return {name for name in map(_option_token, base + argv) if name is not None}


def parse_config(argv: list[str], *, demo: bool = False):
    """PrefConfig from a YAML base (``--config``) and command-line overrides; demo preset under both; the
    host layer's defaults (:func:`prefkit.accel.host_defaults`) for the options that are still unset."""
    from transformers import HfArgumentParser

    from prefkit.accel import host_defaults
    from prefkit.config import PrefConfig, option_names

    class Parser(HfArgumentParser):
        def error(self, message: str):  # argparse would print its usage and exit
            raise ConfigError(message)

    base, argv = _split_config(argv)
    known = option_names()
    _check_known(base, known, " in the --config file")
    _check_known(argv, known, "")
    given = {_option_token(t) for t in base + argv} - {None}
    preset: list[str] = []
    if demo and not ({"model_name_or_path", "dataset_name"} & given):
        for key, value in DEMO_DEFAULTS.items():
            if key not in given:
                preset += [f"--{key}", str(value).lower() if isinstance(value, bool) else str(value)]
    namespace, unused = Parser(PrefConfig).parse_known_args(args=preset + base + argv)
    if unused:
        raise ConfigError(f"arguments not understood: {' '.join(unused)}")
    values = {k: v for k, v in vars(namespace).items() if k in known}
    values.update(host_defaults(values))
    try:
        return PrefConfig(**values)
    except (ValueError, TypeError, ImportError) as e:  # TrainingArguments' own checks
        raise ConfigError(one_line(e)) from e
