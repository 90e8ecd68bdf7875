"""`torchrun --nproc_per_node 2 -m tests.fsdp_reference_worker MODEL_DIR OUT_DIR`: the frozen reference sharded
by :func:`prefkit.reference.fsdp2_reference` on 2 CPU processes (gloo). accelerate turns FSDP on only for GPUs
(on a CPU ``accelerate launch`` with an FSDP config runs plain multi-process data parallelism), so the worker hands
it what an FSDP2 accelerator holds: accelerate's own FSDP2 plugin (the transformer-layer wrap policy) and state.
Each rank saves ``OUT_DIR/rank{r}.pt``: whether every reference parameter is a DTensor, the elements it holds
locally and in all, and the reference log-probs of its pairs (``tests.fused_head_worker.rank_batch``), which the test compares with
one process's unsharded reference."""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import torch

from tests.fused_head_worker import LAYOUTS, rank_batch


def fsdp2_accelerator(rank: int) -> SimpleNamespace:
    from accelerate.utils import FullyShardedDataParallelPlugin

    plugin = FullyShardedDataParallelPlugin(fsdp_version=2, auto_wrap_policy="transformer_based_wrap",
                                            reshard_after_forward=True)
    return SimpleNamespace(state=SimpleNamespace(fsdp_plugin=plugin), mixed_precision="no",
                           is_main_process=rank == 0, device=torch.device("cpu"), torch_device_mesh=None)


def main(model_dir: str, out_dir: str) -> None:
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor
    from transformers import AutoModelForCausalLM

    from prefkit.accel.attention import register_segment_attention
    from prefkit.logprobs import compute_pair_logps
    from prefkit.reference import fsdp2_reference, is_fsdp2, reference_copy

    register_segment_attention()
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    accelerator = fsdp2_accelerator(rank)
    assert is_fsdp2(accelerator)
    policy = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="sdpa")
    ref = fsdp2_reference(reference_copy(policy), accelerator)
    params = list(ref.parameters())
    out = {"dtensor": all(isinstance(p, DTensor) for p in params),
           "local": sum(p.to_local().numel() if isinstance(p, DTensor) else p.numel() for p in params),
           "total": sum(p.numel() for p in params), "units": sum(type(m).__name__.startswith("FSDP")
                                                                 for m in ref.modules())}
    with torch.no_grad():
        for layout in LAYOUTS:
            lp = compute_pair_logps(ref, rank_batch(layout, rank))
            out[layout] = {"chosen": lp.chosen, "rejected": lp.rejected}
    torch.save(out, Path(out_dir) / f"rank{rank}.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
