"""Command line: `prefkit train | eval | plot | critical-tokens | pairs | bench`.

Options are PrefConfig fields (TrainingArguments / DPOConfig names); ``--config run.yaml`` supplies a base
and command-line options override it. Errors print one line and exit non-zero; ``--debug`` shows tracebacks.
"""

from __future__ import annotations

import argparse
import difflib
import json
import logging
import sys
from pathlib import Path

import yaml

from prefkit.errors import ConfigError, PrefkitError, one_line

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
    """PrefConfig from a YAML base (``--config``) and command-line overrides; demo preset under both."""
    from transformers import HfArgumentParser

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
    parser = Parser(PrefConfig)
    try:
        (cfg,) = parser.parse_args_into_dataclasses(args=preset + base + argv)
    except (ValueError, TypeError, ImportError) as e:  # TrainingArguments' own checks
        raise ConfigError(one_line(e)) from e
    return cfg


def _cmd_train(argv: list[str]) -> int:
    from prefkit.run import train_main

    train_main(parse_config(argv, demo=True))
    return 0


def _cmd_eval(argv: list[str]) -> int:
    from prefkit.run import eval_main

    output_file = _pop_option(argv, "output_file")
    cfg = parse_config(argv + ([] if "--output_dir" in argv else ["--output_dir", "outputs/eval"]))
    print(json.dumps(eval_main(cfg, output_file, given=given_options(argv)), indent=2))
    return 0


def _cmd_plot(argv: list[str]) -> int:
    from prefkit.plot import plot_runs

    p = argparse.ArgumentParser(prog="prefkit plot", description="Plot metrics of one or more runs.")
    p.add_argument("run_dirs", nargs="+")
    p.add_argument("--out_dir", default=None, help="default: <first run>/plots")
    args = p.parse_args(argv)
    for path in plot_runs(args.run_dirs, args.out_dir or str(Path(args.run_dirs[0]) / "plots")):
        print(path)
    return 0


def _cmd_critical_tokens(argv: list[str]) -> int:
    from prefkit.critical_tokens_cli import critical_tokens_main

    return critical_tokens_main(argv)


def _pop_option(argv: list[str], name: str) -> str | None:
    flag = f"--{name}"
    if flag in argv:
        i = argv.index(flag)
        value = argv[i + 1] if i + 1 < len(argv) else None
        del argv[i : i + 2]
        return value
    return None


def _cmd_pairs(argv: list[str]) -> int:
    from prefkit.pairs.cli import pairs_main

    return pairs_main(argv)


def _cmd_bench(argv: list[str]) -> int:
    from prefkit.bench.cli import bench_main

    return bench_main(argv)


COMMANDS = {
    "train": (_cmd_train, "train a model on preference pairs (no arguments: the embedded demo)"),
    "eval": (_cmd_eval, "preference metrics of a trained model on a dataset, as JSON"),
    "plot": (_cmd_plot, "plot metrics.jsonl of one or more runs"),
    "critical-tokens": (_cmd_critical_tokens, "cADPO token weights from a positive and a negative model"),
    "pairs": (_cmd_pairs, "sample completions, score them (checker, reward model, your code) and write pairs"),
    "bench": (_cmd_bench, "train a grid of methods x seeds on one task and write a comparison report"),
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or "--debug_traceback" in argv
    argv = [a for a in argv if a != "--debug"]
    logging.basicConfig(level=logging.INFO, format="prefkit: %(message)s", stream=sys.stderr)
    from prefkit.quiet import quiet_known_noise

    quiet_known_noise()
    for noisy in ("transformers", "datasets", "accelerate", "peft", "httpx", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: prefkit {" + ",".join(COMMANDS) + "} [options]\n")
        for name, (_, help_text) in COMMANDS.items():
            print(f"  {name:<16} {help_text}")
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        close = difflib.get_close_matches(command, list(COMMANDS), n=1)
        print(f"prefkit: error: unknown command {command!r}" + (f"; did you mean {close[0]!r}?" if close else ""),
              file=sys.stderr)
        return 2
    try:
        return COMMANDS[command][0](rest)
    except PrefkitError as e:
        if debug:
            raise
        print(f"prefkit: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("prefkit: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
