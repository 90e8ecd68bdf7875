"""PrefConfig: every option of a prefkit run, named like TrainingArguments / TRL's DPOConfig.

PrefConfig *is* a ``transformers.TrainingArguments`` (as TRL's DPOConfig is), so every trainer option
(learning_rate, per_device_train_batch_size, gradient_accumulation_steps, save_steps, bf16, …) keeps its
transformers name and meaning. The fields below add the model, data, objective and dynamics options; the objective
and dynamics options are declared once, in :class:`prefkit.objectives.spec.ObjectiveSpec` and
:class:`prefkit.dynamics.spec.DynamicsSpec`, and spliced in here. :func:`prefkit.spec.resolve_run` checks every
option once at start-up (so that a bad combination never fails mid-run) and resolves the specs the stages take. Building a PrefConfig probes no hardware: the options whose defaults depend on the host (bf16,
pad_to_multiple_of) are off unless given, and the command line fills them from
:func:`prefkit.accel.host_defaults`. The layouts (share_prompt, pack_pairs) left unset are decided from the
loaded models (:func:`prefkit.layouts.resolve_layout`).
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass, field

import torch
from transformers import TrainingArguments

from prefkit.aliases import resolve_names
from prefkit.dynamics.spec import DynamicsSpec
from prefkit.errors import ConfigError
from prefkit.objectives.spec import ObjectiveSpec


def spliced_options(spec: type, namespace: dict) -> None:
    """Declare a spec's fields as options of the class whose body is ``namespace`` (its ``locals()``), with the
    spec's names, defaults and help, so that an option has one declaration: the spec's. Tuples are lists here,
    as the command line and TRL's DPOConfig give them."""
    annotations = namespace.setdefault("__annotations__", {})
    for f in dataclasses.fields(spec):
        annotations[f.name] = f.type.replace("tuple[", "list[").replace(", ...]", "]")  # string annotations
        meta = {"help": f.metadata["help"]}  # HfArgumentParser hands metadata to argparse; ranges stay the spec's
        if isinstance(f.default, tuple):
            namespace[f.name] = field(default_factory=functools.partial(list, f.default), metadata=meta)
        else:
            namespace[f.name] = field(default=f.default, metadata=meta)



