"""The `prefkit train` and `prefkit eval` jobs: load everything, check it all up front, train, report."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from prefkit import accel
from prefkit.card import write_model_card
from prefkit.config import PrefConfig
from prefkit.data import (
    DataSpec,
    PairCollator,
    bundled_sample_path,
    load_rows,
    prepare_dataset,
    split_train_eval,
)
from prefkit.data.load import has_split
from prefkit.data.types import SkipReport
from prefkit.errors import ConfigError, DataError, ModelError, one_line
from prefkit.evaluate import EvalResult, PairLogpSums, batches_of, pair_logp_sums, summarize
from prefkit.files import atomic_write_text, check_writable_dir, output_dir_lock
from prefkit.layouts import Layout, resolve_layout
from prefkit.models import is_peft_model, load_causal_lm, load_tokenizer, resolve_model_path
from prefkit.online import check_no_online_options, train_rounds, wants_rounds
from prefkit.plot import plot_runs
from prefkit.runsetup import (
    CONFIG_FILE,
    DATA_FINGERPRINT,
    LOCK_FILE,
    check_output_dir,
    check_same_run,
    data_fingerprint,
    load_model_and_tokenizer,
    load_reference_model,
    resolved_config_dict,
    run_finished,
    verify_checkpoint,
    weight_dtype,
)
from prefkit.spec import RunSpec, resolve_run
from prefkit.trainer import COMPLETE_MARKER, PrefTrainer, peak_memory_mb

logger = logging.getLogger("prefkit")

@dataclass
class LoadedData:
    train: object
    eval: object | None
    reports: dict[str, SkipReport]


def resolve_checkpoint(cfg: PrefConfig) -> str | None:
    ckpt = cfg.resume_from_checkpoint
    if not ckpt:
        return None
    if ckpt in ("latest", "last", "true", "True"):
        complete = sorted(
            (p for p in Path(cfg.output_dir).glob("checkpoint-*") if (p / COMPLETE_MARKER).is_file()),
            key=lambda p: int(p.name.split("-")[-1]) if p.name.split("-")[-1].isdigit() else -1,
        )
        if not complete:
            raise ConfigError(f"--resume_from_checkpoint: no complete checkpoint-* directory in {cfg.output_dir}")
        return str(complete[-1])
    if not Path(ckpt).is_dir():
        raise ConfigError(f"--resume_from_checkpoint: {ckpt} is not a directory")
    if not (Path(ckpt) / COMPLETE_MARKER).is_file():
        raise ConfigError(f"--resume_from_checkpoint: {ckpt} is incomplete (the save was interrupted)")
    return ckpt


def eval_dataset_source(cfg: PrefConfig) -> str | None:
    """Where held-out pairs are read from: --eval_dataset_name, else (as `trl dpo` does when asked to evaluate)
    dataset_name's --eval_split split; None when they are split off the training data or not wanted. Refuses
    --eval_strategy without any held-out set, saying how to get one."""
    if cfg.eval_dataset_name or cfg.eval_split_size > 0 or cfg.eval_strategy == "no":
        return cfg.eval_dataset_name
    name = cfg.dataset_name or bundled_sample_path()
    if not has_split(name, cfg.eval_split):
        raise ConfigError(
            f"--eval_strategy {cfg.eval_strategy.value}: needs held-out pairs and {name} has no {cfg.eval_split!r} "
            "split; pass --eval_split_size 0.1 (split them off the training data), --eval_dataset_name FILE, "
            "--dataset_test_split SPLIT, or --eval_strategy no"
        )
    return name


def load_data(cfg: PrefConfig, tokenizer, spec: DataSpec) -> LoadedData:
    name = cfg.dataset_name or bundled_sample_path()
    reports: dict[str, SkipReport] = {}
    rows = load_rows(name, cfg.dataset_split, trust_remote_code=cfg.trust_remote_code, config_name=cfg.dataset_config)
    train, reports["train"] = prepare_dataset(rows, tokenizer, spec, source=name, max_samples=cfg.max_train_samples)
    evald = None
    eval_source = eval_dataset_source(cfg)
    if eval_source:
        erows = load_rows(eval_source, cfg.eval_split, trust_remote_code=cfg.trust_remote_code,
                          config_name=cfg.dataset_config if eval_source == name else None)
        evald, reports["eval"] = prepare_dataset(
            erows, tokenizer, spec, source=eval_source, max_samples=cfg.max_eval_samples
        )
    elif cfg.eval_split_size > 0:
        train, evald = split_train_eval(train, cfg.eval_split_size, cfg.seed)
        if evald is not None and cfg.max_eval_samples is not None:
            evald = evald.select(range(min(cfg.max_eval_samples, len(evald))))
    if len(train) == 0:
        raise DataError("no training pairs left after the held-out split", source=name)
    return LoadedData(train, evald, reports)


def _fmt(x: float | None, pct: bool = False) -> str:
    if x is None:
        return "-"
    return f"{100 * x:.1f}%" if pct else f"{x:.4f}"


def report_table(before: EvalResult | None, after: EvalResult | None) -> str:
    rows = [
        ("ranking accuracy (mean token log-prob)", "ranking_accuracy", True),
        ("mean log-prob / token, chosen", "logps_chosen_mean", False),
        ("mean log-prob / token, rejected", "logps_rejected_mean", False),
        ("implicit-reward accuracy", "implicit_reward_accuracy", True),
        ("implicit-reward margin", "reward_margin", False),
    ]
    n = (after or before).num_pairs if (after or before) else 0
    lines = [f"held-out pairs: {n}", f"{'metric':<40} {'before':>10} {'after':>10}"]
    for label, key, pct in rows:
        b = getattr(before, key) if before else None
        a = getattr(after, key) if after else None
        lines.append(f"{label:<40} {_fmt(b, pct):>10} {_fmt(a, pct):>10}")
    return "\n".join(lines)


def train_main(cfg: PrefConfig) -> dict:
    """Run a whole training job: resolve and check the options, prepare, train, report. Everything that can be
    checked is checked before training starts."""
    if wants_rounds(cfg):
        check_writable_dir(Path(cfg.output_dir), "--output_dir", create=True)
        with output_dir_lock(Path(cfg.output_dir), LOCK_FILE):
            return train_rounds(cfg)
    spec = resolve_run(cfg)
    check_no_online_options(cfg)
    check_output_dir(cfg)
    with output_dir_lock(Path(cfg.output_dir), LOCK_FILE):
        eval_dataset_source(cfg)  # before the model loads
        checkpoint = resolve_checkpoint(cfg)
        if checkpoint is not None and _resume_finished(cfg, checkpoint):
            return {"train": {}, "before": None, "after": None, "nothing_to_do": True}
        t0 = time.time()
        job = prepare_job(cfg, spec.data)
        trainer = build_trainer(job, spec)
        held_out = score_before(job, trainer)
        record_run(job, trainer, checkpoint)
        metrics = fit(job, trainer, checkpoint, t0)
        after = score_after(job, trainer, held_out)
        report(job, trainer, metrics, held_out.before, after)
        return {"train": metrics, "before": held_out.before, "after": after}


@dataclass
class Job:
    """What a training job has loaded: its options, models, data and layout."""

    cfg: PrefConfig
    run_forwards: Callable | None
    model_path: str
    model: torch.nn.Module
    tokenizer: object
    data: LoadedData
    ref_model: torch.nn.Module | None
    layout: Layout


@dataclass
class HeldOut:
    """The held-out pairs' scores before training (the policy *is* the reference then, unless a separate one is
    given: one pass serves as "before" metrics and as the reference scores of "after")."""

    before: EvalResult | None = None
    ref_scores: PairLogpSums | None = None


def _resume_finished(cfg: PrefConfig, checkpoint: str) -> bool:
    """Check the checkpoint and the options against the run's; True (and say so) when the run is finished."""
    state = verify_checkpoint(checkpoint, cfg)
    check_same_run(cfg, Path(checkpoint).parent)
    if not run_finished(state):
        return False
    print(f"nothing to do: {checkpoint} is step {state['global_step']} of {state['max_steps']}, the end of the run; "
          f"its weights are in {cfg.output_dir}")
    return True


