"""Sampling k completions per prompt: one batched ``model.generate`` call per batch of prompts (KV cache,
``num_return_sequences`` samples per prompt, prompt-major), or vLLM when asked for and available.

The bench's arithmetic task and `prefkit pairs` / `--rounds` all sample through :func:`generate`.
"""

from __future__ import annotations

import importlib.util
import time
from dataclasses import dataclass

import torch
from torch import nn

from prefkit.errors import ConfigError
from prefkit.logprobs import eval_mode

BACKENDS = ("hf", "vllm")


@dataclass
class Generations:
    texts: list[str]
    num_tokens: list[int]  # generated tokens up to and including EOS
    seconds: float = 0.0  # wall time of generation (decoding included)

    @property
    def tokens_per_second(self) -> float:
        return sum(self.num_tokens) / self.seconds if self.seconds > 0 else 0.0


def encode_left(tokenizer, prompts: list[str], device) -> dict:
    """Left-padded batch. A prompt rendered by a chat template may already start with BOS: then the tokenizer
    does not add another."""
    bos = tokenizer.bos_token
    add_special = not (bos and all(p.startswith(bos) for p in prompts))
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=add_special)
    finally:
        tokenizer.padding_side = side
    return {k: v.to(device) for k, v in enc.items() if k in ("input_ids", "attention_mask")}


def gen_lengths(gen: torch.Tensor, eos: int) -> torch.Tensor:
    """Generated tokens per row up to and including the first EOS (all of them when there is none)."""
    is_eos = gen == eos
    return torch.where(is_eos.any(1), is_eos.float().argmax(1) + 1, torch.full_like(gen[:, 0], gen.shape[1]))


@torch.no_grad()
def generate(
    model: nn.Module, tokenizer, prompts: list[str], *, max_new_tokens: int, batch_size: int = 64,
    do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0, num_return_sequences: int = 1,
) -> Generations:
    """Greedy, or sampling at ``temperature`` with nucleus ``top_p`` (top-k off); ``num_return_sequences``
    samples per prompt, prompt-major. Seed the torch RNG before calling for reproducible samples."""
    device = next(model.parameters()).device
    texts: list[str] = []
    lengths: list[int] = []
    sampling = (dict(do_sample=True, temperature=temperature, top_k=0, top_p=top_p) if do_sample
                else dict(do_sample=False))
    t0 = time.perf_counter()
    with eval_mode(model):
        for start in range(0, len(prompts), batch_size):
            enc = encode_left(tokenizer, prompts[start : start + batch_size], device)
            out = model.generate(
                **enc, max_new_tokens=max_new_tokens, num_return_sequences=num_return_sequences, use_cache=True,
                pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, **sampling,
            )
            gen = out[:, enc["input_ids"].shape[1] :]
            n = gen_lengths(gen, tokenizer.eos_token_id).tolist()
            texts += tokenizer.batch_decode([row[:k] for row, k in zip(gen.tolist(), n)], skip_special_tokens=True)
            lengths += n
    return Generations(texts, lengths, time.perf_counter() - t0)


def check_backend(backend: str) -> None:
    """Refuse a backend that cannot run here, before any model is loaded."""
    if backend not in BACKENDS:
        raise ConfigError(f"--backend: must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if backend == "vllm":
        if importlib.util.find_spec("vllm") is None:
            raise ConfigError("--backend vllm: vLLM is not installed (pip install vllm), use --backend hf")
        if not torch.cuda.is_available():
            raise ConfigError("--backend vllm: needs a CUDA GPU and none is visible; use --backend hf")


def generate_vllm(
    model_path: str, prompts: list[str], *, max_new_tokens: int, temperature: float, top_p: float,
    num_return_sequences: int, seed: int,
) -> Generations:  # pragma: no cover - needs vLLM and a GPU
    """The same samples' shape through vLLM's engine: prompt-major texts and token counts."""
    from vllm import LLM, SamplingParams

    llm = LLM(model=model_path, seed=seed)
    params = SamplingParams(n=num_return_sequences, temperature=temperature, top_p=top_p,
                            max_tokens=max_new_tokens, seed=seed)
    t0 = time.perf_counter()
    outputs = llm.generate(prompts, params)
    seconds = time.perf_counter() - t0
    texts = [c.text for o in outputs for c in o.outputs]
    lengths = [len(c.token_ids) for o in outputs for c in o.outputs]
    return Generations(texts, lengths, seconds)
