"""`trl dpo` command lines and YAML files, read the way TRL's parser (transformers' HfArgumentParser) reads them.

TRL parses ``ScriptArguments``, ``DPOConfig``, ``ModelConfig`` and ``DatasetMixtureConfig``; prefkit has one
``PrefConfig``. :func:`normalize_argv` rewrites a command line into PrefConfig's spelling before it is parsed:

- ``--flag=value`` → ``--flag value``; ``--hyphen-ated`` → ``--hyphen_ated``;
- a bare boolean ``--flag`` → ``--flag true``; ``--no_<flag>`` → ``--flag false`` (HfArgumentParser offers the
  negation only for flags that default to true; here it works for every boolean);
- TRL names that prefkit spells differently (:data:`ALIASES`) and ``warmup_ratio`` (transformers 5 folded it
  into ``warmup_steps``: a value below 1 is a ratio);
- ``model_init_kwargs`` (JSON) → the options it sets (``--dtype``, ``--attn_implementation``, ``--model_revision``,
  ``--trust_remote_code``);
- a TRL option prefkit does not implement is refused with one line saying what to do (:data:`REFUSED`),
  unless it is given its "off" value, which changes nothing.

The tables live in :mod:`prefkit.aliases`, which ``PrefConfig(**kwargs)`` reads too: a TRL name means the same
in Python as on the command line.

Every field of TRL's dataclasses is a PrefConfig field, an alias, a translation or a refusal; the tests walk
TRL's fields so a new one shows up as a failing test.
"""

from __future__ import annotations

import dataclasses
import math
import os

from prefkit.aliases import ALIASES as ALIASES
from prefkit.aliases import REFUSED as REFUSED
from prefkit.aliases import TRANSLATED as TRANSLATED
from prefkit.aliases import is_off, model_init_options, warmup_ratio
from prefkit.errors import ConfigError


def _field_types() -> dict[str, object]:
    """Option name → the argparse type HfArgumentParser gives it (string_to_bool for booleans)."""
    from transformers import HfArgumentParser

    from prefkit.config import PrefConfig

    types: dict[str, object] = {}
    for a in HfArgumentParser(PrefConfig)._actions:
        types.setdefault(a.dest, a.type)  # a --no_<flag> action (same dest, no type) comes after its flag
    return types


def _check_finite(name: str, values: list[str]) -> None:
    for v in values:
        try:
            x = float(v)
        except ValueError:
            continue  # argparse names the option whose value is not a number
        if not math.isfinite(x):
            raise ConfigError(f"--{name}: must be a finite number, got {v}")


def _is_option(tok: str) -> bool:
    return tok.startswith("--") and len(tok) > 2 and not tok[2].isdigit()


def normalize_argv(argv: list[str]) -> list[str]:
    """A `trl dpo` / HfArgumentParser command line in PrefConfig's spelling (see the module docstring)."""
    from transformers.hf_argparser import string_to_bool

    types = _field_types()
    bools = {name for name, t in types.items() if t is string_to_bool}
    # split --flag=value and unify spellings first, so that every later step sees whole options
    toks: list[str] = []
    for tok in argv:
        if _is_option(tok):
            name, eq, value = tok[2:].partition("=")
            toks.append("--" + name.replace("-", "_"))
            if eq:
                toks.append(value)
        else:
            toks.append(tok)
    out: list[str] = []
    spelled: dict[str, tuple[str, list[str]]] = {}  # PrefConfig name → (the spelling given, its values)

    def emit(given_as: str, name: str, values: list[str]) -> None:
        before = spelled.setdefault(name, (given_as, values))
        if before[0] != given_as and before[1] != values:  # as in Python: no order decides between two spellings
            raise ConfigError(f"--{before[0]} {' '.join(before[1])} and --{given_as} {' '.join(values)}: both set "
                              f"--{name}; give one of them")
        if types.get(name) in (float, int):
            _check_finite(name, values)
        out.extend(["--" + name, *values])

    i = 0
    while i < len(toks):
        tok = toks[i]
        if not _is_option(tok):
            out.append(tok)
            i += 1
            continue
        name = tok[2:]
        values: list[str] = []
        i += 1
        while i < len(toks) and not _is_option(toks[i]):
            values.append(toks[i])
            i += 1
        negated = name.startswith("no_") and ALIASES.get(name[3:], name[3:]) in bools
        if negated:
            if values:
                raise ConfigError(f"--{name} takes no value (it means --{name[3:]} false)")
            name, values = name[3:], ["false"]
        given_as, name = name, ALIASES.get(name, name)
        if name in REFUSED:
            shown = " ".join(values) or "true"
            if not (values and all(is_off(v) for v in values)):
                raise ConfigError(REFUSED[name].message(name, shown))
            continue  # its "off" value: nothing to do
        if name == "model_init_kwargs":  # one mapping that sets several options (prefkit.aliases)
            if not (values and all(is_off(v) for v in values)):
                for target, value in model_init_options(" ".join(values)).items():
                    emit(given_as, target, [str(value).lower() if isinstance(value, bool) else str(value)])
            continue
        if name in TRANSLATED:
            name, values = TRANSLATED[name], [repr(warmup_ratio(" ".join(values) or "nothing"))]
        if name in bools and not values:
            values = ["true"]
        emit(given_as, name, values)
    return out


