"""What every training job sets up before it trains, shared by `prefkit train` (:func:`prefkit.run.train_main`)
and its ``--rounds`` loop (:func:`prefkit.online.train_rounds`): the output-dir check, the saved options, and
the model and tokenizer under the one dtype rule. Below both, so that imports only point down."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import set_seed

from prefkit.accel.precision import choose_dtype, default_device_type
from prefkit.config import PrefConfig
from prefkit.errors import ConfigError
from prefkit.files import check_writable_dir
from prefkit.models import apply_lora, load_causal_lm, load_tokenizer, quantization_config, resolve_model_path

CONFIG_FILE = "prefkit_config.yaml"


def resolved_config_dict(cfg: PrefConfig) -> dict:
    """The options that define a run (the prefkit fields plus the TrainingArguments a user sets)."""
    d = cfg.to_dict()
    return {k: v for k, v in d.items() if not k.startswith("_") and k not in ("push_to_hub_token", "hub_token")}


LOCK_FILE = ".prefkit.lock"


def check_output_dir(cfg: PrefConfig) -> None:
    """The output dir can be used: not a file, not under a file, writable, and empty unless overwriting or
    resuming (the lock file of an earlier run does not count). Creates it, so that a path it cannot hold fails
    here and not after training."""
    out = Path(cfg.output_dir)
    if out.is_file():
        raise ConfigError(f"--output_dir: {out} is a file")
    if out.is_dir() and any(p.name != LOCK_FILE for p in out.iterdir()) and not cfg.overwrite_output_dir \
            and not cfg.resume_from_checkpoint:
        raise ConfigError(
            f"--output_dir: {out} is not empty; pass --overwrite_output_dir true, "
            "--resume_from_checkpoint latest, or choose another directory"
        )
    check_writable_dir(out, "--output_dir", create=True)


def load_model_and_tokenizer(cfg: PrefConfig):
    path = resolve_model_path(cfg.model_name_or_path)
    revision = cfg.model_revision if cfg.model_revision != "main" else None
    tokenizer = load_tokenizer(path, trust_remote_code=cfg.trust_remote_code, revision=revision,
                               pad_token=cfg.pad_token)
    # LoRA trains only its adapters (peft keeps them in fp32), so the frozen base may be bf16
    dtype = weight_dtype(cfg, trained=not cfg.use_peft)
    quantized = quantization_config(cfg)
    model = load_causal_lm(
        path, dtype=dtype, trust_remote_code=cfg.trust_remote_code, allow_pickle=cfg.allow_pickle, revision=revision,
        attn_implementation=cfg.attn_implementation, quantization_config=quantized,
        device_map={"": torch.cuda.current_device()} if quantized is not None else None,
    )
    if model.generation_config is not None and model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    if cfg.ignore_bias_buffers:  # TRL's DDP fix: boolean buffers (causal masks) are not synchronised
        model._ddp_params_and_buffers_to_ignore = [n for n, b in model.named_buffers() if b.dtype == torch.bool]
    if cfg.use_peft:
        if quantized is not None:
            from peft import prepare_model_for_kbit_training

            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=bool(cfg.activation_checkpointing))
        set_seed(cfg.seed)  # --seed decides the LoRA initialisation, whatever ran before (launchers use the RNG)
        model = apply_lora(
            model, r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout, target_modules=cfg.lora_target_modules,
            use_rslora=cfg.use_rslora, use_dora=cfg.use_dora, modules_to_save=cfg.lora_modules_to_save,
            **({"target_parameters": cfg.lora_target_parameters} if cfg.lora_target_parameters else {}),
        )
    return path, model, tokenizer


def weight_dtype(cfg: PrefConfig, *, trained: bool = False) -> torch.dtype:
    """The one dtype rule for every model prefkit loads: the rule of the device it will run on."""
    return choose_dtype(cfg.dtype, torch.device(default_device_type(cfg.use_cpu)), trained=trained)