def prepare_job(cfg: PrefConfig, data_spec: DataSpec) -> Job:
    host = accel.install(cfg)
    model_path, model, tokenizer = load_model_and_tokenizer(cfg)
    data = load_data(cfg, tokenizer, data_spec)
    for name, rep in data.reports.items():
        logger.info("%s data: %s", name, rep.summary())
    ref_model = load_reference_model(cfg)
    layout = resolve_layout(cfg.share_prompt, cfg.pack_pairs, model, ref_model)
    if not getattr(model, "is_quantized", False):  # bitsandbytes placed it at load and refuses .to
        model.to(torch.device(cfg.device))
    return Job(cfg, host.run_forwards, model_path, model, tokenizer, data, ref_model, layout)


def _has_held_out(job: Job) -> bool:
    return job.data.eval is not None and len(job.data.eval) > 0


def score_before(job: Job, trainer: PrefTrainer) -> HeldOut:
    """The held-out metrics of the starting policy, scored by the trainer as it scores after training."""
    if not _has_held_out(job):
        return HeldOut()
    start = trainer.held_out_logp_sums(job.data.eval, job.model, desc="held-out, before")
    ref_scores = start if job.ref_model is None else trainer.held_out_logp_sums(
        job.data.eval, trainer.ref_model, desc="reference")
    held_out = HeldOut(summarize(start, None, job.cfg.beta), ref_scores)
    print("\n" + report_table(held_out.before, None) + "\n", flush=True)
    return held_out


