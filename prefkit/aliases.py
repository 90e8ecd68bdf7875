"""TRL's names of options that prefkit spells differently, translates or refuses: the one table that both the
command line (:func:`prefkit.trl_compat.normalize_argv`) and Python (``PrefConfig(**kwargs)``, through
:func:`resolve_names`) read, so the two cannot drift.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass

from prefkit.errors import ConfigError

# TRL name → PrefConfig field with the same meaning
ALIASES: dict[str, str] = {
    "model_dtype": "dtype",  # configs and commands that spell it so (as `prefkit pairs` does) keep working
    "dataset_train_split": "dataset_split",
    "dataset_test_split": "eval_split",
    "test_split_size": "eval_split_size",  # DatasetMixtureConfig
    "padding_free": "pack_pairs",  # prefkit's packing is padding-free (one row, attention per pair)
    "streaming": "dataset_streaming",  # DatasetMixtureConfig
    # transformers 5 renamed these; the TRL spelling would print a deprecation warning on every run
    "gradient_checkpointing": "activation_checkpointing",
    "gradient_checkpointing_kwargs": "activation_checkpointing_kwargs",
}

# TRL name → the PrefConfig field its value is translated into (:func:`warmup_ratio`)
TRANSLATED: dict[str, str] = {
    "warmup_ratio": "warmup_steps",
}

# DPOConfig.model_init_kwargs: the keys of `from_pretrained`'s keyword arguments that are prefkit options
MODEL_INIT_KWARGS: dict[str, str] = {
    "dtype": "dtype",
    "torch_dtype": "dtype",  # transformers' older name
    "attn_implementation": "attn_implementation",
    "revision": "model_revision",
    "trust_remote_code": "trust_remote_code",
}

_OFF = frozenset({"false", "0", "no", "none", "null", "", "[]", "{}"})


@dataclass(frozen=True)
class Refusal:
    reason: str  # what to do instead; one line

    def message(self, name: str, value: str) -> str:
        return f"--{name} {value}: not supported by prefkit; {self.reason}"


REFUSED: dict[str, Refusal] = {
    "use_liger_kernel": Refusal("prefkit always applies the LM head at response tokens only, in chunks, without "
                                "full logits; drop the option"),
    "liger_kernel_config": Refusal("prefkit does not use Liger kernels (see --use_liger_kernel); drop the option"),
    "router_aux_loss_coef": Refusal("prefkit adds no MoE router auxiliary loss; drop the option"),
    "dataset_num_proc": Refusal("prefkit tokenizes in batches in one process (fast tokenizers use threads); "
                                "drop the option"),
    "precompute_ref_batch_size": Refusal("reference log-probs are precomputed in batches of "
                                         "--per_device_eval_batch_size; set that instead"),
    "activation_offloading": Refusal("use --gradient_checkpointing to save activation memory"),
    "dataset_streaming": Refusal("prefkit tokenizes and checks the whole dataset before training; cap it with "
                                 "--max_train_samples N instead"),
    "datasets": Refusal("give one dataset with --dataset_name (concatenate the files beforehand) and held-out "
                        "pairs with --eval_dataset_name or --eval_split_size"),
}


def is_off(value: object) -> bool:
    """Whether a refused option's value is its "off" value, which changes nothing (command-line text or a Python
    value: None, False, 0, an empty string, list or mapping)."""
    if isinstance(value, str):
        return value.strip().lower() in _OFF
    return value is None or value is False or (isinstance(value, (int, float)) and value == 0) or (
        isinstance(value, (list, tuple, dict)) and not value)


def warmup_ratio(value: object) -> float:
    """``warmup_ratio`` as the ``warmup_steps`` value transformers 5 reads as a ratio (a value below 1)."""
    try:
        ratio = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        ratio = float("nan")
    if not 0.0 <= ratio < 1.0:
        raise ConfigError(f"--warmup_ratio: must be a number in [0, 1), got {value}")
    return ratio


def model_init_options(value: object) -> dict[str, object]:
    """``model_init_kwargs`` (a mapping, or its JSON text on the command line) as the PrefConfig options it sets:
    dtype (a ``torch.dtype`` or its name), attn_implementation, revision, trust_remote_code. Any other key is
    refused: prefkit loads the model itself and would otherwise drop it silently."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError as e:
            raise ConfigError(f"--model_init_kwargs: not a JSON mapping ({e}); e.g. '{{\"dtype\": \"bfloat16\"}}'") from e
    if not isinstance(value, Mapping):
        raise ConfigError(f"--model_init_kwargs: must be a mapping of from_pretrained arguments, got {value!r}")
    out: dict[str, object] = {}
    for key, v in value.items():
        if key not in MODEL_INIT_KWARGS:
            raise ConfigError(f"--model_init_kwargs: {key!r} is not passed on by prefkit, which loads the model itself; "
                              f"it takes {', '.join(MODEL_INIT_KWARGS)} (the same as --dtype, --attn_implementation, "
                              "--model_revision, --trust_remote_code)")
        out[MODEL_INIT_KWARGS[key]] = str(v).removeprefix("torch.") if key in ("dtype", "torch_dtype") else v
    return out


def resolve_names(kwargs: dict, defaults: Mapping[str, object]) -> dict:
    """``PrefConfig(**kwargs)``'s keyword arguments in PrefConfig's spelling: aliases renamed, ``warmup_ratio``
    translated, refused options raising :class:`ConfigError` unless off (as on the command line). ``defaults``:
    PrefConfig's field defaults, for the alias names that are fields themselves (transformers' deprecated
    ``gradient_checkpointing*``) and to tell a target the caller set from one left at its default. Setting a
    name and its alias to different values is refused: there is no order to decide which one wins."""
    out = dict(kwargs)
    given = out.pop("model_init_kwargs", None)
    for target, value in ({} if is_off(given) else model_init_options(given)).items():
        if target in out and out[target] != defaults.get(target) and out[target] != value:
            raise ConfigError(f"model_init_kwargs sets {target}={value!r} and {target}={out[target]!r} is given too; "
                              "give one of them")
        out[target] = value
    for name in [k for k in out if k in ALIASES or k in TRANSLATED]:
        value = out.pop(name)
        if name in defaults and value == defaults[name]:
            continue  # a field left at its default (every field is passed by dataclasses.replace)
        target = ALIASES.get(name) or TRANSLATED[name]
        if name in TRANSLATED:
            value = warmup_ratio(value)
        if target in out and out[target] != defaults.get(target) and out[target] != value:
            if name in defaults:
                continue  # transformers' rule for its deprecated names: the new name wins
            raise ConfigError(f"{name}={value!r} and {target}={out[target]!r}: {name} is TRL's name of {target}; "
                              "give one of them")
        out[target] = value
    for name in [k for k in out if k in REFUSED]:
        if not is_off(out[name]):
            raise ConfigError(f"{name}={out[name]!r}: not supported by prefkit; {REFUSED[name].reason}")
        if name not in defaults:
            del out[name]  # its "off" value: nothing to do
    return out
