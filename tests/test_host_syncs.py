"""Host syncs in a training step (issue 31 item 2), counted on the CPU with a dispatch mode.

On a GPU every op that needs a device value on the host (``.item()``, ``bool(t)``, ``int(t)``: the op
``aten._local_scalar_dense``; ``aten.nonzero``; indexing with a boolean mask, whose output size is the mask's count)
waits for the device to finish all queued work. On the CPU these ops are still dispatched, so a
:class:`TorchDispatchMode` around ``training_step`` (forward, loss, backward and the NaN policy of one micro-step)
counts them. A boolean-mask index's own ``nonzero`` runs inside the CPU kernel, below the mode, so ``index`` with
a boolean index is counted as a sync itself.
"""

from __future__ import annotations

import collections
import traceback

import pytest
import torch
from datasets import Dataset
from torch.utils._python_dispatch import TorchDispatchMode

from prefkit import PrefConfig, PrefTrainer, accel
from prefkit.errors import TrainingFault
from tests.conftest import poison_loss

SYNCING = {torch.ops.aten._local_scalar_dense.default, torch.ops.aten.nonzero.default,
           torch.ops.aten.masked_select.default}
INDEXING = {torch.ops.aten.index.Tensor, torch.ops.aten.index_put.default, torch.ops.aten.index_put_.default}
ROWS = [{"prompt": "the cat sat", "chosen": " on the mat", "rejected": " under the big red log"},
        {"prompt": "a dog", "chosen": " ran home", "rejected": " sat"}] * 6


class CountSyncs(TorchDispatchMode):
    """Counts syncing ops, each with the prefkit / transformers line that asked for it."""

    def __init__(self):
        super().__init__()
        self.where: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        bool_index = func in INDEXING and any(t is not None and t.dtype == torch.bool for t in args[1])
        if func in SYNCING or bool_index:
            frames = [f for f in traceback.extract_stack() if "/prefkit/" in f.filename or "transformers" in f.filename]
            last = frames[-1] if frames else None
            self.where["/".join(last.filename.rsplit("/", 2)[-2:]) + f":{last.lineno}" if last else "?"] += 1
        return func(*args, **(kwargs or {}))


def _train(tiny_llama, tiny_tokenizer, tmp_path, steps: int = 3, keep: list | None = None,
           **options) -> list[collections.Counter]:
    """Syncs per training step of a short run (every step a non-logging one: logging_steps is past the end);
    ``keep`` receives the trainer."""
    opts = {**dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=2, max_steps=steps,
                   logging_steps=10**6, save_strategy="no", report_to="none", use_cpu=True, beta=0.1,
                   overwrite_output_dir=True, overlap_reference=False), **options}
    # overlap_reference false: the reference forward would otherwise run on a worker thread, which a dispatch
    # mode (thread-local) does not see
    args = PrefConfig(**{**opts, **accel.host_defaults(opts)})
    trainer = PrefTrainer(model=tiny_llama, args=args, train_dataset=Dataset.from_list(ROWS),
                          processing_class=tiny_tokenizer, run_forwards=accel.install(args).run_forwards)
    if keep is not None:
        keep.append(trainer)
    counts, real = [], trainer.training_step

    def counted(*a, **kw):
        mode = CountSyncs()
        with mode:
            out = real(*a, **kw)
        counts.append(mode)
        return out

    trainer.training_step = counted
    trainer.train()
    return [m.where for m in counts]


