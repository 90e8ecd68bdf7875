"""A run's options resolved once: :func:`resolve_run` turns a PrefConfig into the frozen sub-specs the stages
take, after every check.

    PrefConfig (command line, YAML, Python; TRL's names)
        └─ resolve_run ─→ RunSpec(objective, dynamics, data, reference)
                           each checked beside its owner: objectives.registry.validate_objective,
                           dynamics.spec.validate_dynamics, data.spec.validate_data, config.validate_config;
                           then the combinations across them (_check_combinations)

`prefkit train` and `prefkit eval` resolve once and hand the spec on; a PrefTrainer built without one (the
Python API) resolves its ``args``. The semi-online options are resolved by :func:`prefkit.online.OnlineSpec`.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass

import torch
from transformers.integrations import is_deepspeed_zero3_enabled

from prefkit.config import PrefConfig, validate_config
from prefkit.data.spec import DataSpec, validate_data
from prefkit.dynamics.spec import DynamicsSpec, validate_dynamics
from prefkit.errors import ConfigError
from prefkit.objectives.registry import validate_objective
from prefkit.objectives.spec import ObjectiveSpec

logger = logging.getLogger("prefkit")


@dataclass(frozen=True)
class ReferenceSpec:
    """How the reference model is kept: TR-DPO's updates, precomputed log-probs."""

    sync_ref_model: bool = False
    ref_model_mixup_alpha: float = 0.6
    ref_model_sync_steps: int = 512
    precompute_ref_log_probs: bool = False

    @classmethod
    def from_config(cls, cfg) -> ReferenceSpec:
        return cls(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(cls)})


@dataclass(frozen=True)
class RunSpec:
    objective: ObjectiveSpec
    dynamics: DynamicsSpec
    data: DataSpec
    reference: ReferenceSpec


def resolve_run(cfg: PrefConfig) -> RunSpec:
    """Every check of a run's options, once, then the specs. Raises ConfigError naming the option to change.
    Without an accelerator, DataLoader pinning (a TrainingArguments default) is turned off, logged: it pins
    nothing there and warns every run."""
    validate_config(cfg)
    spec = RunSpec(ObjectiveSpec.from_config(cfg), DynamicsSpec.from_config(cfg), DataSpec.from_config(cfg),
                   ReferenceSpec.from_config(cfg))
    validate_objective(spec.objective)
    validate_dynamics(spec.dynamics)
    validate_data(spec.data)
    _check_combinations(cfg, spec)
    if cfg.dataloader_pin_memory and not torch.cuda.is_available():
        logger.debug("--dataloader_pin_memory: off (no accelerator to pin memory for)")
        cfg.dataloader_pin_memory = False
    return spec


def _check_combinations(cfg: PrefConfig, spec: RunSpec) -> None:
    """The combinations of options from different sub-specs whose mechanics do not compose."""
    ref = spec.reference
    if ref.sync_ref_model:
        if cfg.use_peft:
            raise ConfigError("--sync_ref_model: with --use_peft the reference is the base model without adapters, "
                              "which cannot be mixed into; drop one of the two (as TRL)")
        if ref.precompute_ref_log_probs:
            raise ConfigError("--sync_ref_model: the reference changes during training, so its log-probs cannot be "
                              "precomputed; drop --precompute_ref_log_probs")
    _check_zero3(cfg)


def _check_zero3(cfg: PrefConfig) -> None:
    """Under DeepSpeed ZeRO-3 parameters are partitioned from load on and only DeepSpeed's engine gathers them,
    so whatever runs a model outside the engine is refused up front instead of failing mid-run."""
    if not is_deepspeed_zero3_enabled():
        return
    engines = "ZeRO-2 or FSDP2 (examples/accelerate/)"
    for option, value in (("precompute_ref_log_probs", cfg.precompute_ref_log_probs),
                          ("eval_dataset_name", cfg.eval_dataset_name), ("eval_split_size", cfg.eval_split_size),
                          ("sync_ref_model", cfg.sync_ref_model)):
        if value:
            raise ConfigError(f"--{option}: runs a model outside DeepSpeed's engine, which is not supported under "
                              f"ZeRO-3: use {engines}, or score held-out pairs afterwards with `prefkit eval`")
