"""Options of a run from the command line and YAML files: ``--config run.yaml`` supplies a base, command-line
options override it, and the host-performance layer (:mod:`prefkit.accel`) fills the options left unset.

Every command (`prefkit train | eval | critical-tokens | pairs | bench`) builds its
:class:`~prefkit.config.PrefConfig` here; a library user builds one directly and gets no host defaults.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import functools
import json
import logging
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, get_type_hints

import yaml

from prefkit.errors import ConfigError, one_line

if TYPE_CHECKING:
    from prefkit.config import PrefConfig

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


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """One spelling per option (HfArgumentParser also registers --hyphen-ated ones and, for a flag that defaults
    to true, a --no_<flag> twin), a boolean's value as [true|false]."""

    def _format_action_invocation(self, action: argparse.Action) -> str:
        if not action.option_strings:
            return super()._format_action_invocation(action)
        flag = action.option_strings[-1] if action.option_strings[0] == "-h" else action.option_strings[0]
        if action.nargs == 0:
            return "-h, --help" if action.option_strings[0] == "-h" else flag
        if getattr(action.type, "__name__", "") == "string_to_bool":
            return f"{flag} [true|false]"
        return f"{flag} {self._format_args(action, self._get_default_metavar_for_optional(action))}"

    def add_argument(self, action: argparse.Action) -> None:
        if isinstance(action, argparse._StoreFalseAction) and action.option_strings[0].startswith("--no"):
            return  # the twin of a flag shown already: --no_<flag> is the same as --<flag> false
        super().add_argument(action)

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default is None or action.default is argparse.SUPPRESS or "%(default)" in text or action.nargs == 0:
            return text
        return f"{text} (default: %(default)s)"


@functools.cache
def _option_parser_class() -> type:
    from transformers import HfArgumentParser  # here, so that `prefkit --help` does not import transformers

    class OptionParser(HfArgumentParser):
        def __init__(self, *, groups: Collection[str] | None = None,
                     lead: tuple[str, Collection[str]] | None = None, **kwargs) -> None:
            from prefkit.config import PrefConfig

            self._groups, self._lead = groups, lead  # read by _add_dataclass_arguments, which super() calls
            super().__init__(PrefConfig, add_help=False, formatter_class=_HelpFormatter, **kwargs)

        def error(self, message: str):  # argparse would print its usage and exit
            raise ConfigError(message)

        def _add_dataclass_arguments(self, dtype) -> None:
            from prefkit.config import OPTION_GROUPS, option_groups

            hints = get_type_hints(dtype)
            lead_title, lead_names = self._lead or ("", ())
            self.lead_group = self.add_argument_group(lead_title) if self._lead else None
            targets = {lead_title: self.lead_group} if self._lead else {}
            for title in OPTION_GROUPS:
                if self._groups is None or title in self._groups:
                    targets[title] = self.add_argument_group(title)
            groups = option_groups()
            fields = {f.name: f for f in dataclasses.fields(dtype) if f.init}
            for name in [*lead_names, *(n for n in fields if n not in lead_names)]:  # the lead in its order
                target = targets.get(lead_title if name in lead_names else groups.get(name, ""))
                if target is not None:
                    fields[name].type = hints[name]
                    self._parse_dataclass_field(target, fields[name])

    return OptionParser


def option_parser(*, groups: Collection[str] | None = None, lead: tuple[str, Collection[str]] | None = None,
                  **kwargs) -> argparse.ArgumentParser:
    """HfArgumentParser over PrefConfig with the options in the named groups of
    :func:`prefkit.config.option_groups` (prefkit's first, transformers' last), so that the parser that reads a
    command line is the one whose help is printed. ``groups``: only the options of these groups (default all);
    ``lead``: a group of options shown first (``(title, option names)``), taken out of their own groups;
    ``kwargs`` go to ArgumentParser."""
    from prefkit.config import OPTION_GROUPS

    unknown = set(groups or ()) - set(OPTION_GROUPS)
    if unknown:  # a renamed group would otherwise silently drop its options from a command's help
        raise ValueError(f"no option group {', '.join(sorted(unknown))}; the groups are {', '.join(OPTION_GROUPS)}")
    return _option_parser_class()(groups=groups, lead=lead, **kwargs)


