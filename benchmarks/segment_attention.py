"""Micro-benchmark of the packed pairs' attention paths (prefkit/accel/attention.py): the per-pair loop, the
pairs gathered into one call, and the whole row in one call, on job (a)'s shapes of benchmarks/throughput.py.

`python benchmarks/segment_attention.py [--device cpu|cuda] [--pairs 8] [--iters 30]` prints, per path, the
median milliseconds of one attention call's forward + backward (4 heads of 64, as job a's tiny Llama; --kv-heads
for GQA) and of a whole packed forward + backward of job (a)'s model through ``compute_pair_logps``, and writes
them with the commit and machine to benchmarks/out/segment_attention.json. Paths are interleaved per iteration
(this VM's speed drifts between minutes).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from prefkit.accel.attention import PATHS, _gathered, _one_row, _per_pair, register_segment_attention  # noqa: E402
from prefkit.data.types import PairSegments  # noqa: E402

RUN = {"loop": _per_pair, "pairs": _gathered, "row": _one_row}


def job_a_lengths(rng: random.Random, pairs: int) -> tuple[tuple[int, int, int], ...]:
    """(prompt, chosen, rejected) tokens as job (a) draws them: prompts 5-30 words, responses 10-120 (+ EOS)."""
    return tuple((rng.randint(5, 30), rng.randint(10, 120) + 1, rng.randint(10, 120) + 1) for _ in range(pairs))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_attention(device: torch.device, segs: list[PairSegments], heads: int, kv_heads: int,
                   dtype: torch.dtype) -> dict[str, float]:
    times: dict[str, list[float]] = {p: [] for p in PATHS}
    for s in segs:
        t = sum(s.split_sizes())
        q = torch.randn(1, heads, t, 64, device=device, dtype=dtype, requires_grad=True)
        k, v = (torch.randn(1, kv_heads, t, 64, device=device, dtype=dtype, requires_grad=True) for _ in range(2))
        for path in PATHS:
            sync(device)
            t0 = time.perf_counter()
            out = RUN[path](q, k, v, s, 0.0, None, None)
            out.sum().backward()
            sync(device)
            times[path].append((time.perf_counter() - t0) * 1e3)
    return {p: statistics.median(v[2:]) for p, v in times.items()}


def time_model(device: torch.device, segs: list[PairSegments], kv_heads: int, dtype: torch.dtype) -> dict[str, float]:
    from transformers import LlamaConfig, LlamaForCausalLM

    from prefkit.data import PairCollator
    from prefkit.logprobs import compute_pair_logps

    register_segment_attention()
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=1000, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                                         num_attention_heads=4, num_key_value_heads=kv_heads,
                                         max_position_embeddings=512)).to(device=device, dtype=dtype)
    collator = PairCollator(pad_token_id=0, share_prompt=True, pack_pairs=True)
    rng = random.Random(1)
    times: dict[str, list[float]] = {p: [] for p in PATHS}
    for s in segs:
        feats = [{"prompt_ids": [rng.randint(3, 999) for _ in range(p)],
                  "chosen_ids": [rng.randint(3, 999) for _ in range(c - 1)] + [2],
                  "rejected_ids": [rng.randint(3, 999) for _ in range(r - 1)] + [2], "row_id": i}
                 for i, (p, c, r) in enumerate(s.lengths)]
        batch = collator(feats).to(device)
        for path in PATHS:
            os.environ["PREFKIT_SEGMENT_ATTENTION"] = path
            sync(device)
            t0 = time.perf_counter()
            lp = compute_pair_logps(model, batch)
            (lp.chosen.sum() - lp.rejected.sum()).backward()
            sync(device)
            times[path].append((time.perf_counter() - t0) * 1e3)
    os.environ.pop("PREFKIT_SEGMENT_ATTENTION")
    return {p: statistics.median(v[2:]) for p, v in times.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--pairs", type=int, default=8)
    p.add_argument("--iters", type=int, default=30)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "out" / "segment_attention.json"))
    args = p.parse_args()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    rng = random.Random(0)
    segs = [PairSegments(job_a_lengths(rng, args.pairs)) for _ in range(args.iters)]
    attention = time_attention(device, segs, 4, args.kv_heads, dtype)
    model = time_model(device, segs, args.kv_heads, dtype)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip()
    machine = torch.cuda.get_device_name() if device.type == "cuda" else f"{platform.processor() or platform.machine()}"
    result = {"commit": commit, "machine": machine, "threads": torch.get_num_threads(), "torch": torch.__version__,
              "device": args.device, "dtype": args.dtype, "pairs": args.pairs, "kv_heads": args.kv_heads,
              "iters": args.iters, "attention_ms": attention, "model_step_ms": model}
    for what, res in (("one attention call, fwd+bwd", attention), ("packed model fwd+bwd", model)):
        print(f"{what:30s} " + "  ".join(f"{k} {v:8.2f} ms" for k, v in res.items()))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
