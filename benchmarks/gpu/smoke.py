"""First contact with a GPU: does prefkit train there, equal itself across layouts, and keep up with TRL?

    python benchmarks/gpu/smoke.py                       # on the CUDA GPU (benchmarks/gpu/smoke.sh runs this)
    python benchmarks/gpu/smoke.py --dry-run             # tiny sizes on the CPU, seconds (tests/test_gpu_smoke.py)

Models are built from configs shaped like SmolLM2-135M and like a 1B Llama (Llama-3.2-1B), with random weights,
and a word-level tokenizer made here: nothing is downloaded. Checks, each printed as one PASS / WARN / FAIL line:

1. ``bf16_step``: a few prefkit DPO steps in bf16 autocast on the device: the loss is finite, the weights move;
2. ``layouts``: fp32 log-probs and gradients of the two-row, shared-prompt and packed layouts (each segment
   attention path: loop, pairs, row) agree, with grouped key/value heads (TF32 off for this check);
3. ``adpo`` / ``poet`` / ``rc``: each trains a few steps with a finite loss;
4. ``vs_trl_<shape>``: TRL's DPOTrainer and prefkit on the same job (same model, pairs, batch, bf16), runs
   interleaved, 2 each, each in its own process: pairs/s after warm-up steps and peak CUDA memory; WARN where
   prefkit is slower or uses more memory than TRL;
5. ``pairs``: a ``prefkit pairs`` generation pass over a saved random model (samples generated and scored).

A JSON summary (every check's status, detail and figures, the device, the versions) goes to ``--out``. The exit
status is 1 when a check failed. Needs torch (CUDA build), transformers 5.x, peft, accelerate, datasets and trl.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
WORDS = [f"w{i}" for i in range(1000)]

# config fields of the public models (their config.json), with random weights here
SHAPES = {
    "smollm2-135m": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                         rope_theta=100000.0, rms_norm_eps=1e-5, tie_word_embeddings=True),
    "llama-1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                     num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192,
                     rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=True),
    # the dry run's stand-in for both: grouped key/value heads as in the two above
    "tiny": dict(vocab_size=1100, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True),
}
# (steps, pairs per step, warm-up steps left out of the rate) of the TRL comparison, per shape
VS_TRL = {"smollm2-135m": (24, 8, 4), "llama-1b": (12, 4, 2), "tiny": (4, 2, 1)}


def word_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(["<pad>", "<s>", "</s>", "<unk>"] + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                                   bos_token="<s>")


def synthetic_pairs(n: int, longest: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)

    def text(lo, hi):
        return " " + " ".join(rng.choices(WORDS, k=rng.randint(lo, hi)))

    return [{"prompt": text(5, longest // 4).strip(), "chosen": text(8, longest), "rejected": text(8, longest)}
            for _ in range(n)]


def build_model(shape: str, device: torch.device, seed: int = 0) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(**SHAPES[shape], pad_token_id=0, bos_token_id=1, eos_token_id=2)
    config._attn_implementation = "sdpa"
    with device:  # initialised where it runs: a 1B model's random init on the host takes longer than its test
        return LlamaForCausalLM(config)


class Settings:
    """What the dry run shrinks: shapes, steps, lengths, device."""

    def __init__(self, dry_run: bool, device: str, work: str):
        self.dry_run = dry_run
        self.work = work  # scratch directory of this run (output dirs, the saved model), removed at the end
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.shapes = ["tiny"] if dry_run else ["smollm2-135m", "llama-1b"]
        self.train_shape = self.shapes[0]
        self.longest = 24 if dry_run else 200  # words per response
        self.max_length = 96 if dry_run else 512
        self.train_steps = 2 if dry_run else 6

    def options(self, output_dir: str, steps: int, batch: int) -> dict:
        """The options both frameworks get: bf16 autocast, TF32 on CUDA, no saving or logging in between."""
        return dict(output_dir=output_dir, per_device_train_batch_size=batch, max_steps=steps, learning_rate=1e-5,
                    logging_steps=10**6, save_strategy="no", report_to="none", max_length=self.max_length,
                    bf16=True, tf32=True if self.cuda else None, use_cpu=not self.cuda, seed=0,
                    dataloader_num_workers=0)


class Report:
    def __init__(self):
        self.checks: list[dict] = []

    def add(self, name: str, status: str, detail: str, **figures) -> None:
        self.checks.append({"name": name, "status": status, "detail": detail, **figures})
        print(f"{status} {name}: {detail}", flush=True)

    def run(self, name: str, fn, *args) -> None:
        """One check; an exception is its FAIL line (with the traceback's last lines in the JSON)."""
        t = time.perf_counter()
        try:
            fn(self, name, *args)
        except Exception as e:  # a smoke test reports every failure and goes on to the next check
            self.add(name, "FAIL", f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}",
                     traceback=traceback.format_exc()[-4000:])
        self.checks[-1]["seconds"] = round(time.perf_counter() - t, 2)