# The syncs left, per micro-step (each named by the line that asks for it):
# - every run: the NaN policy's one check (prefkit/trainer.py _non_finite: bool of the loss-and-gradient flag;
#   --nan_policy stop must know before the optimizer step, or the "last good state" it saves is gone). Under
#   --nan_policy skip the loss is checked on its own too, before backward, to train on a zero instead (2).
# - --share_prompt false: transformers builds the 2D padding mask into a 4D one and asks twice per forward whether
#   it can be skipped (masking_utils, policy and reference forward: 4).
# RC adds none: its statistics, EMAs and α stay tensors on the device, and a micro-step's statistics are recorded
# after the NaN policy's check has been computed (as a tensor), so the loss check still waits for the gradient's.
# HF Trainer's own loop adds none per micro-step: its logging_nan_inf_filter (2 syncs: isnan/isinf of the returned
# loss) is off by default in PrefConfig, since --nan_policy already keeps a non-finite loss out of the logged mean
# (test_the_training_loop_adds_no_sync_per_step and test_a_skipped_loss_is_logged_as_transformers_filter_logs_it).
@pytest.mark.parametrize(("options", "want"), [
    ({}, [1, 1, 1]),  # the default layout on a Llama: packed pairs
    ({"pack_pairs": False}, [1, 1, 1]),  # the shared prompt, its mask built in the forward from lengths
    ({"share_prompt": False}, [5, 5, 5]),
    ({"nan_policy": "skip"}, [2, 2, 2]),
    ({"poet": True}, [1, 1, 1]),
    ({"granularity": "adaptive", "num_segments": 4}, [1, 1, 1]),  # the unit tensors' width comes from shapes
    ({"reward_calibration": True}, [1, 1, 1]),
    ({"reward_calibration": True, "rc_target": "band", "gradient_accumulation_steps": 2}, [1] * 6),
    ({"reward_calibration": True, "nan_policy": "skip"}, [2, 2, 2]),
], ids=["packed", "shared", "two-rows", "skip", "poet", "adpo", "rc", "rc-band-accumulated", "rc-skip"])
def test_host_syncs_per_training_step(tiny_llama, tiny_tokenizer, tmp_path, options, want):
    where = _train(tiny_llama, tiny_tokenizer, tmp_path, **options)
    assert [sum(w.values()) for w in where] == want, where


def _poison_gradient(model):
    """A NaN in one weight's gradient, the loss left finite."""
    weight = next(p for p in model.parameters() if p.requires_grad)
    weight.register_hook(lambda g: g * torch.tensor(float("nan")))


@pytest.mark.parametrize("options", [{}, {"reward_calibration": True}], ids=["plain", "rc"])
def test_the_stop_policys_one_check_still_names_what_was_not_finite(tiny_llama, tiny_tokenizer, tmp_path,
                                                                      monkeypatch, options):
    """The loss check waits for the gradient's (one sync), yet a NaN gradient under a finite loss is reported as
    the gradient, and a NaN loss as the loss."""
    _poison_gradient(tiny_llama)
    with pytest.raises(TrainingFault, match="non-finite gradient at step 0"):
        _train(tiny_llama, tiny_tokenizer, tmp_path / "grad", steps=1, **options)
    poison_loss(monkeypatch)
    with pytest.raises(TrainingFault, match="non-finite loss at step 0"):
        _train(tiny_llama, tiny_tokenizer, tmp_path / "loss", steps=1, **options)


# RC calls the objective twice a micro-step (the loss, then its incentives). Without accumulation, call 3 is step 1's
# loss; with 2 micro-steps a step, step 0 is calls 1-4 and call 7 is the loss of step 1's second micro-step, whose
# first was finite and recorded: the stop checkpoint is the state before step 1, and a resumed run redoes step 1
# whole, so neither the failed micro-step nor an earlier one of its step may be in it.
@pytest.mark.parametrize(("on_call", "options"), [(3, {}), (7, {"gradient_accumulation_steps": 2})],
                         ids=["one-micro-step", "accumulated"])
def test_rc_keeps_the_stopped_steps_statistics_out_of_the_last_good_state(tiny_llama, tiny_tokenizer, tmp_path,
                                                                         monkeypatch, on_call, options):
    """A NaN loss at step 1 (its incentives, computed apart, are finite): the stop checkpoint's RC state holds step
    0's committed EMAs and nothing of step 1, though RC measured step 1 before the check was read."""
    from prefkit.trainer import STATE_FILE

    poison_loss(monkeypatch, on_call=on_call)
    with pytest.raises(TrainingFault, match="non-finite loss at step 1"):
        _train(tiny_llama, tiny_tokenizer, tmp_path, steps=3, reward_calibration=True, **options)
    rc = torch.load(tmp_path / "out" / "checkpoint-1" / STATE_FILE, weights_only=True)["rc"]
    assert rc["pending"] == {"incentives": [], "scores": []}
    assert all(rc[k] is not None for k in ("log_d_w", "log_d_l", "log_norm_w", "log_norm_l", "cos"))


