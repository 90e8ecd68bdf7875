"""Cost of the objective pieces and of preference dynamics relative to a training step, on the embedded
default (SmolLM2-135M-Instruct + LoRA r16, batch 4, max_length 256, bundled HH-RLHF pairs).

    python benchmarks/overhead.py [--steps 3]

Reports, as a share of one plain DPO step (reference forward + policy forward + loss + backward):
- objective: everything after the model forward (masks, units, links, reduction; forward and backward to
  the log-probs) for DPO, ADPO static/adaptive, POET;
- diagnostics: incentives + score norms (auto = last block) + the probe-batch forward, per logged step, and
  amortised at --dynamics_steps 10;
- RC: incentives and calibration every step + score norms (mean scores, the defaults) every step
  (--rc_norm_steps 1), and amortised at --rc_norm_steps 10.
Results go to benchmarks/out/overhead-<time>.{json,md} with the commit and machine.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from prefkit.config import PrefConfig
from prefkit.data import PairCollator, bundled_sample_path, load_rows, prepare_dataset
from prefkit.dynamics import compute_incentives, score_grad_norms, select_params
from prefkit.logprobs import compute_pair_logps
from prefkit.models import apply_lora, load_causal_lm, load_tokenizer, resolve_model_path
from prefkit.objectives import build_objective

HERE = Path(__file__).resolve().parent


def timed(fn, reps: int = 1) -> float:
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t) / reps


def measure(model, batch, probe, objectives, params) -> dict[str, float]:
    """Seconds of one DPO step and of each piece, on one batch."""
    dpo = objectives["dpo"]
    out: dict[str, float] = {}

    def step():
        with torch.no_grad(), model.disable_adapter():
            ref = compute_pair_logps(model, batch)
        lp = compute_pair_logps(model, batch).replace(ref_chosen=ref.chosen, ref_rejected=ref.rejected)
        dpo(lp).loss.backward()
        model.zero_grad()

    out["step"] = timed(step)
    with torch.no_grad(), model.disable_adapter():
        ref = compute_pair_logps(model, batch)
    lp = compute_pair_logps(model, batch).replace(ref_chosen=ref.chosen, ref_rejected=ref.rejected)
    for name, obj in objectives.items():
        def loss_only(obj=obj):
            leaf = lp.replace(chosen=lp.chosen.detach().requires_grad_(True),
                              rejected=lp.rejected.detach().requires_grad_(True))
            torch.autograd.grad(obj(leaf).loss, [leaf.chosen, leaf.rejected])

        out[f"objective: {name}"] = timed(loss_only, reps=10)
    masks = dpo.kept_masks(lp)

    def diagnostics():
        compute_incentives(dpo, lp)
        score_grad_norms(lp, params, masks, "sum")
        with torch.no_grad():
            compute_pair_logps(model, probe)

    out["diagnostics"] = timed(diagnostics)
    t_inc = timed(lambda: compute_incentives(dpo, lp, "mean"), reps=5)
    t_scores = timed(lambda: score_grad_norms(lp, params, masks, "mean"))
    out["rc"] = t_inc + t_scores
    out["rc at --rc_norm_steps 10"] = t_inc + t_scores / 10
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=3)
    args = ap.parse_args()
    from throughput import commit, machine  # same folder

    path = resolve_model_path(None)
    tok = load_tokenizer(path)
    model = apply_lora(load_causal_lm(path), r=16, alpha=32, dropout=0.0, target_modules=["all-linear"])
    model.train()
    cfg = PrefConfig(output_dir="/tmp/prefkit-overhead", max_length=256, max_prompt_length=128)
    ds, _ = prepare_dataset(load_rows(bundled_sample_path()), tok, cfg, source="sample")
    collator = PairCollator(pad_token_id=tok.pad_token_id, share_prompt=True)
    batches = [collator([ds[i] for i in range(4 * k, 4 * k + 4)]) for k in range(args.steps)]
    probe = collator([ds[i] for i in range(100, 108)])
    configs = {
        "dpo": PrefConfig(output_dir="/tmp/o"),
        "adpo static k=4": PrefConfig(output_dir="/tmp/o", granularity="static", window_size=4),
        "adpo adaptive m=256": PrefConfig(output_dir="/tmp/o", granularity="adaptive", num_segments=256),
        "dpo + poet": PrefConfig(output_dir="/tmp/o", poet=True),
        "adpo adaptive m=16 + poet": PrefConfig(output_dir="/tmp/o", granularity="adaptive", num_segments=16, poet=True),
    }
    objectives = {k: build_objective(c) for k, c in configs.items()}
    params = select_params(model, "auto")
    rows = {k: [] for k in ["step", "diagnostics", "rc", "rc at --rc_norm_steps 10"] + [f"objective: {k}" for k in objectives]}
    for batch in batches:
        for k, v in measure(model, batch, probe, objectives, params).items():
            rows[k].append(v)
    mean = {k: sum(v) / len(v) for k, v in rows.items()}
    step = mean["step"]
    lines = ["| piece | seconds | share of a DPO step |", "|---|---|---|", f"| DPO step | {step:.2f} | 100% |"]
    for k, v in mean.items():
        if k != "step":
            lines.append(f"| {k} | {v:.4f} | {100 * v / step:.2f}% |")
    lines.append(f"| diagnostics amortised at --dynamics_steps 10 | {mean['diagnostics'] / 10:.4f} | "
                 f"{10 * mean['diagnostics'] / step:.2f}% |")
    table = "\n".join(lines)
    print(table)
    out = HERE / "out"
    out.mkdir(exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    meta = {"commit": commit(), "machine": machine(), "seconds": mean, "steps": args.steps,
            "config": "SmolLM2-135M-Instruct + LoRA r16 all-linear, batch 4, max_length 256, max_prompt_length 128"}
    (out / f"overhead-{stamp}.json").write_text(json.dumps(meta, indent=2))
    (out / f"overhead-{stamp}.md").write_text(f"commit {meta['commit']}, {meta['machine']}\n\n{table}\n")


if __name__ == "__main__":
    main()
