"""What every training job sets up before it trains, shared by `prefkit train` (:func:`prefkit.run.train_main`)
and its ``--rounds`` loop (:func:`prefkit.online.train_rounds`): the output-dir check, the saved options, and
the model and tokenizer under the one dtype rule. Below both, so that imports only point down."""

from __future__ import annotations

import hashlib
import json
import zipfile
from pathlib import Path

import torch
import yaml

from prefkit.accel.precision import choose_dtype, default_device_type
from prefkit.config import PrefConfig
from prefkit.errors import ConfigError
from prefkit.files import check_writable_dir
from prefkit.models import (
    load_causal_lm,
    load_policy,
    load_tokenizer,
    quantization_config,
    resolve_model_path,
    with_adapters,
)

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
    model = load_policy(path, cfg, dtype=weight_dtype(cfg, trained=not cfg.use_peft),
                        quantization=quantization_config(cfg))
    if model.generation_config is not None and model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    return path, with_adapters(model, cfg), tokenizer


def load_reference_model(cfg: PrefConfig) -> torch.nn.Module | None:
    """The reference named by --ref_model_name_or_path (frozen, eval mode), else None: the trainer then uses the
    starting policy (:func:`prefkit.reference.reference_copy`, or a peft model's adapters disabled)."""
    if not cfg.ref_model_name_or_path:
        return None
    ref = load_causal_lm(resolve_model_path(cfg.ref_model_name_or_path), dtype=weight_dtype(cfg),
                         trust_remote_code=cfg.trust_remote_code, allow_pickle=cfg.allow_pickle)
    return ref.eval().requires_grad_(False)


def weight_dtype(cfg: PrefConfig, *, trained: bool = False) -> torch.dtype:
    """The one dtype rule for every model prefkit loads: the rule of the device it will run on."""
    return choose_dtype(cfg.dtype, torch.device(default_device_type(cfg.use_cpu)), trained=trained)



# ---- resume: check what is resumed before trusting it -------------------------------------------------------

TRAINER_STATE = "trainer_state.json"
DATA_FINGERPRINT = "prefkit_data_fingerprint"
# Options a resume may change: they shape logs, saves, held-out reports and where files go, not what is trained.
# Every other option the run saved must be the same, or the curve continues under another objective or data.
RESUME_MAY_CHANGE = frozenset({
    "output_dir", "logging_dir", "logging_steps", "logging_strategy", "logging_first_step", "logging_nan_inf_filter",
    "save_steps", "save_strategy", "save_total_limit", "save_on_each_node", "eval_steps", "eval_strategy",
    "eval_delay", "eval_on_start", "per_device_eval_batch_size", "eval_accumulation_steps", "max_eval_samples",
    "eval_dataset_name", "eval_split", "report_to", "run_name", "project", "resume_from_checkpoint",
    "overwrite_output_dir", "dataloader_num_workers", "dataloader_prefetch_factor", "dataloader_persistent_workers",
    "dataloader_pin_memory", "disable_tqdm", "debug_traceback", "log_level", "log_level_replica",
    "log_on_each_node", "push_to_hub", "hub_model_id", "hub_strategy", "hub_private_repo", "hub_always_push",
    "hub_revision", "ref_cache_dir", "trackio_space_id",
})


def _refuse(ckpt: Path, why: str) -> ConfigError:
    return ConfigError(f"--resume_from_checkpoint: {ckpt}: {why}; resume from an earlier checkpoint-* (pass its "
                       "path) or start again in another --output_dir")


def check_safetensors(path: Path) -> None:
    """ValueError unless ``path`` is a whole safetensors file: its header parses and its size is the header's
    8 + header length + end of the last tensor (a truncated write fails this)."""
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if not 0 < n <= size - 8:
            raise ValueError(f"{path.name} has no valid safetensors header")
        try:
            header = json.loads(f.read(n))
            end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
        except (ValueError, KeyError, TypeError, IndexError) as e:
            raise ValueError(f"{path.name} has no valid safetensors header") from e
    if 8 + n + end != size:
        raise ValueError(f"{path.name} is {size} bytes but its header describes {8 + n + end} (truncated?)")