def test_a_skipped_gradient_under_accumulation_drops_the_steps_rc_statistics_with_it(tiny_llama, tiny_tokenizer,
                                                                                     tmp_path):
    """--nan_policy skip drops the whole accumulated gradient when the second micro-step's is NaN: RC's statistics
    of the first micro-step, whose gradient went with it, go too."""
    weight, calls = next(p for p in tiny_llama.parameters() if p.requires_grad), []

    def nan_on_second(g):
        calls.append(1)
        return g * torch.tensor(float("nan")) if len(calls) == 2 else g

    weight.register_hook(nan_on_second)
    kept: list = []
    _train(tiny_llama, tiny_tokenizer, tmp_path, steps=1, keep=kept, reward_calibration=True, nan_policy="skip",
           gradient_accumulation_steps=2, rc_norm_steps=10**6)  # no score-norm backward: one hook call a micro-step
    assert len(calls) == 2
    assert kept[0].monitor.rc.state_dict()["pending"] == {"incentives": [], "scores": []}


def _loop_syncs(tiny_tokenizer, tmp_path, steps: int, **options) -> int:
    """Syncs that transformers' training loop asks for itself (outside prefkit's training_step) in a whole run."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from tests.conftest import _small

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**_small(len(tiny_tokenizer))))
    opts = dict(output_dir=str(tmp_path / f"loop{steps}"), per_device_train_batch_size=2, max_steps=steps,
                logging_steps=10**6, save_strategy="no", report_to="none", use_cpu=True, overwrite_output_dir=True,
                overlap_reference=False, **options)
    args = PrefConfig(**{**opts, **accel.host_defaults(opts)})
    trainer = PrefTrainer(model=model, args=args, train_dataset=Dataset.from_list(ROWS),
                          processing_class=tiny_tokenizer)
    with CountSyncs() as mode:
        trainer.train()
    return sum(n for where, n in mode.where.items() if where.startswith("transformers/trainer.py"))


def test_the_training_loop_adds_no_sync_per_step(tiny_tokenizer, tmp_path):
    """By default the loop's syncs are a fixed few per run (the final loss), none per micro-step; with
    --logging_nan_inf_filter true, transformers' check adds its 2 per micro-step."""
    base = _loop_syncs(tiny_tokenizer, tmp_path, 2)
    assert _loop_syncs(tiny_tokenizer, tmp_path, 4) == base
    assert _loop_syncs(tiny_tokenizer, tmp_path, 2, logging_nan_inf_filter=True) == base + 2 * 2


def test_a_skipped_loss_is_logged_as_transformers_filter_logs_it(tiny_llama, tiny_tokenizer, tmp_path, monkeypatch):
    """--nan_policy skip, a NaN loss at step 2 of 3, one log at step 3: the logged loss is (l1 + l1 / 2 + l3) / 3,
    the step's loss replaced by the mean since the last log, as transformers' logging_nan_inf_filter replaces it
    (l1, l3: the same run logged every step; logging changes no weight)."""
    import copy
    import json

    calls = poison_loss(monkeypatch, on_call=2)
    start = copy.deepcopy(tiny_llama)
    logged = {}
    for every in (1, 3):
        calls.clear()
        _train(copy.deepcopy(start), tiny_tokenizer, tmp_path / f"log{every}", nan_policy="skip", logging_steps=every)
        recs = [json.loads(ln) for ln in (tmp_path / f"log{every}" / "out" / "metrics.jsonl").read_text().splitlines()]
        logged[every] = {r["step"]: r["loss"] for r in recs if "loss" in r}
    l1, l3 = logged[1][1], logged[1][3]
    assert logged[1][2] == 0.0  # the mean since the last log: nothing since step 1's log
    assert logged[3] == {3: pytest.approx((l1 + l1 / 2 + l3) / 3, rel=1e-5)}
