"""PrefTrainer: a ``transformers.Trainer`` that optimises any prefkit objective.

It knows nothing of loss details: per batch it gets policy (and reference) per-token log-probs, lets the
dynamics monitor calibrate them, calls the objective, and logs the objective's detached statistics.
Checkpointing, schedulers, gradient accumulation, mixed precision and distributed launch are transformers'.
It changes no process-wide state; the host layer (:mod:`prefkit.accel`) comes in only through ``run_forwards``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import resource
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from transformers import PreTrainedModel, Trainer, TrainerCallback
from transformers.integrations import is_deepspeed_zero3_enabled

from prefkit.config import PrefConfig
from prefkit.data import PairCollator, prepare_if_raw
from prefkit.data.types import PairBatch, SkipReport
from prefkit.dynamics import DynamicsMonitor
from prefkit.errors import ConfigError, TrainingFault
from prefkit.evaluate import PairLogpSums, batches_of, pair_logp_sums
from prefkit.files import atomic_write_text, read_jsonl_tolerant
from prefkit.layouts import Layout, resolve_layout
from prefkit.logprobs import compute_pair_logps
from prefkit.metrics import MetricMeans
from prefkit.models import disable_dropout, is_peft_model
from prefkit.objectives import build_objective
from prefkit.objectives.types import PairLogps
from prefkit.refcache import attach_reference_logps
from prefkit.reference import fsdp2_reference, is_fsdp2, mix_into_reference, reference_copy, zero3_reference
from prefkit.spec import RunSpec, resolve_run
from prefkit.trainer_inputs import (
    check_collator,
    check_dataset,
    check_datasets,
    check_reference,
    check_reference_columns,
    peft_model,
    policy_model,
    tokenizer_for,
)

logger = logging.getLogger(__name__)

STATE_FILE = "prefkit_state.pt"
# Written last, atomically: a checkpoint without it was interrupted mid-save and is never resumed from.
COMPLETE_MARKER = "prefkit_checkpoint_complete"


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
    """TR-DPO: every ``ref_model_sync_steps`` optimizer steps, ref ← α·policy + (1 − α)·ref with
    α = ``ref_model_mixup_alpha`` (TRL's semantics; :func:`prefkit.reference.mix_into_reference`)."""

    def __init__(self, trainer: PrefTrainer):
        self.trainer = trainer

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step % args.ref_model_sync_steps == 0:
            mix_into_reference(self.trainer.accelerator.unwrap_model(self.trainer.model), self.trainer.ref_model,
                               args.ref_model_mixup_alpha)


class PrefTrainer(Trainer):
    """Preference-optimisation trainer, used like TRL's DPOTrainer.

    ``model`` is a loaded causal LM (optionally a peft model). ``ref_model`` defaults to the starting policy:
    the same model with adapters disabled for peft, a frozen copy otherwise, or nothing when reference
    log-probs were precomputed (dataset columns ``ref_chosen_logps``/``ref_rejected_logps``).
    Datasets may be raw preference rows (prompt/chosen/rejected…) or already prepared by
    :func:`prefkit.data.prepare_dataset`. ``run_forwards(policy, reference)`` runs the two forwards of a step
    with a separate reference model and returns both results (default: one after the other); the host layer's
    plan (:func:`prefkit.accel.install`) runs them side by side on a CPU. ``spec`` is the run's options resolved
    and checked once (:func:`prefkit.spec.resolve_run`); without it the trainer resolves ``args``.
    """

    _loss_finite: torch.Tensor | None = None  # this micro-step's loss check, waiting for its gradient check
    _loss_skipped = False  # --nan_policy skip trained this micro-step on a zero for a non-finite loss

    def __init__(
        self,
        model: str | PreTrainedModel | nn.Module | None = None,
        ref_model: nn.Module | None = None,
        args: PrefConfig | None = None,
        data_collator: PairCollator | None = None,
        train_dataset=None,
        eval_dataset=None,
        processing_class=None,
        compute_metrics: Callable | None = None,
        callbacks: list[TrainerCallback] | None = None,
        optimizers: tuple = (None, None),
        quantization_config=None,
        peft_config=None,
        preprocess_logits_for_metrics: Callable | None = None,
        *,
        run_forwards: Callable | None = None,
        layout: Layout | None = None,
        spec: RunSpec | None = None,
    ):
        args = args if args is not None else PrefConfig()
        self.spec = spec or resolve_run(args)  # `prefkit train` resolved it already; Python callers resolve here
        check_datasets(train_dataset, eval_dataset)
        check_collator(data_collator)
        model, model_path = policy_model(model, args, quantization_config)
        check_reference(model, ref_model)
        processing_class = tokenizer_for(model, model_path, args, processing_class)
        model = peft_model(model, args, peft_config)
        self.run_forwards = run_forwards
        self.objective = build_objective(self.spec.objective)
        self.skip_reports: dict[str, SkipReport] = {}
        self._metric_prefixes: list[str] = []  # the evaluate() calls under way, innermost last
        train_dataset = self._prepared(train_dataset, processing_class, "train")
        eval_dataset = self._prepared_evals(eval_dataset, processing_class)
        # precomputed once, by the starting policy unless a reference is given; then no reference copy is built
        self.precompute = self.spec.reference.precompute_ref_log_probs and self.objective.needs_reference
        if self.precompute:
            self.layout = layout or resolve_layout(args.share_prompt, args.pack_pairs, model, ref_model)
            if not getattr(model, "is_quantized", False):  # bitsandbytes placed it at load and refuses .to
                model.to(args.device)
            reference = ref_model if ref_model is not None else model
            train_dataset = self._with_reference_logps(train_dataset, reference, processing_class, args)
            eval_dataset = self._map_evals(eval_dataset, lambda ds, _: self._with_reference_logps(
                ds, reference, processing_class, args))
        precomputed = "ref_chosen_logps" in train_dataset.column_names
        if ref_model is None and self.objective.needs_reference and not is_peft_model(model) and not precomputed:
            ref_model = reference_copy(model, args.autocast_dtype)
        if ref_model is not None:
            ref_model.eval().requires_grad_(False)
        if self.spec.reference.sync_ref_model and ref_model is None:
            raise ConfigError("--sync_ref_model needs a separate reference model to update (not a peft model "
                              "with adapters disabled, not precomputed reference log-probs)")
        # decided once from the policy and the reference: a layout is used only where it is exact on both
        self.layout = layout or resolve_layout(args.share_prompt, args.pack_pairs, model, ref_model)
        collator = data_collator or PairCollator.for_spec(self.spec.data, processing_class, self.layout)
        if args.disable_dropout:  # as TRL: noisy policy log-probs against a dropout-free reference bias the margin
            disable_dropout(model, ref_model)
        self.ref_model = ref_model
        super().__init__(
            model=model,
            args=args,
            data_collator=collator,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            compute_metrics=compute_metrics,
            callbacks=[MetricsFileCallback(Path(args.output_dir) / "metrics.jsonl"), *(callbacks or [])],
            optimizers=optimizers,
            preprocess_logits_for_metrics=preprocess_logits_for_metrics,
        )
        if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true" and not self.is_fsdp_enabled:
            # accelerate enables FSDP only on GPUs and other accelerators, and says nothing on a CPU
            logger.warning("the accelerate config asks for FSDP, which accelerate enables only on GPUs: this %s "
                           "launch runs as plain data parallel, every process holding the whole model",
                           self.accelerator.device.type)
        if self.ref_model is not None and is_deepspeed_zero3_enabled():
            self.ref_model = zero3_reference(self.ref_model, self.accelerator)
        elif self.ref_model is not None and is_fsdp2(self.accelerator):
            self.ref_model = fsdp2_reference(self.ref_model, self.accelerator)
        elif self.ref_model is not None:
            self.ref_model.to(self.args.device)
        self.monitor = self._dynamics_monitor(train_dataset, collator)
        self.metrics = MetricMeans()
        if self.spec.reference.sync_ref_model:
            self.add_callback(SyncReferenceCallback(self))
        if hasattr(self.model, "add_model_tags"):
            self.model.add_model_tags(["prefkit"])

    def _with_reference_logps(self, ds, reference: nn.Module, tokenizer, args: PrefConfig):
        """``ds`` with the reference's per-token log-probs as columns, computed once and cached on disk
        (:func:`prefkit.refcache.attach_reference_logps`), unless it has them."""
        if "ref_chosen_logps" in ds.column_names:
            return ds
        return attach_reference_logps(ds, reference, tokenizer, args, layout=self.layout,
                                      model_path=getattr(reference, "name_or_path", "") or type(reference).__name__)

    @staticmethod
    def _map_evals(eval_dataset, fn):
        """``fn(dataset, name)`` applied to one eval dataset or to each of a dict's."""
        if isinstance(eval_dataset, dict):
            return {name: fn(ds, name) for name, ds in eval_dataset.items()}
        return None if eval_dataset is None else fn(eval_dataset, "eval")

    def _prepared_evals(self, eval_dataset, tokenizer):
        return self._map_evals(eval_dataset, lambda ds, name: self._prepared(
            ds, tokenizer, name if name == "eval" else f"eval_{name}"))

    def _dynamics_monitor(self, train_dataset, collator: PairCollator) -> DynamicsMonitor:
        dyn = self.spec.dynamics
        probe = collator([train_dataset[i] for i in range(min(dyn.dynamics_probe_size, len(train_dataset)))]) if (
            train_dataset is not None and dyn.dynamics_steps > 0
        ) else None
        multi = self.accelerator.num_processes > 1
        return DynamicsMonitor(
            dyn, self.objective, self.model, probe, self._probe_logps,
            # RC statistics are batch means: reduced over processes so that every rank uses the same α
            reduce_mean=(lambda t: self.accelerator.reduce(t.to(self.args.device), reduction="mean"))
            if multi else None,
            unwrap=self.accelerator.unwrap_model if multi else None,
        )

    def _prepared(self, dataset, tokenizer, name: str):
        dataset, report = prepare_if_raw(dataset, tokenizer, self.spec.data, name)
        check_reference_columns(dataset, self.objective, name)
        if report is not None:
            self.skip_reports[name] = report
            (logger.warning if report.skipped else logger.info)("%s dataset: %s", name, report.summary())
        return dataset

    # -------------------------------------------------------------------------------------------------
    def _prepare_inputs(self, inputs: PairBatch) -> PairBatch:  # type: ignore[override]
        # the DataLoader pins batches where an accelerator exists (PairBatch.pin_memory): the copy overlaps compute
        return inputs.to(self.args.device, non_blocking=True)

    def _probe_logps(self, model: nn.Module, batch: PairBatch) -> PairLogps:
        with self.accelerator.autocast():
            return compute_pair_logps(model, batch.to(self.args.device, non_blocking=True),
                                      want_sq=self.objective.spec.use_weighting)

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

    def held_out_logp_sums(self, dataset, model: nn.Module | None = None, desc: str = "held-out") -> PairLogpSums:
        """The summed response log-probs of a prepared held-out dataset (before/after metrics), by ``model``
        (default: the policy) through :func:`prefkit.evaluate.pair_logp_sums`: in the run's layout and autocast,
        without the training-only EOS padding, each process scoring its shard of the pairs."""
        collator = dataclasses.replace(self.data_collator, static_eos_padding=False)
        loader = self.accelerator.prepare_data_loader(
            batches_of(dataset, collator, self.args.per_device_eval_batch_size))
        return pair_logp_sums(self.model if model is None else model, loader, desc=desc,
                              autocast=self.args.autocast_dtype, gather=self.accelerator.gather_for_metrics)

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
        """``run_forwards`` applies: a separate reference model that is not sharded (a ZeRO-3 engine or FSDP2
        units gather parameters with collectives, which two threads would issue in different orders on different
        ranks) and no precomputed log-probs."""
        return (self.run_forwards is not None and self.ref_model is not None and batch.ref_chosen is None
                and not is_deepspeed_zero3_enabled() and not is_fsdp2(self.accelerator))

    def compute_loss(self, model, inputs: PairBatch, return_outputs=False, num_items_in_batch=None):
        logps = self.pair_logps(model, inputs)
        out = self.objective(self.monitor.calibrate(logps, self.state.global_step) if model.training else logps)
        finite = torch.isfinite(out.loss)
        if model.training and self._loss_check_rides_on_gradient():
            self._loss_finite = finite
        elif self._non_finite(finite, inputs, "loss"):
            # --nan_policy skip, agreed by every process: a zero that keeps the graph, so backward still reaches
            # every parameter (DDP, FSDP and DeepSpeed wait for all of them) and adds nothing; and no statistics
            out.loss = sum(t.nan_to_num(0.0, 0.0, 0.0).sum() for t in (logps.chosen, logps.rejected)) * 0.0
            self._loss_skipped = model.training
            return (out.loss, out) if return_outputs else out.loss
        mode = "train" if model.training else "eval"
        self.metrics.add(mode, out.stats.metric_tensors())
        if model.training:
            self.metrics.add(mode, self.monitor.observe(self.state.global_step, model, logps, out, inputs))
        return (out.loss, out) if return_outputs else out.loss

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        finite = torch.isfinite(torch.stack(torch._foreach_norm(grads)).sum()) if grads else torch.tensor(True)
        what: str | Callable[[], str] = "gradient"
        loss_finite, self._loss_finite = self._loss_finite, None
        if loss_finite is not None:  # one host sync for both checks; which one failed is asked only then
            finite = finite.to(loss_finite.device) & loss_finite

            def failed() -> str:
                return "gradient" if bool(loss_finite) else "loss"

            what = failed
        self.monitor.settle(finite)  # RC counts this micro-step's statistics only if it was finite here
        if self._non_finite(finite, inputs, what):  # FSDP shards gradients: each process sees only its part
            model.zero_grad(set_to_none=True)  # --nan_policy skip: drop this (accumulated) update
            self.monitor.discard_step()  # and RC's statistics of the micro-steps whose gradients that drops
        skipped, self._loss_skipped = self._loss_skipped, False
        if skipped and hasattr(self, "_tr_loss"):
            # what transformers' logging_nan_inf_filter adds for a non-finite loss (the mean of the losses since the
            # last log), decided on the host without its 2 syncs per micro-step: the logged mean is the same
            return self._tr_loss.detach() / (1 + self.state.global_step - self._globalstep_last_logged)
        return loss

    def _loss_check_rides_on_gradient(self) -> bool:
        """Whether a training step's loss check can wait for its gradient check (one host sync, not two):
        under --nan_policy stop, where nothing is skipped, and without the diagnostics' probe, host state that the
        stop checkpoint saves and a non-finite step would already have changed (RC's statistics wait for the
        check: :meth:`DynamicsMonitor.settle`). Under skip the loss must be known before backward, to train on a
        zero instead."""
        return self.args.nan_policy == "stop" and not self.monitor.every

    def _non_finite(self, finite: torch.Tensor, batch: PairBatch, what: str | Callable[[], str]) -> bool:
        """The NaN policy, in one place: whether ``what`` is non-finite on any process (one tiny all-gather under
        a multi-process launch, so that every process takes the same branch and none waits in a collective the
        others skip). Then --nan_policy stop saves the last good state and raises; skip logs and returns True."""
        ok = finite.to(self.args.device, torch.float32).reshape(1)
        # one host sync when all is well; the failing branch may ask more
        if self.accelerator.num_processes > 1:
            if bool(self.accelerator.gather(ok).min() > 0):
                return False
            if bool(ok > 0):  # which check failed on the other process is not sent along
                what = f"{'loss or gradient' if callable(what) else what} on another process"
        elif bool(ok > 0):
            return False
        what = what() if callable(what) else what
        where = f"step {self.state.global_step}, dataset rows {batch.row_ids.tolist()}"
        if self.args.nan_policy == "skip":
            logger.warning("non-finite %s at %s; skipping this batch (--nan_policy skip)", what, where)
            return True
        self.monitor.discard_step()  # the last good state: the step that failed adds nothing, not even in part
        self._save_checkpoint(self.model, trial=None)
        raise TrainingFault(
            f"non-finite {what} at {where}; checkpoint of the last good state saved in {self.args.output_dir}. "
            "Lower --learning_rate, check those rows, or pass --nan_policy skip"
        )

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        with torch.no_grad():
            loss, out = self.compute_loss(model, inputs, return_outputs=True)
        if prediction_loss_only:
            return loss.detach(), None, None
        # what compute_metrics gets: per pair the implicit rewards (chosen, rejected), and label 0 (the chosen one)
        rewards = torch.stack([out.stats.rewards_chosen, out.stats.rewards_rejected], dim=-1).detach().float()
        return loss.detach(), rewards, torch.zeros(len(rewards), dtype=torch.long, device=rewards.device)

    # ---- datasets given to evaluate() and predict(): prepared as those given to __init__ ------------------
    def _incoming(self, dataset, argument: str, name: str):
        """A dataset (or dict of them, for ``evaluate``) given after construction, checked, tokenized with the
        same skip report as in ``__init__`` and with reference log-probs where the run precomputes them."""
        if isinstance(dataset, dict) and argument == "evaluate(eval_dataset)":
            for key, ds in dataset.items():
                check_dataset(ds, f"{argument}[{key!r}]")
        else:
            check_dataset(dataset, argument)
        if isinstance(dataset, dict):
            prepared = {key: self._prepared(ds, self.processing_class, f"{name}_{key}") for key, ds in dataset.items()}
        else:
            prepared = self._prepared(dataset, self.processing_class, name)
        return self._map_evals(prepared, lambda ds, _: self._reference_ready(ds, argument))

    def _reference_ready(self, ds, argument: str):
        if not self.objective.needs_reference or "ref_chosen_logps" in ds.column_names:
            return ds
        holds_reference = self.ref_model is not None or is_peft_model(self.model)
        if not holds_reference and (not self.precompute or self.state.global_step > 0):
            raise ConfigError(
                f"{argument}: cannot compute reference log-probs for a dataset passed to it "
                + ("after training has started: with precompute_ref_log_probs=True and no ref_model the reference "
                   "is the starting policy, which is not kept" if self.precompute else
                   "without ref_chosen_logps/ref_rejected_logps columns: the trainer holds no reference model")
                + "; pass this dataset as eval_dataset when building the trainer, or pass ref_model")
        if not self.precompute:
            return ds
        reference = self.ref_model if self.ref_model is not None else self.model
        return self._with_reference_logps(ds, reference, self.processing_class, self.args)

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict[str, float]:
        """transformers' evaluate (a dict of datasets: metrics prefixed ``eval_<name>_``), on raw rows too."""
        if eval_dataset is not None and not isinstance(eval_dataset, str):  # a str names one of __init__'s
            eval_dataset = self._incoming(eval_dataset, "evaluate(eval_dataset)", "eval")
        self._metric_prefixes.append(metric_key_prefix)
        try:
            return super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)
        finally:
            self._metric_prefixes.pop()

    def predict(self, test_dataset, ignore_keys=None, metric_key_prefix: str = "test"):
        """transformers' predict, on raw rows too; the objective's metrics join ``metrics`` with the prefix."""
        output = super().predict(self._incoming(test_dataset, "predict(test_dataset)", metric_key_prefix),
                                 ignore_keys, metric_key_prefix)
        for key, value in self.metrics.pop("eval", self.args.device, self._reduce()).items():
            output.metrics[f"{metric_key_prefix}_{key}"] = value
        return output

    def _reduce(self) -> Callable | None:
        # metrics are global: the mean over processes, not rank 0's
        if self.accelerator.num_processes > 1:
            return lambda t: self.accelerator.reduce(t, reduction="mean")
        return None

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        mode = "eval" if self._metric_prefixes else "train"
        prefix = f"{self._metric_prefixes[-1]}_" if mode == "eval" else ""
        for key, value in self.metrics.pop(mode, self.args.device, self._reduce()).items():
            logs[prefix + key] = value
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