def build_trainer(job: Job, spec: RunSpec) -> PrefTrainer:
    cfg = job.cfg
    try:  # with --precompute_ref_log_probs the trainer computes (or reads) them, sharded across processes
        return PrefTrainer(
            model=job.model, args=cfg, train_dataset=job.data.train, processing_class=job.tokenizer, ref_model=job.ref_model,
            eval_dataset=job.data.eval if cfg.eval_strategy != "no" else None, run_forwards=job.run_forwards,
            layout=job.layout, spec=spec,
        )
    except (ValueError, ImportError) as e:  # Trainer's own checks of the options
        raise ConfigError(one_line(e)) from e


def record_run(job: Job, trainer: PrefTrainer, checkpoint: str | None) -> None:
    """A new run saves its options and data fingerprint; a resumed one must train on the same pairs."""
    cfg, out = job.cfg, Path(job.cfg.output_dir)
    fingerprint = data_fingerprint(job.data.train)
    if checkpoint is not None:
        saved = Path(checkpoint).parent / DATA_FINGERPRINT
        if saved.is_file() and saved.read_text().strip() != fingerprint:
            raise ConfigError(f"--resume_from_checkpoint: the training pairs differ from those the run in "
                              f"{Path(checkpoint).parent} started with (--dataset_name {cfg.dataset_name}); resume "
                              "with the same data, or start a new run in another --output_dir")
    elif trainer.is_world_process_zero():
        atomic_write_text(out / CONFIG_FILE, yaml.safe_dump(resolved_config_dict(cfg), sort_keys=True))
        atomic_write_text(out / DATA_FINGERPRINT, fingerprint + "\n")


def fit(job: Job, trainer: PrefTrainer, checkpoint: str | None, t0: float) -> dict:
    """Train, save the model, and write train_results.json; returns its metrics."""
    result = trainer.train(resume_from_checkpoint=checkpoint)
    trainer.save_model(job.cfg.output_dir)
    metrics = dict(result.metrics)
    metrics["peak_memory_mb"] = peak_memory_mb()
    metrics["total_runtime"] = time.time() - t0
    metrics["skipped_pairs"] = {k: dict(r.skipped) for k, r in job.data.reports.items()}
    (Path(job.cfg.output_dir) / "train_results.json").write_text(json.dumps(metrics, indent=2))
    return metrics


def score_after(job: Job, trainer: PrefTrainer, held_out: HeldOut) -> EvalResult | None:
    if not _has_held_out(job):
        return None
    end = trainer.held_out_logp_sums(job.data.eval, job.model, desc="held-out, after")
    after = summarize(end, held_out.ref_scores, job.cfg.beta)
    (Path(job.cfg.output_dir) / "eval_results.json").write_text(json.dumps(
        {"before": held_out.before.to_dict() if held_out.before else None, "after": after.to_dict()}, indent=2))
    return after


def report(job: Job, trainer: PrefTrainer, metrics: dict, before: EvalResult | None,
           after: EvalResult | None) -> None:
    """The model card, the plots and the summary printed at the end."""
    cfg, out = job.cfg, Path(job.cfg.output_dir)
    if trainer.is_world_process_zero():  # after save_model, whose peft save writes a placeholder README.md
        write_model_card(cfg, cfg.output_dir, model_path=job.model_path, is_adapter=is_peft_model(job.model),
                         train_metrics=metrics, eval_after=after.to_dict() if after else None)
    plots = plot_runs([cfg.output_dir], str(out / "plots"))
    print("\n" + report_table(before, after), flush=True)
    for name, rep in job.data.reports.items():
        print(f"{name} data: {rep.summary()}")
    print(f"\nmodel:   {cfg.output_dir}  ({'LoRA adapter' if is_peft_model(job.model) else 'full model'})")
    print(f"metrics: {out / 'metrics.jsonl'}")
    print(f"results: {out / 'train_results.json'}")
    for p in plots:
        print(f"plot:    {p}")


