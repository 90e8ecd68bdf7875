"""`accelerate launch … -m tests.fused_head_worker MODEL_DIR OUT_DIR`: each process scores its own pairs of
:data:`FEATURES` with :func:`prefkit.logprobs.compute_pair_logps` under the engine of the accelerate config (DDP,
FSDP2, ZeRO-2/3), in each layout, once through the fused head and once through full logits, and saves
``OUT_DIR/rank{r}.pt``: per layout and path the log-probs, the synchronised gradients and the most rows of any
(rows x vocab) tensor that an operator allocated (views of another tensor not counted)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import prefkit.logprobs
from prefkit.accel.attention import register_segment_attention
from prefkit.data import PairCollator

# pair i: prompt, chosen, rejected token ids (rank r scores pairs 2r and 2r + 1)
FEATURES = [
    {"prompt_ids": [5, 6, 7], "chosen_ids": [8, 9, 2], "rejected_ids": [10, 2], "row_id": 0},
    {"prompt_ids": [11, 12], "chosen_ids": [13, 2], "rejected_ids": [14, 15, 16, 2], "row_id": 1},
    {"prompt_ids": [21, 22, 23, 24], "chosen_ids": [25, 2], "rejected_ids": [26, 27, 2], "row_id": 2},
    {"prompt_ids": [31], "chosen_ids": [32, 33, 34, 2], "rejected_ids": [35, 2], "row_id": 3},
]
LAYOUTS = {"plain": {}, "shared": {"share_prompt": True}, "packed": {"share_prompt": True, "pack_pairs": True}}


def rank_batch(layout: str, rank: int):
    return PairCollator(pad_token_id=0, **LAYOUTS[layout])(FEATURES[2 * rank : 2 * rank + 2])


def pair_loss(lp) -> torch.Tensor:
    """Any differentiable function of both responses' log-probs (the test recomputes it on one process)."""
    return lp.chosen.sum() - 0.5 * lp.rejected.sum()


class LargestLogits(TorchDispatchMode):
    """Records the most rows of any tensor an operator allocates whose last dimension is the vocabulary."""

    def __init__(self, vocab: int):
        super().__init__()
        self.vocab, self.rows = vocab, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):
            if (isinstance(t, torch.Tensor) and t.dim() and t.shape[-1] == self.vocab
                    and t.untyped_storage().data_ptr() not in inputs):
                self.rows = max(self.rows, t.numel() // self.vocab)
        return out


def _full_grads(model, accelerator) -> dict[str, torch.Tensor]:
    if accelerator.distributed_type.value == "DEEPSPEED":
        from deepspeed.utils import safe_get_full_grad

        return {n: safe_get_full_grad(p).clone() for n, p in model.module.named_parameters()}
    inner = prefkit.logprobs.unwrap_model(model)
    return {n: (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad).clone()
            for n, p in inner.named_parameters()}


def main(model_dir: str, out_dir: str) -> None:
    from accelerate import Accelerator, PartialState
    from transformers import AutoModelForCausalLM

    register_segment_attention()
    # as `prefkit train` on a CPU: --use_cpu true, except under DeepSpeed (accelerate turns DeepSpeed off under
    # it), and the gloo backend (--ddp_backend gloo)
    cpu = os.environ.get("ACCELERATE_USE_DEEPSPEED") != "true"
    PartialState(cpu=cpu, backend="gloo")
    accelerator = Accelerator(cpu=cpu)
    if accelerator.state.deepspeed_plugin is not None:  # no dataloader to read the batch size from
        accelerator.state.deepspeed_plugin.deepspeed_config.update(
            train_micro_batch_size_per_gpu=1, train_batch_size=accelerator.num_processes)
    model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="sdpa")
    vocab = model.config.vocab_size
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    model, optimizer = accelerator.prepare(model, optimizer)
    model.train()
    full_logits = prefkit.logprobs._fused_parts
    results = {"world_size": accelerator.num_processes}
    for layout in LAYOUTS:
        for path in ("fused", "full"):
            prefkit.logprobs._fused_parts = full_logits if path == "fused" else (lambda m: None)
            batch = rank_batch(layout, accelerator.process_index)
            with LargestLogits(vocab) as seen:
                lp = prefkit.logprobs.compute_pair_logps(model, batch)
                loss = pair_loss(lp)
                if accelerator.distributed_type.value == "DEEPSPEED":
                    model.backward(loss)
                else:
                    loss.backward()
            results[layout, path] = {"chosen": lp.chosen.detach(), "rejected": lp.rejected.detach(),
                                     "grads": _full_grads(model, accelerator), "logit_rows": seen.rows}
            if accelerator.distributed_type.value == "DEEPSPEED":
                model.step()  # lr 0: only clears DeepSpeed's gradient partitions
            optimizer.zero_grad(set_to_none=True)
    prefkit.logprobs._fused_parts = full_logits
    torch.save(results, Path(out_dir) / f"rank{accelerator.process_index}.pt")


if __name__ == "__main__":
    main(*sys.argv[1:3])
