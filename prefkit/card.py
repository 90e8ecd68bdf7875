"""The model card written to ``output_dir/README.md`` after training, in the shape of TRL's cards.

It is written after ``save_model``, since peft's ``save_pretrained`` writes its own placeholder card there.
"""

from __future__ import annotations

import importlib.metadata
import json
import re
from pathlib import Path

from prefkit.models import DEFAULT_GGUF_FILE

# the embedded default model (a GGUF file of this model) by its hub id
DEFAULT_MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")

_PREFKIT_BIBTEX = """@misc{prefkit,
    title = {{prefkit: preference alignment of Hugging Face causal LMs}},
}"""
_DPO_BIBTEX = """@inproceedings{rafailov2023direct,
    title     = {{Direct Preference Optimization: Your Language Model is Secretly a Reward Model}},
    author    = {Rafael Rafailov and Archit Sharma and Eric Mitchell and Christopher D. Manning and Stefano Ermon and Chelsea Finn},
    year      = 2023,
    booktitle = {Advances in Neural Information Processing Systems 36 (NeurIPS 2023)},
    eprint    = {2305.18290},
    archivePrefix = {arXiv},
}"""
# prefkit's own options → (label, arXiv id) of the paper they implement
_OPTION_PAPERS = {
    "granularity": ("ADPO: feedback granularity", "2602.09533"),
    "poet": ("POET: truncation to the shorter response", "2506.09457"),
    "reward_calibration": ("Preference dynamics and reward calibration", "2604.18239"),
    "ld_alpha": ("LD-DPO", "2409.06411"),
    "f_divergence_type": ("f-DPO", "2309.16240"),
    "use_weighting": ("WPO", "2406.11827"),
    "sync_ref_model": ("TR-DPO", "2404.09656"),
}


def base_model_id(model_name_or_path: str | None, model_dir: str | None = None) -> str | None:
    """The hub id of the base model: the embedded default's, a hub id as given, or the ``_name_or_path`` a local
    directory's config records when that is a hub id; None when only a local path is known."""
    if model_name_or_path is None or model_name_or_path.endswith(DEFAULT_GGUF_FILE):
        return DEFAULT_MODEL_ID
    if _HUB_ID.match(model_name_or_path) and not Path(model_name_or_path).exists():
        return model_name_or_path
    config = Path(model_dir or model_name_or_path) / "config.json"
    if config.is_file():
        recorded = json.loads(config.read_text()).get("_name_or_path", "")
        if _HUB_ID.match(recorded) and not Path(recorded).exists():
            return recorded
    return None


def _bibtex(label: str, arxiv: str) -> str:
    key = "arxiv" + arxiv.replace(".", "_")
    return (f"@misc{{{key},\n    title         = {{{{{label}}}}},\n    eprint        = {{{arxiv}}},\n"
            f"    archivePrefix = {{arXiv}},\n}}")


def _versions() -> list[str]:
    out = []
    for pkg in ("prefkit", "transformers", "torch", "datasets", "peft", "accelerate"):
        try:
            out.append(f"- {pkg}: {importlib.metadata.version(pkg)}")
        except importlib.metadata.PackageNotFoundError:
            continue
    return out


def _method(cfg) -> tuple[list[str], list[str]]:
    """Lines describing the objective, and the BibTeX entries of the papers it uses."""
    from prefkit.objectives.registry import LINKS

    lines = [f"- loss_type: {', '.join(cfg.loss_type)}"
             + (f" (weights {', '.join(map(str, cfg.loss_weights))})" if cfg.loss_weights else ""),
             f"- β (beta): {cfg.beta}",
             f"- feedback granularity: {cfg.granularity}"
             + {"static": f" (window {cfg.window_size})", "adaptive": f" (m = {cfg.num_segments})"}.get(cfg.granularity, ""),
             f"- POET: {'on' if cfg.poet else 'off'}",
             f"- reward calibration (RC): {'on' if cfg.reward_calibration else 'off'}"]
    for option in ("label_smoothing", "rpo_alpha", "ld_alpha", "use_weighting", "sync_ref_model"):
        value = getattr(cfg, option)
        if value:
            lines.append(f"- {option}: {value}")
    if cfg.f_divergence_type != "reverse_kl":
        lines.append(f"- f_divergence_type: {cfg.f_divergence_type}")
    bib, seen = [_DPO_BIBTEX], {"2305.18290"}
    for t in cfg.loss_type + (["sft"] if cfg.rpo_alpha else []):
        spec = LINKS[t]
        if spec.arxiv not in seen:
            seen.add(spec.arxiv)
            bib.append(_bibtex(spec.paper, spec.arxiv))
    used = {"granularity": cfg.granularity != "response", "poet": cfg.poet,
            "reward_calibration": cfg.reward_calibration, "ld_alpha": cfg.ld_alpha is not None,
            "f_divergence_type": cfg.f_divergence_type != "reverse_kl", "use_weighting": cfg.use_weighting,
            "sync_ref_model": cfg.sync_ref_model}
    for option, (label, arxiv) in _OPTION_PAPERS.items():
        if used[option] and arxiv not in seen:
            seen.add(arxiv)
            bib.append(_bibtex(label, arxiv))
    return lines, [*bib, _PREFKIT_BIBTEX]