def eval_main(cfg: PrefConfig, output_file: str | None = None, *, given: set[str] | frozenset = frozenset()) -> dict:
    """`prefkit eval`: metrics of a trained model (or adapter) on a preference dataset, as JSON. A run's saved
    ``beta`` applies unless ``given`` (the options the user set) names it; the reference is the run's."""
    path = cfg.model_name_or_path
    if path is None:
        raise ConfigError("--model_name_or_path: required for eval (a trained output dir or a model)")
    if "beta" not in given:
        cfg.beta = saved_run_config(path).get("beta", cfg.beta)
    spec = resolve_run(cfg)
    out = Path(output_file) if output_file else (Path(path) / "eval_results.json" if Path(path).is_dir() else None)
    if out is not None:  # checked before the work, not after the whole eval has run
        check_writable_dir(out.parent, "--output_file" if output_file else "--model_name_or_path", create=False)
    accel.install(cfg)
    model, tokenizer, reference = load_for_eval(cfg)
    rows = load_rows(cfg.dataset_name or bundled_sample_path(), cfg.dataset_split)
    ds, report = prepare_dataset(rows, tokenizer, spec.data, source=cfg.dataset_name or "bundled sample",
                                 max_samples=cfg.max_eval_samples)
    layout = resolve_layout(cfg.share_prompt, cfg.pack_pairs, model,
                            reference if isinstance(reference, torch.nn.Module) else None)
    collator = PairCollator.for_spec(spec.data, tokenizer, layout, training=False)

    def scores(scorer: torch.nn.Module, desc: str) -> PairLogpSums:
        batches = batches_of(ds, collator, cfg.per_device_eval_batch_size)
        return pair_logp_sums(scorer, batches, desc=desc, autocast=cfg.autocast_dtype)

    policy = scores(model, "policy")
    ref_scores: PairLogpSums | None = None
    if reference == "adapter":
        with model.disable_adapter():
            ref_scores = scores(model, "reference")
    elif reference is not None:
        ref_scores = scores(reference, "reference")
    result = summarize(policy, ref_scores, cfg.beta).to_dict()
    result["skipped"] = dict(report.skipped)
    if out is not None:
        out.write_text(json.dumps(result, indent=2))
    return result


def saved_run_config(path: str) -> dict:
    """The options a prefkit run saved in its output dir ({} for any other model)."""
    saved = Path(path) / CONFIG_FILE
    return (yaml.safe_load(saved.read_text()) or {}) if saved.is_file() else {}


def saved_reference(path: str) -> str | None:
    """The reference a saved run trained against: its ``ref_model_name_or_path``, else (a full fine-tuning run)
    the model it started from; None for an adapter run without one (its reference is the adapter disabled)."""
    saved = saved_run_config(path)
    is_adapter = (Path(path) / "adapter_config.json").is_file()
    return saved.get("ref_model_name_or_path") or (None if is_adapter else saved.get("model_name_or_path"))


def load_for_eval(cfg: PrefConfig):
    """(model, tokenizer, reference). The reference comes only from the user's options: ``--ref_model_name_or_path``
    (``none``: no reference), else the adapter disabled ('adapter') for an adapter dir. When the run's saved
    options name a reference and the user named none, it is refused with that name: a saved file must not pick
    a model that is then loaded with the user's --trust_remote_code."""
    path = Path(cfg.model_name_or_path)
    saved_ref = saved_reference(str(path))
    ref_name = cfg.ref_model_name_or_path
    if ref_name is None and saved_ref:  # before any loading: the refusal costs nothing
        raise ConfigError(f"--ref_model_name_or_path: the run in {path} trained against {saved_ref} (its "
                          f"{CONFIG_FILE}); pass --ref_model_name_or_path {saved_ref} to score against it, or "
                          "--ref_model_name_or_path none for metrics without a reference")
    dtype = weight_dtype(cfg)
    is_adapter = (path / "adapter_config.json").is_file()
    if is_adapter:
        from peft import AutoPeftModelForCausalLM

        if not (path / "adapter_model.safetensors").is_file() and not cfg.allow_pickle:
            raise ModelError(f"{path}: no adapter_model.safetensors (pickled adapter weights run code when loaded); "
                             "pass --allow_pickle true if you trust them")
        try:
            model = AutoPeftModelForCausalLM.from_pretrained(str(path), dtype=dtype,
                                                             use_safetensors=None if cfg.allow_pickle else True)
        except Exception as e:
            raise ModelError(f"{path}: cannot load the adapter and its base model ({e})") from e
        tokenizer = load_tokenizer(str(path))
    else:
        resolved = resolve_model_path(str(path))
        model = load_causal_lm(resolved, dtype=dtype, trust_remote_code=cfg.trust_remote_code,
                               allow_pickle=cfg.allow_pickle)
        tokenizer = load_tokenizer(resolved, trust_remote_code=cfg.trust_remote_code)
    if ref_name == "none":
        ref_name = None
    reference: object = "adapter" if is_adapter and cfg.ref_model_name_or_path is None else None
    if ref_name:
        reference = load_causal_lm(resolve_model_path(ref_name), dtype=dtype, trust_remote_code=cfg.trust_remote_code,
                                   allow_pickle=cfg.allow_pickle)
    model.to(cfg.device)
    if reference is not None and reference != "adapter":
        reference.to(cfg.device)
    return model, tokenizer, reference