# The environment variables a --config file's ``env:`` may set (docs/reliability.md): devices, threads, caches,
# offline switches and logger names. Others (LD_PRELOAD, PYTHONPATH, PATH, …) could run code in every process
# started after it, which a config file must not be able to do.
ENV_ALLOWED = frozenset({
    "CUDA_VISIBLE_DEVICES", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "TOKENIZERS_PARALLELISM",
    "PYTORCH_CUDA_ALLOC_CONF", "NCCL_DEBUG", "NCCL_P2P_DISABLE", "NCCL_IB_DISABLE", "HF_HOME", "HF_HUB_CACHE",
    "HF_DATASETS_CACHE", "HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE", "WANDB_PROJECT",
    "WANDB_ENTITY", "WANDB_MODE", "WANDB_LOG_MODEL", "WANDB_RUN_GROUP", "WANDB_TAGS", "ACCELERATE_LOG_LEVEL",
    "PREFKIT_CPU_BF16",
})


def yaml_env(data: dict) -> dict:
    """TRL's YAML may set environment variables under ``env:``; set those of :data:`ENV_ALLOWED` (refusing
    any other name, before any is set) and return the rest of the mapping."""
    env = data.pop("env", None) or {}
    if not isinstance(env, dict):
        raise ConfigError("--config: `env` must be a mapping of NAME: value")
    for key in env:
        if str(key) not in ENV_ALLOWED:
            raise ConfigError(f"--config: env: {key} is not a variable a config file may set; set it in the shell "
                              f"that starts prefkit, or use one of {', '.join(sorted(ENV_ALLOWED))}")
    for key, value in env.items():
        os.environ[str(key)] = str(value)
    return data


def accepted(name: str) -> bool:
    """Whether a TRL option name is understood: a PrefConfig field, an alias or a translation (not a refusal)."""
    from prefkit.config import option_names

    return name in option_names() or name in ALIASES or name in TRANSLATED or name == "model_init_kwargs"


def refusals_table_markdown() -> str:
    """The docs table of refused TRL options, generated from :data:`REFUSED` so the two never drift."""
    lines = ["| TRL option | what to do instead |", "|---|---|"]
    lines += [f"| `{name}` | {r.reason} |" for name, r in REFUSED.items()]
    return "\n".join(lines)


# DPOTrainer's constructor arguments → what PrefTrainer does with each (docs/trl.md's table is generated from it)
CONSTRUCTOR: dict[str, str] = {
    "model": "a model instance, or a hub id, local directory or `.gguf` file loaded with the config's model options "
             "(`dtype`, `attn_implementation`, `model_revision`, `trust_remote_code`, or `model_init_kwargs`); "
             "`dtype` auto loads float32, as TRL; None: `model_name_or_path`, else the embedded default model",
    "ref_model": "the reference; default: the base with adapters disabled (peft), nothing with "
                 "`precompute_ref_log_probs`, else a frozen copy of the starting model; the same object as `model` "
                 "is refused",
    "args": "a `PrefConfig` (every `DPOConfig` field name is accepted, TRL's aliases resolved as on the command "
            "line); None: `PrefConfig()`",
    "data_collator": "prefkit's own `PairCollator` only (its pair layouts); any other collator is refused",
    "train_dataset": "a `datasets.Dataset` of raw preference rows or prepared pairs, required; an `IterableDataset` "
                     "(streaming) or a dict is refused",
    "eval_dataset": "a dataset, or a dict / `DatasetDict` of them (metrics prefixed `eval_<name>_`); each prepared "
                    "as the training set, with its own skip report",
    "processing_class": "the tokenizer; default: the one saved with the model (refused where the model instance has "
                        "no path); a multimodal processor is refused",
    "compute_metrics": "passed to transformers' Trainer; it gets per pair the implicit rewards (chosen, rejected) "
                       "as predictions and label 0 (the chosen response)",
    "callbacks": "added after prefkit's metrics.jsonl writer",
    "optimizers": "passed to transformers' Trainer",
    "quantization_config": "used when `model` is loaded from a name or path (as `load_in_4bit`); refused with a "
                           "model instance",
    "peft_config": "applied as `--use_peft` applies LoRA (the reference is the base with adapters disabled); "
                   "refused with a model that has adapters, with `use_peft=True`, or for prompt-learning methods",
}
# PrefTrainer's arguments beyond DPOTrainer's
CONSTRUCTOR_EXTRA: dict[str, str] = {
    "preprocess_logits_for_metrics": "transformers Trainer's: applied to the rewards before compute_metrics",
    "run_forwards": "the host layer's plan for the policy and reference forwards (`prefkit.accel.install`)",
    "layout": "the pair layout (default: resolved from the models)",
    "spec": "the run's options resolved by `prefkit.spec.resolve_run` (default: `args` resolved)",
}


def constructor_table_markdown() -> str:
    """The docs table of DPOTrainer's constructor arguments, generated from :data:`CONSTRUCTOR`."""
    lines = ["| argument | PrefTrainer |", "|---|---|"]
    lines += [f"| `{name}` | {what} |" for name, what in CONSTRUCTOR.items()]
    lines += [f"| `{name}` (prefkit) | {what} |" for name, what in CONSTRUCTOR_EXTRA.items()]
    return "\n".join(lines)


def trl_fields() -> dict[str, list[str]]:
    """Field names of the dataclasses `trl dpo` parses, by class (needs trl; used by the tests and docs)."""
    from trl import DPOConfig, ModelConfig, ScriptArguments
    from trl.scripts.utils import DatasetMixtureConfig

    return {c.__name__: [f.name for f in dataclasses.fields(c) if f.init]
            for c in (ScriptArguments, DPOConfig, ModelConfig, DatasetMixtureConfig)}
