"""prefkit vs TRL DPOTrainer on the same job, in the same run: pairs/s, tokens/s, peak memory, and the ratios.

    python benchmarks/throughput.py                 # job a (tiny Llama), both frameworks, plus ADPO/POET/RC
    python benchmarks/throughput.py --jobs a b c    # b, c: SmolLM2-135M full / LoRA on HH-RLHF (slow on CPU)

Variant "unpacked" is prefkit DPO with --pack_pairs false (one pair per row, as before packing). Variant
"bucketed" is prefkit DPO with --train_sampling_strategy group_by_length (transformers' length-grouped
sampler over mega-batches of 50 batches): use --steps as a multiple of 50 so the pairs seen are an unbiased
random sample (within a mega-batch the longest batches come first). Variant "cached" is prefkit DPO with
--precompute_ref_log_probs and the on-disk cache filled by an earlier untimed run (what a second run over the
same pairs costs); "bucketed_cached" combines both. Jobs b, c train on steps x 4 HH-RLHF pairs (one epoch), so
the cache fill stays short. prefkit runs as the command line runs it: with the host layer (prefkit/accel/)
installed, its option defaults applied. Variant "nomalloc" is prefkit DPO without the glibc malloc thresholds
that layer sets on CPU (prefkit/accel/malloc.py), "nooverlap" without the reference forward on a worker thread
alongside the policy's (--overlap_reference false; prefkit/accel/overlap.py); TRL runs both without them
("dpo") and with them ("malloc"), and in bf16 also with
pad_to_multiple_of=64 ("pad64"); its fastest row is the baseline of the ratios. Per-step seconds (data / forward / backward / optimizer) come from wrapping the
Trainer's own hooks, the same for both frameworks.

Each (framework, job) runs in its own subprocess so peak RSS is per run. Results go to
benchmarks/out/throughput-<time>.json and .md with the commit, config and machine.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import random
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
REF_CACHE = "/tmp/prefkit-throughput-refcache"
WORDS = [f"w{i}" for i in range(1000)]


def word_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(["<pad>", "<s>", "</s>", "<unk>"] + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                                   bos_token="<s>")


def synthetic_pairs(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)

    def text(lo, hi):
        return " " + " ".join(rng.choices(WORDS, k=rng.randint(lo, hi)))

    return [{"prompt": text(5, 30).strip(), "chosen": text(10, 120), "rejected": text(10, 120)} for _ in range(n)]


def hh_pairs(n: int) -> list[dict]:
    from prefkit.data import bundled_sample_path

    rows = [json.loads(ln) for ln in Path(bundled_sample_path()).read_text().splitlines()][:n]
    from prefkit.data.formats import split_implicit_prompt

    out = []
    for r in rows:
        cut = split_implicit_prompt(r["chosen"], r["rejected"])
        out.append({"prompt": r["chosen"][:cut], "chosen": r["chosen"][cut:], "rejected": r["rejected"][cut:]})
    return out


def build(job: str, steps: int):
    """(model, tokenizer, pairs, batch size, lora) for a job; jobs b, c use steps x batch HH-RLHF pairs."""
    from transformers import LlamaConfig, LlamaForCausalLM

    if job == "a":
        tok = word_tokenizer()
        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=256, intermediate_size=688,
                                             num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4,
                                             max_position_embeddings=512, pad_token_id=0, eos_token_id=2))
        return model, tok, synthetic_pairs(2000), 8, False
    from prefkit.models import load_causal_lm, load_tokenizer, resolve_model_path

    path = resolve_model_path(None)
    return load_causal_lm(path), load_tokenizer(path), hh_pairs(steps * 4), 4, job == "c"


def current_rss_mb() -> float:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def instrument(trainer) -> dict[str, float]:
    """Accumulate seconds per phase of a step by wrapping the Trainer's own hooks (same for both frameworks):
    data = fetching batches, forward = compute_loss (reference + policy forward and the loss), backward,
    optimizer = optimizer.step."""
    from transformers import TrainerCallback

    spent = {"data": 0.0, "forward": 0.0, "backward": 0.0, "optimizer": 0.0}

    def timed(fn, phase):
        def wrapper(*a, **k):
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                spent[phase] += time.perf_counter() - t
        return wrapper

    class OptimizerTimer(TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, **kw):
            self.t = time.perf_counter()

        def on_optimizer_step(self, args, state, control, **kw):
            spent["optimizer"] += time.perf_counter() - self.t

    trainer.get_batch_samples = timed(trainer.get_batch_samples, "data")
    trainer.compute_loss = timed(trainer.compute_loss, "forward")
    trainer.accelerator.backward = timed(trainer.accelerator.backward, "backward")
    trainer.add_callback(OptimizerTimer())
    return spent


def run_worker(framework: str, job: str, steps: int, variant: str, precision: str = "fp32") -> dict:
    from datasets import Dataset

    torch.set_num_threads(os.cpu_count() or 1)
    if variant == "nomalloc":
        os.environ["PREFKIT_MALLOC_TUNING"] = "0"  # prefkit without its CPU malloc thresholds
    elif framework == "trl" and variant == "malloc":
        from prefkit.accel.malloc import tune_cpu_malloc

        tune_cpu_malloc()  # TRL given the malloc thresholds prefkit sets for itself on CPU
    # import the framework first: transformers.Trainer alone brings ~105 MB of modules (peft among them) to both,
    # so "training RSS" counts what training allocates, the part a GPU's memory figure would show
    if framework == "trl":
        from trl import DPOTrainer  # noqa: F401
    else:
        import prefkit.trainer  # noqa: F401
    model, tok, pairs, bs, lora = build(job, steps)
    base_rss = current_rss_mb()
    ref_pass = None  # seconds of the reference pass, for the cached variants
    ds = Dataset.from_list(pairs)
    out = f"/tmp/prefkit-bench-{framework}-{job}"
    common = dict(output_dir=out, per_device_train_batch_size=bs, max_steps=steps, learning_rate=1e-5,
                  logging_steps=10**6, save_strategy="no", report_to="none", max_length=256, use_cpu=True,
                  bf16=precision == "bf16", gradient_checkpointing=False, seed=0, dataloader_num_workers=0)
    if framework == "trl":
        from peft import LoraConfig
        from trl import DPOConfig, DPOTrainer

        args = DPOConfig(**common, beta=0.1, pad_to_multiple_of=64 if variant == "pad64" else None)
        peft_config = LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM") if lora else None
        # full fine-tuning: TRL would reload the reference from model.name_or_path; hand it the same frozen copy
        ref = None if lora else copy.deepcopy(model)
        trainer = DPOTrainer(model=model, ref_model=ref, args=args, train_dataset=ds, processing_class=tok,
                             peft_config=peft_config)
    else:
        from prefkit import PrefConfig, PrefTrainer, accel
        from prefkit.data import prepare_dataset
        from prefkit.models import apply_lora
        from prefkit.refcache import attach_reference_logps

        bucketed = dict(train_sampling_strategy="group_by_length")
        extra = {"poet": dict(poet=True), "adpo": dict(granularity="adaptive", num_segments=16),
                 "rc": dict(reward_calibration=True), "dpo": {}, "unpacked": dict(pack_pairs=False),
                 "bucketed": bucketed, "cached": {}, "nomalloc": {},
                 "nooverlap": dict(overlap_reference=False),
                 "bucketed_cached": bucketed}[variant]
        options = {**common, "beta": 0.1, "overwrite_output_dir": True, "ref_cache_dir": REF_CACHE, **extra}
        args = PrefConfig(**{**options, **accel.host_defaults(options)})  # the command line's defaults
        plan = accel.install(args)
        if lora:
            model = apply_lora(model, r=16, alpha=32, dropout=0.0, target_modules=["all-linear"])
        if variant.endswith("cached"):
            # reference log-probs from the on-disk cache (filled by an earlier, untimed run of the same job):
            # what a second run over the same data (a sweep, another seed) costs
            ds, _ = prepare_dataset(ds, tok, args, source="bench pairs")
            t = time.perf_counter()
            ds = attach_reference_logps(ds, model, tok, args, model_path=f"throughput-job-{job}-seed0")
            ref_pass = time.perf_counter() - t
        trainer = PrefTrainer(model=model, args=args, train_dataset=ds, processing_class=tok,
                              run_forwards=plan.run_forwards)
    tokens = sum(len(tok(p["prompt"] + p["chosen"]).input_ids) + len(tok(p["prompt"] + p["rejected"]).input_ids)
                 for p in pairs[: steps * bs])
    spent = instrument(trainer)
    t0 = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    # the job's work in model FLOPs, the same for both frameworks: per token of prompt+chosen and prompt+rejected,
    # 2N for the reference forward, 2N policy forward, 2N activation gradients, 2N weight gradients (full only)
    n_linear = sum(m.weight.numel() for name, m in model.named_modules()
                   if isinstance(m, torch.nn.Linear) and "lora_" not in name)  # LoRA's own matmuls are tiny
    flops = (6 if lora else 8) * n_linear * tokens
    return {"framework": framework, "job": job, "variant": variant, "steps": steps, "batch_size": bs,
            "seconds": wall, "pairs_per_s": steps * bs / wall, "tokens_per_s": tokens / wall,
            "model_gflops": flops / wall / 1e9,
            "peak_rss_mb": peak, "base_rss_mb": base_rss, "train_rss_mb": peak - base_rss,
            "step_s": {k: v / steps for k, v in spent.items()}, "reference_pass_s": ref_pass}


def matmul_peak_gflops(n: int = 1024, repeats: int = 10, dtype: torch.dtype = torch.float32) -> float:
    """Square matmul rate on this machine now (best of repeats): the ceiling a training step is held to."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b  # warm-up
    best = min(_timed(lambda: a @ b) for _ in range(repeats))
    return 2 * n**3 / best / 1e9


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def machine() -> dict:
    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(), "torch": torch.__version__, "cuda": torch.cuda.is_available(),
            "fp32_matmul_gflops": round(matmul_peak_gflops(), 1),
            "bf16_matmul_gflops": round(matmul_peak_gflops(dtype=torch.bfloat16), 1)}


def commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=HERE).stdout.strip()
    except OSError:
        return "unknown"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--jobs", nargs="+", default=["a"])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--repeats", type=int, default=3, help="runs per (framework, variant); the fastest is kept")
    p.add_argument("--variants", nargs="*", default=None,
                   help="prefkit variants besides dpo: adpo poet rc unpacked bucketed cached bucketed_cached nomalloc "
                        "nooverlap")
    p.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto",
                   help="both frameworks: fp32, or bf16 autocast over fp32 weights (Trainer's --bf16); auto: bf16 "
                        "where bf16 matmul is fast (CPUs with AMX or AVX512-BF16, CUDA), as each framework's fastest "
                        "setting there")
    p.add_argument("--worker", nargs=3, metavar=("FRAMEWORK", "JOB", "VARIANT"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.precision == "auto":
        from prefkit.accel.precision import bf16_is_fast

        args.precision = "bf16" if bf16_is_fast("cpu") else "fp32"
    if args.worker:
        print("RESULT " + json.dumps(run_worker(*args.worker[:2], args.steps, args.worker[2], args.precision)))
        return
    results = []
    for job in args.jobs:
        variants = args.variants if args.variants is not None else (
            ("adpo", "poet", "rc", "unpacked", "bucketed", "cached", "bucketed_cached") if job == "a"
            else ("unpacked", "cached"))
        # TRL at its fastest: in bf16 its rows also get the shape bucketing that oneDNN's per-shape kernels want
        # and with the glibc malloc thresholds that prefkit sets for itself on CPU
        trl_runs = [("trl", "dpo"), ("trl", "malloc")] + ([("trl", "pad64")] if args.precision == "bf16" else [])
        runs = trl_runs + [("prefkit", "dpo")] + [("prefkit", v) for v in variants]
        if any(v.endswith("cached") for v in variants):  # fill the reference cache once, untimed
            shutil.rmtree(REF_CACHE, ignore_errors=True)
            subprocess.run([sys.executable, __file__, "--steps", str(args.steps), "--precision", args.precision,
                            "--worker", "prefkit", job, "cached"],
                           capture_output=True, text=True, check=True)
        # interleaved repeats, fastest kept: this VM's speed drifts by up to several x between minutes
        best: dict[tuple[str, str], dict] = {}
        for _ in range(args.repeats):
            for framework, variant in runs:
                proc = subprocess.run([sys.executable, __file__, "--steps", str(args.steps), "--precision",
                                       args.precision, "--worker", framework, job, variant],
                                      capture_output=True, text=True)
                line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
                if not line:
                    print(proc.stderr[-3000:], file=sys.stderr)
                    raise SystemExit(f"{framework}/{job}/{variant} failed")
                r = json.loads(line[0][7:])
                print(f"{job} {framework:8s} {variant:5s} {r['pairs_per_s']:7.2f} pairs/s  {r['peak_rss_mb']:8.0f} MB",
                      flush=True)
                key = (framework, variant)
                if key not in best or r["pairs_per_s"] > best[key]["pairs_per_s"]:
                    best[key] = r
        results.extend(best[k] for k in runs)
    rows = ["| job | framework | variant | pairs/s | tokens/s | model GFLOP/s | peak RSS MB | training RSS MB | "
            "pairs/s vs TRL | peak RSS vs TRL | training RSS vs TRL | step s: data / forward / backward / optimizer |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        base = max((x for x in results if x["job"] == r["job"] and x["framework"] == "trl"),
                   key=lambda x: x["pairs_per_s"])
        split = " / ".join(f"{r['step_s'][k]:.3f}" for k in ("data", "forward", "backward", "optimizer"))
        rows.append(f"| {r['job']} | {r['framework']} | {r['variant']} | {r['pairs_per_s']:.2f} | "
                    f"{r['tokens_per_s']:.0f} | {r['model_gflops']:.1f} | {r['peak_rss_mb']:.0f} | {r['train_rss_mb']:.0f} | "
                    f"{r['pairs_per_s'] / base['pairs_per_s']:.2f}x | {r['peak_rss_mb'] / base['peak_rss_mb']:.2f}x | "
                    f"{r['train_rss_mb'] / base['train_rss_mb']:.2f}x | {split} |")
    table = "\n".join(rows)
    print("\n" + table)
    outdir = HERE / "out"
    outdir.mkdir(exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    meta = {"commit": commit(), "machine": machine(), "steps": args.steps, "precision": args.precision,
            "results": results}
    (outdir / f"throughput-{stamp}.json").write_text(json.dumps(meta, indent=2))
    (outdir / f"throughput-{stamp}.md").write_text(f"commit {meta['commit']}, {args.precision}, {meta['machine']}\n\n"
                                                   f"{table}\n")


if __name__ == "__main__":
    main()
