"""What :class:`prefkit.trainer.PrefTrainer` takes as TRL's ``DPOTrainer`` does, turned into what it trains: a
model given by name or path loaded with the run's model options, the default tokenizer, ``peft_config``, and the
checks of the arguments it cannot honour. Each refusal is a :class:`ConfigError` (a ``ValueError``) that names
the argument and says what to do.
"""

from __future__ import annotations

import os

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from prefkit.data import PairCollator
from prefkit.data.tokenize import REF_FIELDS
from prefkit.errors import ConfigError, ModelError
from prefkit.models import (
    is_peft_model,
    load_policy,
    load_tokenizer,
    quantization_config,
    resolve_model_path,
    with_adapters,
    with_pad_token,
)

STREAMING = ("an IterableDataset (streaming) is not supported: prefkit tokenizes and checks every pair before "
             "training; load it without streaming=True (select a part with .select(range(N)) if it is large)")


def eval_sets(eval_dataset) -> dict[str, object] | None:
    """``eval_dataset`` as name → dataset: one dataset under the name ``eval``; a dict (or DatasetDict) as it is."""
    if eval_dataset is None:
        return None
    return dict(eval_dataset) if isinstance(eval_dataset, dict) else {"eval": eval_dataset}


def check_dataset(dataset, argument: str) -> None:
    """A map-style ``datasets.Dataset`` (raw preference rows or prepared pairs), or refused naming ``argument``."""
    from datasets import Dataset, IterableDataset

    if isinstance(dataset, IterableDataset):
        raise ConfigError(f"{argument}: {STREAMING}")
    if isinstance(dataset, dict):
        raise ConfigError(f"{argument}: a dict of datasets ({', '.join(map(str, dataset))}); pass one of them, e.g. "
                          "dataset['train'] (eval_dataset takes a dict: its metrics are prefixed per name)")
    if not isinstance(dataset, Dataset):
        raise ConfigError(f"{argument}: must be a datasets.Dataset, got {type(dataset).__name__}; build one with "
                          "Dataset.from_list(rows) or datasets.load_dataset(...)")


def check_datasets(train_dataset, eval_dataset) -> None:
    if train_dataset is None:  # TRL's message: code that matches it keeps working
        raise ConfigError("`train_dataset` is required: pass the preference pairs to train on (a datasets.Dataset)")
    check_dataset(train_dataset, "train_dataset")
    for name, ds in (eval_sets(eval_dataset) or {}).items():
        check_dataset(ds, "eval_dataset" if not isinstance(eval_dataset, dict) else f"eval_dataset[{name!r}]")


def check_reference_columns(dataset, objective, name: str) -> None:
    """Precomputed reference columns that the objective can use: both or neither, and TRL's one log-prob per
    response only where the objective sums the reference over the whole response."""
    from datasets import Value

    present = [c for c in REF_FIELDS if dataset is not None and c in dataset.column_names]
    if not present:
        return
    if len(present) == 1:
        other = next(c for c in REF_FIELDS if c not in present)
        raise ConfigError(f"{name} dataset: column {present[0]!r} without {other!r}; give both precomputed "
                          "reference columns or drop them")
    per_response = isinstance(dataset.features[REF_FIELDS[0]], Value)
    # the collator weights the tokens of a dataset with weight columns whatever the options say
    weighted = "rejected_token_weights" in dataset.column_names
    if per_response and (objective.needs_token_reference or (weighted and objective.needs_reference)):
        s = objective.spec
        why = ", ".join(w for w, on in ((f"--granularity {s.granularity}", s.granularity != "response"),
                                        ("--poet", s.poet), ("--use_token_weights", s.use_token_weights),
                                        ("--ld_alpha", s.ld_alpha is not None),
                                        ("its token weight columns", weighted)) if on)
        raise ConfigError(f"{name} dataset: columns {REF_FIELDS[0]!r}/{REF_FIELDS[1]!r} hold one reference "
                          f"log-prob per response (TRL's format), but the reference is needed per token here ({why}); drop "
                          "the columns so that prefkit computes them (--precompute_ref_log_probs computes and caches them)")