def prefkit_trainer(s: Settings, model, tok, pairs: list[dict], steps: int, batch: int, **extra):
    from datasets import Dataset

    from prefkit import PrefConfig, PrefTrainer, accel

    options = {**s.options(tempfile.mkdtemp(prefix="prefkit-", dir=s.work), steps, batch), "beta": 0.1,
               "overwrite_output_dir": True, **extra}
    options = {k: v for k, v in options.items() if v is not None}
    args = PrefConfig(**{**options, **accel.host_defaults(options)})  # as the command line builds it
    plan = accel.install(args)
    return PrefTrainer(model=model, args=args, train_dataset=Dataset.from_list(pairs), processing_class=tok,
                       run_forwards=plan.run_forwards)


def check_train(report: Report, name: str, s: Settings, extra: dict) -> None:
    """A few prefkit steps (DPO, or ADPO / POET / RC with ``extra``): finite loss, weights moved."""
    tok = word_tokenizer()
    model = build_model(s.train_shape, s.device)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = prefkit_trainer(s, model, tok, synthetic_pairs(64, s.longest), s.train_steps, 4, **extra)
    loss = trainer.train().training_loss
    moved = sum(not torch.equal(before[n], p.detach()) for n, p in model.named_parameters())
    ok = math.isfinite(loss) and moved > 0
    report.add(name, "PASS" if ok else "FAIL",
               f"{s.train_steps} steps of {s.train_shape} on {s.device.type}, bf16 autocast: loss {loss:.4f}, "
               f"{moved}/{len(before)} weight tensors changed", loss=loss, tensors_changed=moved)


def check_layouts(report: Report, name: str, s: Settings) -> None:
    """fp32 log-probs and gradients: shared prompt and packed (every segment path) against the two-row layout."""
    from prefkit.accel.attention import PATHS, register_segment_attention
    from prefkit.data import PairCollator
    from prefkit.logprobs import compute_pair_logps

    register_segment_attention()
    # an fp32 comparison: TF32 rounds matmul inputs to 10 bits (the training runs' TrainingArguments(tf32=True)
    # set torch's fp32_precision API, which the legacy allow_tf32 flags may not be mixed with)
    kept = torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.fp32_precision
    torch.backends.cuda.matmul.fp32_precision = torch.backends.cudnn.fp32_precision = "ieee"
    try:
        model = build_model(s.train_shape, s.device).eval()
        rng = random.Random(1)
        feats = [{"prompt_ids": [rng.randrange(4, 1000) for _ in range(p)],
                  "chosen_ids": [rng.randrange(4, 1000) for _ in range(c)] + [2],
                  "rejected_ids": [rng.randrange(4, 1000) for _ in range(r)] + [2], "row_id": i}
                 for i, (p, c, r) in enumerate([(7, 12, 30), (20, 5, 3), (3, 40, 18), (11, 9, 9)])]

        def logps_and_grads(batch):
            model.zero_grad(set_to_none=True)
            lp = compute_pair_logps(model, batch.to(s.device))
            (lp.chosen.sum() - 0.3 * lp.rejected.sum()).backward()
            grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
            return torch.cat([lp.chosen.flatten(), lp.rejected.flatten()]).detach(), grads

        plain = logps_and_grads(PairCollator(pad_token_id=0)(feats))
        variants = {"shared": logps_and_grads(PairCollator(pad_token_id=0, share_prompt=True)(feats))}
        packed = PairCollator(pad_token_id=0, share_prompt=True, pack_pairs=True, pad_to_multiple_of=64)(feats)
        forced = os.environ.get("PREFKIT_SEGMENT_ATTENTION")
        try:
            for path in PATHS:
                os.environ["PREFKIT_SEGMENT_ATTENTION"] = path
                variants[f"packed/{path}"] = logps_and_grads(packed)
        finally:
            if forced is None:
                os.environ.pop("PREFKIT_SEGMENT_ATTENTION", None)
            else:
                os.environ["PREFKIT_SEGMENT_ATTENTION"] = forced
    finally:
        torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.fp32_precision = kept
    diffs = {k: {"logps": (lp - plain[0]).abs().max().item(),
                 "grads": ((g - plain[1]).norm() / plain[1].norm()).item()} for k, (lp, g) in variants.items()}
    worst_lp = max(d["logps"] for d in diffs.values())
    worst_g = max(d["grads"] for d in diffs.values())
    # fp32 on a GPU: the kernels differ (fused vs math attention, reduction orders), so 1e-4 rather than CPU's 1e-5
    status = "PASS" if worst_lp <= 1e-4 and worst_g <= 1e-4 else "WARN" if worst_lp <= 1e-2 else "FAIL"
    report.add(name, status, f"{', '.join(variants)} vs two rows ({s.train_shape}, fp32): log-prob max |diff| "
                             f"{worst_lp:.2e}, gradient relative diff {worst_g:.2e}", diffs=diffs)