@dataclass
class PrefConfig(TrainingArguments):
    # ---- model -------------------------------------------------------------------------------------
    model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "Hub id, local HF dir, or .gguf file. Default: the embedded SmolLM2-135M-Instruct."},
    )
    ref_model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "Reference model if it is not the starting policy (e.g. an SFT model)."},
    )
    dtype: str = field(
        default="auto",
        metadata={"help": "auto | float32 | bfloat16 | float16 (alias --model_dtype). auto: fp32 for full fine-tuning "
                          "(trained weights; --bf16 gives bf16 speed), bf16 for a LoRA run's frozen base where bf16 "
                          "matmul is fast."},
    )
    model_revision: str = field(default="main", metadata={"help": "Model revision (branch, tag or commit)."})
    attn_implementation: str | None = field(
        default=None,
        metadata={"help": "Attention of the loaded model (eager, sdpa, flash_attention_2, …). Packed pairs need sdpa "
                          "and the shared prompt's 4D mask eager or sdpa: with another choice they are not used "
                          "(and refused if asked for)."},
    )
    pad_token: str | None = field(default=None, metadata={"help": "Padding token (default: the tokenizer's, else EOS)."})
    disable_dropout: bool = field(
        default=False,
        metadata={"help": "Set every dropout of policy and reference to 0 (TRL's default is true; LoRA dropout too)."},
    )
    bf16: bool | None = field(
        default=None,
        metadata={"help": "bf16 autocast (mixed precision). Default (command line): on where bf16 matmul is fast "
                          "(CUDA with bf16, CPUs with AMX or AVX512-BF16), off elsewhere, where it is ~20x slower; "
                          "a PrefConfig built in Python: off."},
    )
    trust_remote_code: bool = field(default=False, metadata={"help": "Run model code from the hub."})
    allow_pickle: bool = field(default=False, metadata={"help": "Allow loading pickled (.bin) weights."})
    use_peft: bool = field(default=False, metadata={"help": "Train LoRA adapters (peft)."})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha."})
    lora_dropout: float = field(default=0.05, metadata={"help": "LoRA dropout."})
    lora_target_modules: list[str] = field(
        default_factory=lambda: ["all-linear"], metadata={"help": "LoRA target modules (peft names)."}
    )
    lora_target_parameters: list[str] | None = field(
        default=None, metadata={"help": "LoRA target parameters (peft target_parameters, e.g. MoE experts)."}
    )
    lora_modules_to_save: list[str] | None = field(
        default=None, metadata={"help": "Modules trained in full and saved alongside the adapter (e.g. lm_head)."}
    )
    lora_task_type: str = field(default="CAUSAL_LM", metadata={"help": "peft task type; prefkit trains CAUSAL_LM."})
    use_rslora: bool = field(default=False, metadata={"help": "Rank-stabilised LoRA: scale alpha/sqrt(r)."})
    use_dora: bool = field(default=False, metadata={"help": "DoRA: weight-decomposed LoRA."})
    load_in_4bit: bool = field(default=False, metadata={"help": "QLoRA: load the base in 4 bit (bitsandbytes, CUDA)."})
    load_in_8bit: bool = field(default=False, metadata={"help": "Load the base in 8 bit (bitsandbytes, CUDA)."})
    bnb_4bit_quant_type: str = field(default="nf4", metadata={"help": "4-bit quantization type: nf4 or fp4."})
    use_bnb_nested_quant: bool = field(default=False, metadata={"help": "Nested (double) 4-bit quantization."})
    bnb_4bit_quant_storage: str | None = field(default=None, metadata={"help": "Storage dtype of 4-bit weights."})

    # ---- data --------------------------------------------------------------------------------------
    dataset_name: str | None = field(
        default=None,
        metadata={"help": "JSONL/JSON/Parquet/CSV file (.gz ok), datasets.save_to_disk dir, or hub dataset."},
    )
    dataset_config: str | None = field(default=None, metadata={"help": "Hub dataset configuration (name)."})
    dataset_split: str = field(default="train", metadata={"help": "Split to train on (alias --dataset_train_split)."})
    eval_dataset_name: str | None = field(default=None, metadata={"help": "Held-out pairs (same formats)."})
    eval_split: str = field(
        default="test",
        metadata={"help": "Split of eval_dataset_name (alias --dataset_test_split); with --eval_strategy and no "
                          "other held-out set, this split of dataset_name when it has one."},
    )
    eval_split_size: float = field(
        default=0.0,
        metadata={"help": "Held-out share (<1) or count (>=1) split off the training data when no eval set."},
    )
    max_length: int | None = field(default=1024, metadata={"help": "Max tokens of prompt + response."})
    max_prompt_length: int | None = field(default=None, metadata={"help": "Max prompt tokens (None: no cap)."})
    truncation_mode: str = field(
        default="keep_end",
        metadata={"help": "Prompt truncation: keep_end (drop the oldest tokens) or keep_start."},
    )
    max_train_samples: int | None = field(default=None, metadata={"help": "Use only the first N train pairs."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Use only the first N eval pairs."})

    # ---- objective, granularity (ADPO), POET: declared once, in ObjectiveSpec ------------------------
    spliced_options(ObjectiveSpec, locals())

    # ---- reference updates (TR-DPO) --------------------------------------------------------------
    sync_ref_model: bool = field(
        default=False, metadata={"help": "TR-DPO: every ref_model_sync_steps (with --rounds: every round), "
                                           "ref ← α·policy + (1−α)·ref."}
    )
    ref_model_mixup_alpha: float = field(default=0.6, metadata={"help": "TR-DPO mix-up weight α of the policy."})
    ref_model_sync_steps: int = field(default=512, metadata={"help": "TR-DPO: optimizer steps between syncs."})

    # ---- dynamics and reward calibration: declared once, in DynamicsSpec ---------------------------
    spliced_options(DynamicsSpec, locals())

    # ---- semi-online rounds (prefkit.online; docs/pairs.md) ----------------------------------------------
    rounds: int = field(default=0, metadata={"help": "Semi-online training: R rounds of sample → score → pair → "
                                                     "train from the current policy (0: train on dataset_name)."})
    online_prompts: str | None = field(default=None, metadata={"help": "Prompts for --rounds (prefkit pairs' format)."})
    online_scorer: str | None = field(
        default=None, metadata={"help": "Scorer for --rounds: math | regex:P | python:mod:fn | reward_model:PATH."}
    )
    samples_per_round: int = field(default=64, metadata={"help": "Prompts sampled per round (cycling the file)."})
    online_num_samples: int = field(default=4, metadata={"help": "Completions per prompt per round (k)."})
    online_pairing: str = field(default="best_worst", metadata={"help": "best_worst | all | random."})
    online_reference_fallback: str | None = field(
        default=None, metadata={"help": "Field with a reference solution, chosen for a prompt with no correct sample."}
    )
    online_max_new_tokens: int = field(default=256, metadata={"help": "Max generated tokens per completion."})
    online_temperature: float = field(default=1.0, metadata={"help": "Sampling temperature for --rounds."})
    online_reference_field: str = field(default="answer", metadata={"help": "Reference field for math/regex."})
    online_prompt_field: str = field(default="prompt", metadata={"help": "Prompt column (text or messages)."})
    online_backend: str = field(default="hf", metadata={"help": "Sampler for --rounds: hf (the policy's generate) | "
                                                                "vllm (the round's policy saved and loaded by vLLM)."})
    vllm_gpu_memory_utilization: float = field(
        default=0.3, metadata={"help": "Share of the GPU's memory vLLM may take (--online_backend vllm; TRL's name "
                                       "and default)."}
    )

    # ---- layouts and performance ------------------------------------------------------------------
    share_prompt: bool | None = field(
        default=None,
        metadata={"help": "Run the prompt once per pair (chosen and rejected in one row, 4D mask); false: 2 rows. "
                          "Default: on wherever it is exact on the model (docs/models.md); true on a model where it "
                          "is not is refused."},
    )
    pack_pairs: bool | None = field(
        default=None,
        metadata={"help": "With share_prompt: all pairs of a batch in one row, no padding, attention per pair. "
                          "Default: on wherever it is exact on the model and the segment attention is registered "
                          "(the command line registers it; in Python, prefkit.accel.install does)."},
    )
    pad_to_multiple_of: int | None = field(
        default=None,
        metadata={"help": "Round row lengths (and the LM head's token count) up to a multiple of this. Default "
                          "(command line): 64 for bf16 on a CPU (its bf16 kernels are built per shape, so unbucketed "
                          "lengths rebuild them every step), else none."},
    )
    precompute_ref_log_probs: bool = field(
        default=False, metadata={"help": "Compute reference log-probs once and cache them on disk."}
    )
    ref_cache_dir: str | None = field(default=None, metadata={"help": "Where cached reference log-probs go."})
    overlap_reference: bool = field(
        default=True,
        metadata={"help": "On CPU with a separate reference model (full fine-tuning): run its forward on a worker "
                          "thread alongside the policy forward, half the intra-op threads each (host layer, "
                          "prefkit.accel: the command line installs it)."},
    )

    # ---- run ---------------------------------------------------------------------------------------
    ignore_bias_buffers: bool = field(
        default=False, metadata={"help": "DDP: do not sync boolean buffers (TRL's fix for some LM mask buffers)."}
    )
    overwrite_output_dir: bool = field(default=False, metadata={"help": "Allow writing into a non-empty output_dir."})
    nan_policy: str = field(default="stop", metadata={"help": "On NaN/inf loss: stop (after saving) or skip."})
    debug_traceback: bool = field(default=False, metadata={"help": "Show Python tracebacks on errors."})

    # ---- TrainingArguments defaults that differ for preference training -----------------------------
    learning_rate: float = field(default=1e-6, metadata={"help": "Initial learning rate (DPOConfig default)."})
    logging_steps: float = field(default=10, metadata={"help": "Log every N steps."})
    logging_nan_inf_filter: bool = field(
        default=False, metadata={"help": "transformers' own check of every micro-step's loss, 2 host syncs each; "
                                         "--nan_policy already keeps a non-finite loss out of the logged mean "
                                         "(stop: raises; skip: logs the mean so far, as this filter does)."}
    )
    remove_unused_columns: bool = field(default=False, metadata={"help": "Keep all dataset columns."})

    def __post_init__(self) -> None:
        if isinstance(self.loss_type, str):
            self.loss_type = [s.strip() for s in self.loss_type.split(",") if s.strip()]
        # checked here, as DPOConfig checks it, so that a script fails where it builds the config
        if self.loss_weights is not None and len(self.loss_weights) != len(self.loss_type):
            raise ConfigError(f"--loss_weights: {len(self.loss_weights)} weights for {len(self.loss_type)} loss types")
        if isinstance(self.lora_target_modules, str):
            self.lora_target_modules = [s.strip() for s in self.lora_target_modules.split(",") if s.strip()]
        if self.output_dir is None:
            self.output_dir = "outputs/prefkit"
        self.bf16 = bool(self.bf16)
        super().__post_init__()

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        """The dtype that --bf16 / --fp16 autocast matmuls to; None without mixed precision."""
        return torch.bfloat16 if self.bf16 else torch.float16 if self.fp16 else None


def _default(f: dataclasses.Field) -> object:
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


_DEFAULTS = {f.name: _default(f) for f in dataclasses.fields(PrefConfig) if f.init}
_dataclass_init = PrefConfig.__init__


@functools.wraps(_dataclass_init)
def _init_with_trl_names(self: PrefConfig, *args, **kwargs) -> None:
    # TRL's names (padding_free, warmup_ratio, …) resolve here through the table the command line reads
    # (prefkit.aliases), so PrefConfig(padding_free=True) means what --padding_free true means
    _dataclass_init(self, *args, **resolve_names(kwargs, _DEFAULTS))


PrefConfig.__init__ = _init_with_trl_names  # type: ignore[method-assign]


def option_names() -> list[str]:
    return [f.name for f in dataclasses.fields(PrefConfig) if f.init]


TRAINER_GROUP = "trainer options (transformers TrainingArguments, as in TRL's DPOConfig)"

# The named groups of `prefkit train --help`, in the order it shows them: title → the group's first field. A group
# runs, in the order PrefConfig declares its fields, up to the next group's first field, so a new field lands in
# the group of the section it is written in. TrainingArguments' own fields form TRAINER_GROUP.
OPTION_GROUPS: dict[str, str] = {
    "objective / loss": "beta",
    "granularity (ADPO)": "granularity",
    "POET": "poet",
    "reference updates (TR-DPO)": "sync_ref_model",
    "dynamics / reward calibration": "dynamics_steps",
    "semi-online rounds (--rounds)": "rounds",
    "layouts and performance": "share_prompt",
    "model and LoRA": "model_name_or_path",
    "data": "dataset_name",
    "run": "ignore_bias_buffers",
    TRAINER_GROUP: "learning_rate",  # the TrainingArguments defaults PrefConfig changes
}


@functools.cache
def option_groups() -> dict[str, str]:
    """Option name → the title of its group in the help (:data:`OPTION_GROUPS`)."""
    declared = list(PrefConfig.__dict__["__annotations__"])  # PrefConfig's own, in the order of the class body
    starts = sorted((declared.index(first), title) for title, first in OPTION_GROUPS.items())
    groups = {name: next(t for i, t in reversed(starts) if i <= pos) for pos, name in enumerate(declared)}
    return {name: groups.get(name, TRAINER_GROUP) for name in option_names()}


def validate_config(cfg: PrefConfig) -> None:
    """Reject invalid model, LoRA and trainer options at start-up, naming the option to change. The objective,
    dynamics and data options are checked beside their specs, and combinations across them in one place:
    :func:`prefkit.spec.resolve_run` runs all of it, once per run."""

    def bad(option: str, msg: str) -> None:
        raise ConfigError(f"--{option}: {msg}")

    _check_ranges(cfg, bad)
    if cfg.dtype not in ("auto", "float32", "bfloat16", "float16"):
        bad("dtype", f"must be auto, float32, bfloat16 or float16, got {cfg.dtype!r}")
    if cfg.eval_split_size < 0:
        bad("eval_split_size", f"must be >= 0, got {cfg.eval_split_size}")
    if cfg.eval_split_size >= 1 and cfg.eval_split_size != int(cfg.eval_split_size):
        bad("eval_split_size", f"a share below 1 or a whole count of pairs, got {cfg.eval_split_size}")
    if cfg.nan_policy not in ("stop", "skip"):
        bad("nan_policy", f"must be stop or skip, got {cfg.nan_policy!r}")
    if cfg.lora_r <= 0:
        bad("lora_r", f"must be positive, got {cfg.lora_r}")
    if cfg.lora_task_type != "CAUSAL_LM":
        bad("lora_task_type", f"prefkit trains causal LMs: must be CAUSAL_LM, got {cfg.lora_task_type!r}")
    if (cfg.load_in_4bit or cfg.load_in_8bit) and not cfg.use_peft:
        bad("load_in_4bit" if cfg.load_in_4bit else "load_in_8bit",
            "quantized weights cannot be trained directly; add --use_peft (QLoRA)")
    _check_loggers(cfg, bad)


# option → smallest allowed value (None values mean "not set" and are left alone)
_AT_LEAST = {
    "per_device_train_batch_size": 1, "per_device_eval_batch_size": 1, "gradient_accumulation_steps": 1,
    "max_train_samples": 1, "max_eval_samples": 1, "lora_alpha": 1,
    "ref_model_sync_steps": 1, "samples_per_round": 1,
    "online_num_samples": 2, "online_max_new_tokens": 1, "rounds": 0, "warmup_steps": 0,
    "learning_rate": 0, "weight_decay": 0, "max_grad_norm": 0, "online_temperature": 0,
    "num_train_epochs": 0,
}


def _check_ranges(cfg: PrefConfig, bad) -> None:
    """Every numeric option within its range, before anything loads (a batch size of 0 would otherwise divide by
    zero at step 0, a negative --max_prompt_length silently drop a prompt's first tokens)."""
    import math

    for option, low in _AT_LEAST.items():
        value = getattr(cfg, option, None)
        if value is None:
            continue
        if isinstance(value, float) and not math.isfinite(value):
            bad(option, f"must be a finite number, got {value}")
        if value < low:
            bad(option, f"must be at least {low}, got {value}")
    if not 0.0 <= cfg.lora_dropout < 1.0:
        bad("lora_dropout", f"must be in [0, 1), got {cfg.lora_dropout}")
    if not 0.0 <= cfg.ref_model_mixup_alpha <= 1.0:
        bad("ref_model_mixup_alpha", f"must be in [0, 1], got {cfg.ref_model_mixup_alpha}")
    if cfg.max_steps == 0 or (cfg.max_steps < 0 and cfg.num_train_epochs <= 0):
        bad("max_steps", f"gives no training steps (max_steps {cfg.max_steps}, num_train_epochs "
            f"{cfg.num_train_epochs}); pass --max_steps N or --num_train_epochs N")
    if cfg.fp16 and (cfg.use_cpu or not torch.cuda.is_available()):
        bad("fp16", "fp16 mixed precision needs a CUDA GPU and this run is on the CPU; drop it (or pass --bf16 true "
            "where the CPU has fast bf16)")


# --report_to name → the package to install, where it differs
_LOGGER_PACKAGES = {"azure_ml": "azureml-core", "neptune": "neptune", "flyte": "flytekit", "kubeflow": "kubeflow"}


def _check_loggers(cfg: PrefConfig, bad) -> None:
    """A --report_to logger whose package is missing fails here, on one line, instead of in Trainer's start-up."""
    from transformers.integrations.integration_utils import (
        INTEGRATION_TO_CALLBACK,
        get_available_reporting_integrations,
    )

    available = set(get_available_reporting_integrations())
    for name in cfg.report_to or []:
        if name not in INTEGRATION_TO_CALLBACK:
            bad("report_to", f"unknown logger {name!r}; one of {', '.join(INTEGRATION_TO_CALLBACK)}, all or none")
        if name not in available:
            bad("report_to", f"{name} is not installed: pip install {_LOGGER_PACKAGES.get(name, name.replace('_', '-'))}")