def verify_checkpoint(ckpt: str, cfg: PrefConfig) -> dict:
    """The checkpoint's trainer state, after checking that it can be resumed: trainer_state.json parses, the
    weights are whole safetensors files (pickled ones only with --allow_pickle), the optimizer and scheduler
    states are whole archives, and its step is within --max_steps."""
    path = Path(ckpt)
    try:
        state = json.loads((path / TRAINER_STATE).read_text())
        step = int(state["global_step"])
    except FileNotFoundError as e:
        raise _refuse(path, f"{TRAINER_STATE} is missing") from e
    except (OSError, ValueError, KeyError, TypeError, RecursionError) as e:
        raise _refuse(path, f"{TRAINER_STATE} cannot be read ({type(e).__name__}: {e})") from e
    weights = sorted(path.glob("*.safetensors"))
    if not weights:
        pickled = [p.name for p in path.iterdir() if p.suffix in (".bin", ".pt") and "model" in p.name]
        if not pickled:
            raise _refuse(path, "holds no model or adapter weights (*.safetensors)")
        if not cfg.allow_pickle:
            raise _refuse(path, f"holds only pickled weights ({pickled[0]}); pass --allow_pickle true if you trust "
                          "them")
    for w in weights:
        try:
            check_safetensors(w)
        except (OSError, ValueError) as e:
            raise _refuse(path, str(e)) from e
    for name in ("optimizer.pt", "scheduler.pt"):
        if (path / name).exists() and not zipfile.is_zipfile(path / name):
            raise _refuse(path, f"{name} is not a whole torch archive (truncated?)")
    if cfg.max_steps > 0 and step > cfg.max_steps:
        raise _refuse(path, f"it is at step {step}, past --max_steps {cfg.max_steps}")
    return state


def run_finished(state: dict) -> bool:
    """Whether a checkpoint's trainer state is the end of its run (every planned step done)."""
    return int(state.get("max_steps") or 0) > 0 and int(state["global_step"]) >= int(state["max_steps"])


def _comparable(d: dict) -> dict:
    return yaml.safe_load(yaml.safe_dump(d, sort_keys=True)) or {}


def check_same_run(cfg: PrefConfig, run_dir: Path, may_change: frozenset[str] = frozenset()) -> None:
    """ConfigError naming every option whose value differs from the one ``run_dir``'s run saved, except those a
    resume may change (:data:`RESUME_MAY_CHANGE` and ``may_change``)."""
    saved_file = run_dir / CONFIG_FILE
    try:
        saved = yaml.safe_load(saved_file.read_text()) or {}
    except FileNotFoundError as e:
        raise ConfigError(f"--resume_from_checkpoint: {saved_file} is missing, so the options of the run cannot "
                          "be compared; start again in another --output_dir") from e
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"--resume_from_checkpoint: {saved_file} cannot be read ({e})") from e
    current = _comparable(resolved_config_dict(cfg))
    changed = sorted(k for k in saved.keys() & current.keys() if k not in RESUME_MAY_CHANGE | may_change and saved[k] != current[k])
    if changed:
        shown = "; ".join(f"--{k} {current[k]!r} (the run: {saved[k]!r})" for k in changed[:4])
        more = f" and {len(changed) - 4} more" if len(changed) > 4 else ""
        raise ConfigError(f"--resume_from_checkpoint: this resume changes {shown}{more}, which would change the "
                          f"objective or data mid-run; pass the run's values, or start a new run in another "
                          "--output_dir")


def data_fingerprint(ds) -> str:
    """A hash of the tokenized training pairs, in order: what a resumed run must train on again."""
    h = hashlib.sha256()
    for row in ds.select_columns(["prompt_ids", "chosen_ids", "rejected_ids"]).iter(batch_size=1024):
        h.update(json.dumps(row).encode())
    return h.hexdigest()
