"""`prefkit pairs`: sample k completions per prompt from a model, score them, write standard pairs."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from prefkit.errors import ConfigError
from prefkit.files import check_writable_dir
from prefkit.pairs.pairing import PAIRINGS
from prefkit.pairs.pipeline import PairOptions, SampleOptions, make_pairs, write_outputs
from prefkit.pairs.sample import BACKENDS, VLLM_GPU_MEMORY_UTILIZATION, check_backend, check_vllm_memory
from prefkit.pairs.scorers import SPECS, build_scorer

logger = logging.getLogger("prefkit")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line and exit code 2, like every prefkit error
        raise ConfigError(message)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="prefkit pairs", description="Sample, score and pair completions of a model (docs/pairs.md).")
    p.add_argument("--model_name_or_path", default=None, help="default: the embedded SmolLM2-135M-Instruct")
    p.add_argument("--prompts", required=True, help="JSONL/JSON/Parquet/CSV file, save_to_disk dir or hub dataset")
    p.add_argument("--prompts_split", default="train")
    p.add_argument("--prompt_field", default="prompt", help="column with the prompt (text or messages)")
    p.add_argument("--max_prompts", type=int, default=None, help="use only the first N prompts")
    p.add_argument("--num_samples", type=int, default=4, help="completions per prompt (k)")
    p.add_argument("--scorer", required=True, help=SPECS)
    p.add_argument("--reference_field", default="answer", help="row field that math/regex compare against")
    p.add_argument("--pairing", default="best_worst", choices=PAIRINGS)
    p.add_argument("--max_pairs_per_prompt", type=int, default=None)
    p.add_argument("--correct_threshold", type=float, default=1.0, help="score from which a sample counts correct")
    p.add_argument("--reference_fallback", default=None,
                   help="field with a reference solution, paired as chosen when no sample is correct")
    p.add_argument("--output", required=True, help="pairs JSONL; the summary goes to <output>.summary.json")
    p.add_argument("--temperature", type=float, default=1.0, help="0: greedy")
    p.add_argument("--top_p", type=float, default=1.0)
    p.add_argument("--max_new_tokens", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch_size", type=int, default=16, help="prompts per generate call")
    p.add_argument("--backend", default="hf", choices=BACKENDS)
    p.add_argument("--vllm_gpu_memory_utilization", type=float, default=None,
                   help=f"share of the GPU's memory vLLM may take (--backend vllm; default {VLLM_GPU_MEMORY_UTILIZATION}, "
                        "as in TRL)")
    p.add_argument("--apply_chat_template", default="auto", choices=("auto", "true", "false"))
    p.add_argument("--model_dtype", default="auto", help="auto | float32 | bfloat16 | float16")
    p.add_argument("--use_cpu", action="store_true", help="generate on the CPU even when a GPU is present")
    p.add_argument("--trust_remote_code", action="store_true")
    p.add_argument("--allow_pickle", action="store_true", help="allow pickled (.bin) weights: they run code when loaded")
    return p


def check_args(a: argparse.Namespace) -> None:
    for name, low in (("num_samples", 1), ("max_new_tokens", 1), ("batch_size", 1)):
        if getattr(a, name) < low:
            raise ConfigError(f"--{name}: must be at least {low}, got {getattr(a, name)}")
    if a.num_samples < 2:
        raise ConfigError("--num_samples: pairs need at least 2 samples per prompt")
    if a.temperature < 0:
        raise ConfigError(f"--temperature: must be >= 0, got {a.temperature}")
    if not 0 < a.top_p <= 1:
        raise ConfigError(f"--top_p: must be in (0, 1], got {a.top_p}")
    if a.max_pairs_per_prompt is not None and a.max_pairs_per_prompt < 1:
        raise ConfigError(f"--max_pairs_per_prompt: must be at least 1, got {a.max_pairs_per_prompt}")
    check_backend(a.backend)
    check_vllm_memory(a.vllm_gpu_memory_utilization, a.backend, "--backend")


def pairs_main(argv: list[str]) -> int:
    import torch

    from prefkit.accel.precision import bf16_is_fast, choose_dtype
    from prefkit.data import load_rows
    from prefkit.models import load_causal_lm, load_tokenizer, resolve_model_path

    a = build_parser().parse_args(argv)
    check_args(a)
    check_writable_dir(Path(a.output).parent, "--output", create=True)  # before the sampling, not after it
    device = torch.device("cuda" if torch.cuda.is_available() and not a.use_cpu else "cpu")
    # a bad spec fails before any loading; a reward model scores on the policy's device, in bf16 where native
    scorer = build_scorer(a.scorer, reference_field=a.reference_field, allow_pickle=a.allow_pickle, device=device,
                          autocast_dtype=torch.bfloat16 if bf16_is_fast(device.type) else None)
    rows = load_rows(a.prompts, a.prompts_split, trust_remote_code=a.trust_remote_code)
    rows = [dict(r) for r in rows][: a.max_prompts]  # a file mixing text and messages prompts is a plain list
    path = resolve_model_path(a.model_name_or_path)
    tokenizer = load_tokenizer(path, trust_remote_code=a.trust_remote_code)
    model = None
    if a.backend == "hf":
        model = load_causal_lm(path, dtype=choose_dtype(a.model_dtype, device),
                               trust_remote_code=a.trust_remote_code, allow_pickle=a.allow_pickle).to(device)
    sopts = SampleOptions(num_samples=a.num_samples, temperature=a.temperature, top_p=a.top_p,
                          max_new_tokens=a.max_new_tokens, seed=a.seed, batch_size=a.batch_size, backend=a.backend,
                          apply_chat_template=a.apply_chat_template,
                          vllm_gpu_memory_utilization=a.vllm_gpu_memory_utilization or VLLM_GPU_MEMORY_UTILIZATION,
                          vllm_dtype=a.model_dtype)
    popts = PairOptions(pairing=a.pairing, max_pairs_per_prompt=a.max_pairs_per_prompt,
                        correct_threshold=a.correct_threshold, reference_fallback=a.reference_fallback)
    logger.info("sampling %d x %d completions from %s", len(rows), a.num_samples, a.model_name_or_path or path)
    pairs, summary = make_pairs(model, tokenizer, rows, scorer, sopts, popts, source=a.prompts,
                                model_name=a.model_name_or_path or path, model_path=path)
    summary_path = write_outputs(pairs, summary, a.output)
    print(summary.text())
    print(f"pairs:   {a.output}\nsummary: {summary_path}")
    return 0