def options_help(prog: str, description: str, *, groups: Collection[str] | None = None,
                 lead: tuple[str, Collection[str]] | None = None, own: Collection[tuple[str, str]] = ()) -> str:
    """The help of a command whose options are PrefConfig's: the ``lead`` group first (with ``own``, ``(flag,
    help)`` pairs of the command's options outside PrefConfig), then :func:`option_parser`'s groups, ``-h`` and
    ``--config``, then the TRL spellings accepted."""
    from prefkit.aliases import ALIASES, REFUSED, TRANSLATED

    spellings = [f"--{a} (= --{t})" for a, t in ALIASES.items() if t not in REFUSED]
    spellings += [f"--{a} (= --{t}, a share below 1)" for a, t in TRANSLATED.items()]
    p = option_parser(prog=prog, usage=f"{prog} [--config run.yaml] [--option value ...]", description=description,
                      groups=groups, lead=lead, epilog=(
                          "TRL's spellings are accepted too: " + ", ".join(spellings)
                          + "; --flag=value, --hyphen-ated names, a bare --flag (true) and --no_flag (false), as "
                          "`trl dpo` reads them. docs/trl.md lists the TRL options prefkit refuses and why."))
    for flag, text in own:
        p.lead_group.add_argument(flag, help=text)
    general = p.add_argument_group("general")
    general.add_argument("-h", "--help", action="store_true", help="show this help and exit")
    general.add_argument("--config", metavar="run.yaml", help="a YAML file of options; the command line's override it")
    return p.format_help()


def wants_help(argv: list[str]) -> bool:
    """``-h`` or ``--help`` anywhere in ``argv``: the help wins over every other option, valid or not."""
    return any(tok in ("-h", "--help") for tok in argv)


def parse_config(argv: list[str], *, demo: bool = False):
    """PrefConfig from a YAML base (``--config``) and command-line overrides; demo preset under both; the
    host layer's defaults (:func:`prefkit.accel.host_defaults`) for the options that are still unset.
    ``--log_level debug`` also shows prefkit's debug lines."""
    from prefkit.config import option_names

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
    namespace, unused = option_parser().parse_known_args(args=preset + base + argv)
    if unused:
        raise ConfigError(f"arguments not understood: {' '.join(unused)}")
    return _host_config({k: v for k, v in vars(namespace).items() if k in known})


def config_from_options(options: Mapping[str, Any]) -> PrefConfig:
    """PrefConfig from ``{option: value}`` (prefkit's option names, values as Python or YAML give them: text is
    read as the command line reads it, so ``"1e-5"`` is a float) with the host layer's defaults for the options
    left unset, as the command line builds it. What a program that runs prefkit (the bench) calls instead of
    writing a command line."""
    from prefkit.config import option_names

    known = option_names()
    _check_known([f"--{k}" for k in options], known, "")
    parser = option_parser()
    actions = {a.dest: a for a in parser._actions}
    values = {k: v for k, v in vars(parser.parse_args([])).items() if k in known}  # the command line's defaults
    values.update((k, _option_value(actions[k], v)) for k, v in options.items() if v is not None)
    return _host_config(values)


def _option_value(action: argparse.Action, value: Any) -> Any:
    """``value`` converted and checked as the parser converts and checks the text of option ``action``."""
    def convert(v: Any) -> Any:
        if not isinstance(v, str) or action.type is None:
            return v
        try:
            return action.type(v)
        except (TypeError, ValueError, argparse.ArgumentTypeError) as e:
            raise ConfigError(f"--{action.dest}: {v!r} is not a valid value ({one_line(e)})") from e

    value = [convert(v) for v in value] if isinstance(value, (list, tuple)) else convert(value)
    if action.choices is not None and not isinstance(value, list) and value not in action.choices:
        raise ConfigError(f"--{action.dest}: {value!r} is not one of {', '.join(map(str, action.choices))}")
    return value


def _host_config(values: dict[str, Any]) -> PrefConfig:
    from prefkit.accel import host_defaults
    from prefkit.config import PrefConfig

    values.update(host_defaults(values))
    try:
        cfg = PrefConfig(**values)
    except (ValueError, TypeError, ImportError) as e:  # TrainingArguments' own checks
        raise ConfigError(one_line(e)) from e
    if cfg.log_level == "debug":  # prefkit's internal detail (host tuning, …) is logged at debug level
        logging.getLogger("prefkit").setLevel(logging.DEBUG)
    return cfg