def vs_trl_worker(framework: str, shape: str, s: Settings) -> dict:
    """One timed run: (steps, batch) of VS_TRL[shape]; pairs/s counted from the end of the warm-up steps."""
    from transformers import TrainerCallback

    steps, batch, warm = VS_TRL[shape]
    tok = word_tokenizer()
    model = build_model(shape, s.device)
    pairs = synthetic_pairs(steps * batch, s.longest)
    marks: list[float] = []

    class StepClock(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if s.cuda:
                torch.cuda.synchronize()
            marks.append(time.perf_counter())

    if framework == "trl":
        from datasets import Dataset
        from trl import DPOConfig, DPOTrainer

        options = {k: v for k, v in s.options(tempfile.mkdtemp(prefix="trl-", dir=s.work), steps, batch).items()
                   if v is not None}
        # the same frozen copy as prefkit's reference (TRL would reload it from model.name_or_path)
        trainer = DPOTrainer(model=model, ref_model=copy.deepcopy(model), args=DPOConfig(**options, beta=0.1),
                             train_dataset=Dataset.from_list(pairs), processing_class=tok)
    else:
        trainer = prefkit_trainer(s, model, tok, pairs, steps, batch)
    trainer.add_callback(StepClock())
    if s.cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    timed = marks[warm:]
    rate = (len(timed) - 1) * batch / (timed[-1] - timed[0]) if len(timed) > 1 else float("nan")
    peak = torch.cuda.max_memory_allocated() / 2**30 if s.cuda else None
    return {"framework": framework, "shape": shape, "steps": steps, "batch": batch, "warmup_steps": warm,
            "pairs_per_s": rate, "peak_cuda_gib": peak}


def check_vs_trl(report: Report, name: str, s: Settings, shape: str) -> None:
    """TRL and prefkit interleaved, 2 runs each, each run in its own process (its own peak memory) on a GPU; in
    the dry run in this process (a CPU has no CUDA memory figure, and the rates there mean nothing)."""
    runs: dict[str, list[dict]] = {"trl": [], "prefkit": []}
    for _ in range(2):
        for framework in ("trl", "prefkit"):
            if s.dry_run:
                runs[framework].append(vs_trl_worker(framework, shape, s))
                continue
            proc = subprocess.run([sys.executable, __file__, "--device", s.device.type, "--worker", framework, shape],
                                  capture_output=True, text=True, cwd=ROOT)
            line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
            if not line:
                raise RuntimeError(f"{framework} run failed: {proc.stderr.strip().splitlines()[-1:]}")
            runs[framework].append(json.loads(line[0][7:]))
    best = {f: max(r["pairs_per_s"] for r in rs) for f, rs in runs.items()}
    ratio = best["prefkit"] / best["trl"]
    detail = f"pairs/s prefkit {best['prefkit']:.2f} vs TRL {best['trl']:.2f} ({ratio:.2f}x, best of 2)"
    status = "PASS" if ratio >= 1 else "WARN"
    mem = None
    if s.cuda:
        mem = {f: min(r["peak_cuda_gib"] for r in rs) for f, rs in runs.items()}
        detail += f"; peak CUDA memory prefkit {mem['prefkit']:.2f} GiB vs TRL {mem['trl']:.2f} GiB"
        status = "PASS" if ratio >= 1 and mem["prefkit"] <= mem["trl"] else "WARN"
    if s.dry_run:
        status, detail = "PASS", detail + " (dry run: the figures mean nothing)"
    report.add(name, status, f"{shape}: {detail}", runs=runs, pairs_per_s=best, peak_cuda_gib=mem)


def check_pairs(report: Report, name: str, s: Settings) -> None:
    """`prefkit pairs` over a saved random model: every prompt sampled and scored."""
    from prefkit.cli import main as prefkit_main

    work = Path(tempfile.mkdtemp(prefix="pairs-", dir=s.work))
    model = build_model(s.train_shape, torch.device("cpu"))
    model.save_pretrained(str(work / "model"))
    word_tokenizer().save_pretrained(str(work / "model"))
    rng = random.Random(2)
    prompts = [{"prompt": " ".join(rng.choices(WORDS, k=8)), "answer": "7"} for _ in range(8)]
    (work / "prompts.jsonl").write_text("".join(json.dumps(p) + "\n" for p in prompts))
    argv = ["pairs", "--model_name_or_path", str(work / "model"), "--prompts", str(work / "prompts.jsonl"),
            "--scorer", r"regex:w(\d+)", "--reference_field", "answer", "--num_samples", "4",
            "--max_new_tokens", "8" if s.dry_run else "64", "--apply_chat_template", "false",
            "--output", str(work / "pairs.jsonl"), "--batch_size", "8"]
    if not s.cuda:
        argv.append("--use_cpu")
    rc = prefkit_main(argv)
    summary = json.loads((work / "pairs.jsonl.summary.json").read_text())
    ok = rc == 0 and summary.get("prompts") == len(prompts) and summary.get("samples") == 4 * len(prompts)
    report.add(name, "PASS" if ok else "FAIL",
               f"{summary.get('prompts')} prompts x 4 samples on {s.device.type}: {summary.get('pairs')} pairs, "
               f"{summary.get('tokens_per_second', float('nan')):.1f} tokens/s", summary=summary)


def versions() -> dict:
    out = {"python": platform.python_version(), "torch": torch.__version__}
    for mod in ("transformers", "peft", "accelerate", "datasets", "trl"):
        try:
            out[mod] = __import__(mod).__version__
        except ImportError:
            out[mod] = None
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dry-run", action="store_true", help="tiny sizes on the CPU: checks the script, not the GPU")
    p.add_argument("--device", default=None, help="cuda (default) or cpu (the dry run's default)")
    p.add_argument("--out", default=None, help="JSON summary (default benchmarks/gpu/out/smoke-<time>.json)")
    p.add_argument("--worker", nargs=2, metavar=("FRAMEWORK", "SHAPE"), help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    device = a.device or ("cpu" if a.dry_run else "cuda")
    if device == "cuda" and not torch.cuda.is_available():
        print("prefkit: error: --device cuda: torch sees no CUDA GPU (torch.cuda.is_available() is False); run on "
              "a GPU machine with a CUDA build of torch, or pass --dry-run", file=sys.stderr)
        return 2
    if device not in ("cuda", "cpu"):
        print(f"prefkit: error: --device: must be cuda or cpu, got {device!r}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="prefkit-smoke-") as work:
        s = Settings(a.dry_run, device, work)
        if a.worker:
            print("RESULT " + json.dumps(vs_trl_worker(a.worker[0], a.worker[1], s)), flush=True)
            return 0
        return run_checks(s, a.out)


def run_checks(s: Settings, out_path: str | None) -> int:
    t0 = time.perf_counter()
    report = Report()
    report.run("bf16_step", check_train, s, {})
    report.run("layouts", check_layouts, s)
    for name, extra in (("adpo", dict(granularity="adaptive", num_segments=8)), ("poet", dict(poet=True)),
                        ("rc", dict(reward_calibration=True))):
        report.run(name, check_train, s, extra)
    for shape in s.shapes:
        report.run(f"vs_trl_{shape}", check_vs_trl, s, shape)
    report.run("pairs", check_pairs, s)
    counts = {k: sum(c["status"] == k for c in report.checks) for k in ("PASS", "WARN", "FAIL")}
    device_name = torch.cuda.get_device_name() if s.cuda else platform.processor() or platform.machine()
    summary = {"dry_run": s.dry_run, "device": device_name, "versions": versions(),
               "seconds": round(time.perf_counter() - t0, 1), "counts": counts, "checks": report.checks}
    out = Path(out_path) if out_path else HERE / "out" / f"smoke-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=2, default=str))
    print(f"\n{counts['PASS']} PASS, {counts['WARN']} WARN, {counts['FAIL']} FAIL in {summary['seconds']} s on "
          f"{device_name}; summary: {out}")
    return 1 if counts["FAIL"] else 0


if __name__ == "__main__":
    sys.exit(main())
