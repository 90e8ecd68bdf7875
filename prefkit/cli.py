"""Command line: `prefkit train | eval | plot | critical-tokens | pairs | bench`; ``prefkit COMMAND --help`` shows
a command's options, ``prefkit --version`` the version.

Options are PrefConfig fields (TrainingArguments / DPOConfig names); ``--config run.yaml`` supplies a base
and command-line options override it. Every command runs inside one error boundary (:func:`main`): any
exception becomes one ``prefkit: error:`` line and a non-zero exit; ``PREFKIT_DEBUG=1`` (or ``--debug``) shows
the traceback instead.
"""

from __future__ import annotations

import argparse
import difflib
import json
import logging
import os
import sys
from pathlib import Path

from prefkit.configfile import given_options, options_help, parse_config, wants_help
from prefkit.configfile import options_to_argv as options_to_argv  # re-exported: scripts build argv with it
from prefkit.errors import describe

# The commands import their modules when run, so that `prefkit --help` does not load torch and transformers.


_TRAIN_HELP = ("Train a model on preference pairs. With no --model_name_or_path and no --dataset_name: the embedded "
               "demo (SmolLM2-135M-Instruct + LoRA on a bundled HH-RLHF sample). --log_level debug shows prefkit's "
               "internal detail; --debug (or PREFKIT_DEBUG=1) a traceback instead of a one-line error.")
_EVAL_HELP = ("Preference metrics (reward accuracy, margins, log-prob changes) of a trained model or adapter on a "
              "preference dataset, printed as JSON. A run's saved --beta applies unless given; the reference is "
              "the adapter's base, or --ref_model_name_or_path.")
# the options `prefkit eval` reads itself, shown first in its help; the data and model groups hold the rest
_EVAL_LEAD = ("eval", ("model_name_or_path", "ref_model_name_or_path", "dataset_name", "dataset_split", "beta",
                       "per_device_eval_batch_size", "max_eval_samples"))


def _cmd_train(argv: list[str]) -> int:
    if wants_help(argv):
        print(options_help("prefkit train", _TRAIN_HELP))
        return 0
    from prefkit.run import train_main

    train_main(parse_config(argv, demo=True))
    return 0


def _cmd_eval(argv: list[str]) -> int:
    if wants_help(argv):
        print(options_help("prefkit eval", _EVAL_HELP, lead=_EVAL_LEAD,
                           groups=("model and LoRA", "data", "layouts and performance"),
                           own=[("--output_file", "JSON file of the metrics (default: <model dir>/eval_results.json "
                                                  "for a run's output dir)")]))
        return 0
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


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("prefkit")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "(not installed)"


# what a shell reports for a process that SIGPIPE ended (128 + 13)
EXIT_BROKEN_PIPE = 141


def main(argv: list[str] | None = None) -> int:
    try:
        code = _main(argv)
        sys.stdout.flush()  # output still buffered meets a closed pipe here, not at interpreter exit
        return code
    except BrokenPipeError:
        # the reader left (`prefkit train --help | head`): the recipe of Python's signal docs, so that the
        # interpreter's own flush at exit writes nowhere instead of printing a traceback
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_BROKEN_PIPE


def _main(argv: list[str] | None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or "--debug_traceback" in argv or os.environ.get("PREFKIT_DEBUG", "") not in ("", "0")
    argv = [a for a in argv if a != "--debug"]
    logging.basicConfig(level=logging.INFO, format="prefkit: %(message)s", stream=sys.stderr)
    from prefkit.quiet import quiet_known_noise

    quiet_known_noise()
    for noisy in ("transformers", "datasets", "accelerate", "peft", "httpx", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: prefkit {" + ",".join(COMMANDS) + "} [options]\n       prefkit --version\n\ncommands:")
        for name, (_, help_text) in COMMANDS.items():
            print(f"  {name:<16} {help_text}")
        print("\n`prefkit COMMAND --help` shows a command's options.")
        return 0 if argv else 2
    if argv[0] in ("-V", "--version"):
        print(f"prefkit {_version()}")
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        close = difflib.get_close_matches(command, list(COMMANDS), n=1)
        print(f"prefkit: error: unknown command {command!r}" + (f"; did you mean {close[0]!r}?" if close else ""),
              file=sys.stderr)
        return 2
    try:
        return COMMANDS[command][0](rest)
    except SystemExit as e:  # a command's own argparse parser after --help (0) or on a bad argument (2)
        return e.code if isinstance(e.code, int) else 0 if e.code is None else 2
    except KeyboardInterrupt:
        print("prefkit: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # not an error of the run: main() ends quietly
        raise
    except Exception as e:  # the one boundary: a library's exception must not reach the user as a traceback
        if debug:
            raise
        message, code = describe(e)
        print(f"prefkit: error: {message}", file=sys.stderr)
        return code


if __name__ == "__main__":
    sys.exit(main())
