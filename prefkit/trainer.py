"""PrefTrainer: a ``transformers.Trainer`` that optimises any prefkit objective.

It knows nothing of loss details: per batch it gets policy (and reference) per-token log-probs, lets the
dynamics monitor calibrate them, calls the objective, and logs the objective's detached statistics.
Checkpointing, schedulers, gradient accumulation, mixed precision and distributed launch are transformers'.
It changes no process-wide state; the host layer (:mod:`prefkit.accel`) comes in only through ``run_forwards``.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import resource
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from transformers import PreTrainedModel, Trainer, TrainerCallback
from transformers.integrations import is_deepspeed_zero3_enabled

from prefkit.config import PrefConfig, validate_config
from prefkit.data import PairCollator, prepare_dataset
from prefkit.data.types import PairBatch, SkipReport
from prefkit.dynamics import DynamicsMonitor
from prefkit.errors import ConfigError, TrainingFault
from prefkit.files import atomic_write_text, read_jsonl_tolerant
from prefkit.layouts import Layout, resolve_layout
from prefkit.logprobs import compute_pair_logps
from prefkit.models import is_peft_model
from prefkit.objectives import build_objective
from prefkit.objectives.types import PairLogps

logger = logging.getLogger(__name__)

STATE_FILE = "prefkit_state.pt"
# Written last, atomically: a checkpoint without it was interrupted mid-save and is never resumed from.
COMPLETE_MARKER = "prefkit_checkpoint_complete"


def _reference_copy(model: nn.Module) -> nn.Module:
    """A frozen copy of the starting policy. Under ZeRO-3 the policy's parameters are already partitioned, so a
    copy would hold empty shards: the reference is loaded again (partitioned the same way) instead."""
    if not is_deepspeed_zero3_enabled():
        return copy.deepcopy(model)
    if not getattr(model, "name_or_path", ""):
        raise ConfigError("under DeepSpeed ZeRO-3 the reference is reloaded from the policy's path; "
                          "this model has none, so pass ref_model= explicitly")
    return type(model).from_pretrained(model.name_or_path, dtype=model.dtype)


def _precast_linears(ref: nn.Module, dtype: torch.dtype) -> None:
    """Store a frozen reference's linear weights in the autocast dtype. Autocast casts a linear's weight to that
    dtype on every call (it caches casts only of weights that require grad), so the log-probs are the same bit
    for bit, those weights take half the memory and the casts are skipped. A weight that another module also
    uses (a head tied to the input embedding, looked up outside autocast) keeps its dtype."""
    shared = {id(p) for m in ref.modules() if not isinstance(m, nn.Linear) for p in m.parameters(recurse=False)}
    for m in ref.modules():
        if isinstance(m, nn.Linear) and id(m.weight) not in shared:
            m.to(dtype)


def _zero3_reference(ref: nn.Module, accelerator) -> nn.Module:
    """The reference as a ZeRO-3 DeepSpeed engine without optimizer: sharded like the policy, its forward gathers
    the parameters layer by layer."""
    import deepspeed

    config = copy.deepcopy(accelerator.state.deepspeed_plugin.deepspeed_config)
    for key in ("optimizer", "scheduler"):
        config.pop(key, None)
    config["zero_optimization"].pop("offload_optimizer", None)
    engine, *_ = deepspeed.initialize(model=ref, config=config)
    engine.eval()  # DeepSpeedEngine.eval returns None, unlike Module.eval
    return engine


class MetricsFileCallback(TrainerCallback):
    """Appends every log to ``output_dir/metrics.jsonl``; on resume drops lines past the checkpoint."""

    def __init__(self, path: Path):
        self.path = path

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero and self.path.exists():
            records, _ = read_jsonl_tolerant(self.path)
            kept = [r for r in records if r.get("step", 0) <= state.global_step]
            atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        record = {"step": state.global_step, "epoch": state.epoch, **logs}
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")


class SyncReferenceCallback(TrainerCallback):
    """TR-DPO (Gorbatovski et al. 2024, arXiv 2404.09656, eq. 3, soft update): every ``ref_model_sync_steps``
    optimizer steps, ref ← α·policy + (1 − α)·ref with α = ``ref_model_mixup_alpha`` (TRL's semantics)."""

    def __init__(self, trainer: PrefTrainer):
        self.trainer = trainer

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step % args.ref_model_sync_steps == 0:
            mix_into_reference(self.trainer.accelerator.unwrap_model(self.trainer.model), self.trainer.ref_model,
                               args.ref_model_mixup_alpha)


@torch.no_grad()
def mix_into_reference(policy: nn.Module, ref: nn.Module, alpha: float) -> None:
    """ref ← α·policy + (1 − α)·ref, parameter by parameter (same architecture)."""
    for p_ref, p in zip(ref.parameters(), policy.parameters(), strict=True):
        p_ref.mul_(1.0 - alpha).add_(p.to(p_ref.device, p_ref.dtype), alpha=alpha)


class PrefTrainer(Trainer):
    """Preference-optimisation trainer, used like TRL's DPOTrainer.

    ``model`` is a loaded causal LM (optionally a peft model). ``ref_model`` defaults to the starting policy:
    the same model with adapters disabled for peft, a frozen copy otherwise, or nothing when reference
    log-probs were precomputed (dataset columns ``ref_chosen_logps``/``ref_rejected_logps``).
    Datasets may be raw preference rows (prompt/chosen/rejected…) or already prepared by
    :func:`prefkit.data.prepare_dataset`. ``run_forwards(policy, reference)`` runs the two forwards of a step
    with a separate reference model and returns both results (default: one after the other); the host layer's
    plan (:func:`prefkit.accel.install`) runs them side by side on a CPU.
    """

    def __init__(
        self,
        model: PreTrainedModel | nn.Module,
        args: PrefConfig,
        train_dataset=None,
        eval_dataset=None,
        processing_class=None,
        ref_model: nn.Module | None = None,
        callbacks: list[TrainerCallback] | None = None,
        run_forwards: Callable | None = None,
        layout: Layout | None = None,
    ):
        validate_config(args)
        self.run_forwards = run_forwards
        self.objective = build_objective(args)
        self.skip_reports: dict[str, SkipReport] = {}
        train_dataset = self._prepared(train_dataset, processing_class, args, "train")
        eval_dataset = self._prepared(eval_dataset, processing_class, args, "eval")
        precomputed = train_dataset is not None and "ref_chosen_logps" in train_dataset.column_names
        if ref_model is None and self.objective.needs_reference and not is_peft_model(model) and not precomputed:
            ref_model = _reference_copy(model)
            if args.autocast_dtype is not None and not is_deepspeed_zero3_enabled():
                _precast_linears(ref_model, args.autocast_dtype)
        if ref_model is not None:
            ref_model.eval().requires_grad_(False)
        # decided once from the policy and the reference: a layout is used only where it is exact on both
        self.layout = layout or resolve_layout(args.share_prompt, args.pack_pairs, model, ref_model)
        collator = PairCollator.for_config(args, processing_class, self.layout)
        if args.disable_dropout:  # as TRL: noisy policy log-probs against a dropout-free reference bias the margin
            for m in [model, *([ref_model] if ref_model is not None else [])]:
                for mod in m.modules():
                    if isinstance(mod, nn.Dropout):
                        mod.p = 0.0
        self.ref_model = ref_model
        metrics_cb = MetricsFileCallback(Path(args.output_dir) / "metrics.jsonl")
        super().__init__(
            model=model,
            args=args,
            data_collator=collator,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            callbacks=[metrics_cb, *(callbacks or [])],
        )
        if self.ref_model is not None and is_deepspeed_zero3_enabled():
            self.ref_model = _zero3_reference(self.ref_model, self.accelerator)
        elif self.ref_model is not None:
            self.ref_model.to(self.args.device)
        probe = collator([train_dataset[i] for i in range(min(args.dynamics_probe_size, len(train_dataset)))]) if (
            train_dataset is not None and args.dynamics_steps > 0
        ) else None
        # RC statistics are batch means: reduce them over processes so every rank uses the same α
        reduce = (lambda t: self.accelerator.reduce(t.to(self.args.device), reduction="mean").cpu()) if (
            self.accelerator.num_processes > 1) else None
        self.monitor = DynamicsMonitor(
            args, self.objective, model, probe, self._probe_logps, reduce_mean=reduce,
            unwrap=self.accelerator.unwrap_model if self.accelerator.num_processes > 1 else None,
        )
        self._stats: dict[str, list[float]] = defaultdict(list)
        if args.sync_ref_model:
            if self.ref_model is None:
                raise ConfigError("--sync_ref_model needs a separate reference model to update (not a peft model "
                                  "with adapters disabled, not precomputed reference log-probs)")
            self.add_callback(SyncReferenceCallback(self))

    def _prepared(self, dataset, tokenizer, args: PrefConfig, name: str):
        if dataset is None or "prompt_ids" in dataset.column_names:
            return dataset
        if "__row__" not in dataset.column_names:
            dataset = dataset.add_column("__row__", list(range(len(dataset))))
        prepared, report = prepare_dataset(dataset, tokenizer, args, source=f"{name} dataset")
        self.skip_reports[name] = report
        (logger.warning if report.skipped else logger.info)("%s dataset: %s", name, report.summary())
        return prepared

    # -------------------------------------------------------------------------------------------------
    def _prepare_inputs(self, inputs: PairBatch) -> PairBatch:  # type: ignore[override]
        return inputs.to(self.args.device)

    def _probe_logps(self, model: nn.Module, batch: PairBatch) -> PairLogps:
        with self.accelerator.autocast():
            return compute_pair_logps(model, batch.to(self.args.device), want_sq=self.objective.spec.use_weighting)

    @contextlib.contextmanager
    def _reference(self, model: nn.Module):
        if self.ref_model is not None:
            yield self.ref_model
        else:
            unwrapped = self.accelerator.unwrap_model(model)
            with unwrapped.disable_adapter():
                yield model

    def reference_logps(self, model: nn.Module, batch: PairBatch) -> tuple[torch.Tensor, torch.Tensor]:
        if batch.ref_chosen is not None and batch.ref_rejected is not None:
            return batch.ref_chosen, batch.ref_rejected
        with torch.no_grad(), self._reference(model) as ref:
            out = compute_pair_logps(ref, batch)
        return out.chosen, out.rejected

    def pair_logps(self, model: nn.Module, batch: PairBatch) -> PairLogps:
        """Policy log-probs with graph plus reference log-probs when the objective needs them."""
        # accelerate autocasts (--bf16) only the prepared model's own forward, and the backbone, head and
        # reference are called directly; autocast is per thread, so the reference's worker enters it too
        def reference() -> tuple[torch.Tensor, torch.Tensor]:
            with self.accelerator.autocast():
                return self.reference_logps(model, batch)

        sq = self.objective.spec.use_weighting
        with self.accelerator.autocast():
            if not self.objective.needs_reference:
                return compute_pair_logps(model, batch, want_sq=sq)
            if self._reference_alongside(batch):
                logps, (ref_chosen, ref_rejected) = self.run_forwards(
                    lambda: compute_pair_logps(model, batch, want_sq=sq), reference)
            else:
                logps = compute_pair_logps(model, batch, want_sq=sq)
                ref_chosen, ref_rejected = reference()
        return logps.replace(ref_chosen=ref_chosen, ref_rejected=ref_rejected)

    def _reference_alongside(self, batch: PairBatch) -> bool:
        """``run_forwards`` applies: a separate reference model (not a ZeRO-3 engine) and no precomputed log-probs."""
        return (self.run_forwards is not None and self.ref_model is not None and batch.ref_chosen is None
                and not is_deepspeed_zero3_enabled())

    def compute_loss(self, model, inputs: PairBatch, return_outputs=False, num_items_in_batch=None):
        logps = self.pair_logps(model, inputs)
        out = self.objective(self.monitor.calibrate(logps, self.state.global_step) if model.training else logps)
        local_ok = bool(torch.isfinite(out.loss))
        if not self._everywhere(local_ok):
            self._numerical_fault(inputs, what="loss" if not local_ok else "loss on another process")
            # --nan_policy skip, agreed by every process: a zero that keeps the graph, so backward still reaches
            # every parameter (DDP, FSDP and DeepSpeed wait for all of them) and adds nothing; and no statistics
            out.loss = sum(t.nan_to_num(0.0, 0.0, 0.0).sum() for t in (logps.chosen, logps.rejected)) * 0.0
            return (out.loss, out) if return_outputs else out.loss
        mode = "train" if model.training else "eval"
        for k, v in out.stats.metrics().items():
            self._stats[f"{mode}:{k}"].append(v)
        if model.training:
            for k, v in self.monitor.observe(self.state.global_step, model, logps, out, inputs).items():
                self._stats[f"{mode}:{k}"].append(v)
        return (out.loss, out) if return_outputs else out.loss

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        local_ok = not grads or bool(torch.isfinite(torch.stack(torch._foreach_norm(grads)).sum()))
        if not self._everywhere(local_ok):  # FSDP shards gradients: each process sees only its part
            self._numerical_fault(inputs, what="gradient")
            model.zero_grad(set_to_none=True)  # --nan_policy skip: drop this (accumulated) update
        return loss

    def _everywhere(self, ok: bool) -> bool:
        """``ok`` on every process (one tiny all-gather per call under a multi-process launch): the processes
        must take the same branch, or they wait for each other in different collectives."""
        if self.accelerator.num_processes == 1:
            return ok
        flags = self.accelerator.gather(torch.tensor([float(ok)], device=self.args.device))
        return bool(flags.min() > 0)

    def _numerical_fault(self, batch: PairBatch, what: str = "loss") -> None:
        rows = batch.row_ids.tolist()
        where = f"step {self.state.global_step}, dataset rows {rows}"
        if self.args.nan_policy == "skip":
            logger.warning("non-finite %s at %s; skipping this batch (--nan_policy skip)", what, where)
            return
        self._save_checkpoint(self.model, trial=None)
        raise TrainingFault(
            f"non-finite {what} at {where}; checkpoint of the last good state saved in {self.args.output_dir}. "
            "Lower --learning_rate, check those rows, or pass --nan_policy skip"
        )

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        with torch.no_grad():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        mode = "eval" if any(k.startswith("eval_") for k in logs) else "train"
        prefix = "eval_" if mode == "eval" else ""
        keys = sorted(k for k, v in self._stats.items() if k.startswith(mode + ":") and v)
        if keys:
            local = torch.tensor([sum(self._stats[k]) / len(self._stats[k]) for k in keys], device=self.args.device)
            # metrics are global: the mean over processes, not rank 0's
            values = self.accelerator.reduce(local, reduction="mean") if self.accelerator.num_processes > 1 else local
            for key, value in zip(keys, values.tolist()):
                logs[prefix + key.split(":", 1)[1]] = value
                del self._stats[key]
        if mode == "train":
            logs["peak_memory_mb"] = peak_memory_mb()
        super().log(logs, start_time)

    # ---- checkpoint state of the dynamics monitor (RC EMAs) ---------------------------------------
    def _save_checkpoint(self, model, trial):
        super()._save_checkpoint(model, trial)
        ckpt = Path(self.args.output_dir) / f"checkpoint-{self.state.global_step}"
        if ckpt.is_dir() and self.args.should_save:
            torch.save(self.monitor.state_dict(), ckpt / STATE_FILE)
            tmp = ckpt / f"{COMPLETE_MARKER}.{os.getpid()}.tmp"  # unique: two writers never share a temp file
            with tmp.open("w") as f:
                f.write(str(self.state.global_step))
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, ckpt / COMPLETE_MARKER)

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        state = Path(resume_from_checkpoint) / STATE_FILE
        if state.is_file():
            self.monitor.load_state_dict(torch.load(state, weights_only=True))


def peak_memory_mb() -> float:
    """Peak accelerator memory if on CUDA, else peak resident set size of this process."""
    if torch.cuda.is_available() and torch.cuda.max_memory_allocated() > 0:
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