def check_collator(data_collator) -> None:
    if data_collator is not None and not isinstance(data_collator, PairCollator):
        raise ConfigError(f"data_collator: a {type(data_collator).__name__}; prefkit batches pairs with its own "
                          "collator (prefkit.data.PairCollator: shared-prompt and packed layouts, per-token reference "
                          "columns), so drop data_collator")


def policy_model(model, args, quantization=None) -> tuple[nn.Module, str | None]:
    """(the model to train, the path it was loaded from; None for an instance). A name or path (a hub id, a local
    directory, a .gguf file; None: ``args.model_name_or_path``, else the embedded default) is loaded with the
    model options of ``args`` (``model_init_kwargs`` set them too). ``dtype`` auto is float32 here: a PrefConfig
    built in Python probes no hardware, and TRL loads float32 by default."""
    if model is None or isinstance(model, (str, os.PathLike)):
        path = resolve_model_path(str(model) if model is not None else args.model_name_or_path)
        dtype = torch.float32 if args.dtype == "auto" else getattr(torch, args.dtype)
        return load_policy(path, args, dtype=dtype, quantization=quantization or quantization_config(args)), path
    if quantization is not None or args.load_in_4bit or args.load_in_8bit:
        raise ConfigError("quantization_config: the model is already loaded, and only loading quantizes it; pass "
                          "the model as a name or path, or drop quantization_config / load_in_4bit / load_in_8bit")
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model: a {type(model).__name__}; pass a causal LM (a PreTrainedModel or PeftModel), its "
                          "hub id or a local path")
    return model, None


def check_reference(model: nn.Module, ref_model: nn.Module | None) -> None:
    if ref_model is not None and ref_model is model:
        raise ConfigError("ref_model: the same object as model, which would freeze the policy; omit ref_model (the "
                          "reference is then a frozen copy of the starting model, or the base with adapters disabled) "
                          "or pass a separately loaded model")


def tokenizer_for(model: nn.Module, path: str | None, args, processing_class=None) -> PreTrainedTokenizerBase:
    """``processing_class`` (with its pad token settled as TRL does), else the tokenizer saved with the model."""
    if processing_class is not None:
        if not isinstance(processing_class, PreTrainedTokenizerBase):
            raise ConfigError(f"processing_class: a {type(processing_class).__name__}; prefkit trains text causal "
                              "LMs and needs their tokenizer (a processor's .tokenizer for a multimodal model)")
        return with_pad_token(processing_class, "processing_class", args.pad_token)
    source = path or getattr(model, "name_or_path", "") or ""
    if not source:
        raise ConfigError("processing_class: not given, and this model instance has no path to load its tokenizer "
                          "from; pass processing_class=AutoTokenizer.from_pretrained(...)")
    revision = args.model_revision if args.model_revision != "main" else None
    try:
        return load_tokenizer(source, trust_remote_code=args.trust_remote_code, revision=revision,
                              pad_token=args.pad_token)
    except ModelError as e:
        raise ConfigError(f"processing_class: not given, and the model's tokenizer cannot be loaded ({e}); pass "
                          "processing_class=AutoTokenizer.from_pretrained(...)") from e


def peft_model(model: nn.Module, args, peft_config=None) -> nn.Module:
    """The model with the adapters to train: ``peft_config``'s, else ``args.use_peft``'s (the ``lora_*``
    options), applied as `prefkit train --use_peft` applies them; a model that has adapters already is kept."""
    if peft_config is None:
        return model if is_peft_model(model) else with_adapters(model, args)
    from peft import PeftConfig

    if not isinstance(peft_config, PeftConfig):
        raise ConfigError(f"peft_config: must be a peft config such as peft.LoraConfig(...), got "
                          f"{type(peft_config).__name__}")
    if is_peft_model(model):
        raise ConfigError("peft_config: the model already has adapters (a PeftModel); pass its base model with "
                          "peft_config, or the PeftModel without peft_config")
    if args.use_peft:
        raise ConfigError("peft_config and use_peft=True both ask for adapters; give one of them")
    if peft_config.is_prompt_learning:
        raise ConfigError(f"peft_config: {type(peft_config).__name__} adds virtual prompt tokens, which prefkit's "
                          "pair layouts do not hold; use an adapter method such as LoraConfig")
    return with_adapters(model, args, peft_config)