def _metrics_table(metrics: dict) -> list[str]:
    rows = [(k, v) for k, v in metrics.items() if isinstance(v, int | float) and not isinstance(v, bool)]
    return ["| metric | value |", "|---|---|", *(f"| {k} | {v:.6g} |" for k, v in rows)] if rows else ["(none)"]


def write_model_card(cfg, output_dir: str, *, model_path: str | None, is_adapter: bool, train_metrics: dict,
                     eval_after: dict | None) -> Path:
    """Write ``output_dir/README.md``: metadata, method, data, hyperparameters, metrics, versions, loading, BibTeX."""
    base = base_model_id(cfg.model_name_or_path, model_path)
    dataset = cfg.dataset_name or "the bundled HH-RLHF helpful-base sample (Anthropic/hh-rlhf)"
    hub_dataset = cfg.dataset_name if cfg.dataset_name and _HUB_ID.match(cfg.dataset_name) and not Path(
        cfg.dataset_name).exists() else (None if cfg.dataset_name else "Anthropic/hh-rlhf")
    tags = ["prefkit", "dpo", *[t for t in cfg.loss_type if t != "sigmoid"], "trl-compatible"]
    if is_adapter:
        tags.append("lora")
    front = ["---"]
    if base:
        front.append(f"base_model: {base}")
    if hub_dataset:
        front += ["datasets:", f"- {hub_dataset}"]
    front += [f"library_name: {'peft' if is_adapter else 'transformers'}", "tags:", *[f"- {t}" for t in tags], "---"]
    name = Path(output_dir).resolve().name
    method, bib = _method(cfg)
    hyper = {k: getattr(getattr(cfg, k), "value", getattr(cfg, k)) for k in ("learning_rate", "lr_scheduler_type", "warmup_steps", "num_train_epochs",
                                           "max_steps", "per_device_train_batch_size", "gradient_accumulation_steps",
                                           "max_length", "max_prompt_length", "seed", "use_peft", "lora_r",
                                           "lora_alpha", "bf16", "dtype")}
    if is_adapter:
        load = ["```python", "from peft import AutoPeftModelForCausalLM", "from transformers import AutoTokenizer", "",
                f'model = AutoPeftModelForCausalLM.from_pretrained("{name}")  # or the local path of this folder',
                f'tokenizer = AutoTokenizer.from_pretrained("{name}")', "```"]
    else:
        load = ["```python", "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
                f'model = AutoModelForCausalLM.from_pretrained("{name}")  # or the local path of this folder',
                f'tokenizer = AutoTokenizer.from_pretrained("{name}")', "```"]
    body = [
        f"# {name}", "",
        f"This model is {'a LoRA adapter on' if is_adapter else 'a fine-tuned version of'} "
        + (f"[{base}](https://huggingface.co/{base})" if base else f"a local model ({Path(cfg.model_name_or_path).name})")
        + f", trained on preference pairs from {dataset} with prefkit.", "",
        "## Quick start", "", *load, "",
        "## Training procedure", "", "Method:", "", *method, "",
        "Hyperparameters:", "", *[f"- {k}: {v}" for k, v in hyper.items()], "",
        "## Results", "", "Final training metrics:", "", *_metrics_table(train_metrics), "",
    ]
    if eval_after:
        body += ["Held-out pairs after training:", "", *_metrics_table(eval_after), ""]
    body += ["## Framework versions", "", *_versions(), "", "## Citations", "", "```bibtex", "\n\n".join(bib), "```", ""]
    path = Path(output_dir) / "README.md"
    path.write_text("\n".join(front + [""] + body))
    return path
