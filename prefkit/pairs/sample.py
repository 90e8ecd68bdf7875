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
# TRL's GRPOConfig / RLOOConfig default for the colocated engine: the share of the GPU's memory vLLM may take
VLLM_GPU_MEMORY_UTILIZATION = 0.3


@dataclass
class Generations:
    texts: list[str]
    num_tokens: list[int]  # generated tokens up to and including EOS
    seconds: float = 0.0  # wall time of generation (decoding included)

    @property
    def tokens_per_second(self) -> float:
        return sum(self.num_tokens) / self.seconds if self.seconds > 0 else 0.0


def prompt_token_ids(tokenizer, prompts: list[str]) -> list[list[int]]:
    """Each prompt's ids: the tokenizer's special tokens added, except to a prompt that already starts with BOS
    (rendered by a chat template), so BOS is never doubled. Both backends generate from these ids."""
    bos = tokenizer.bos_token
    return [tokenizer(p, add_special_tokens=not (bos and p.startswith(bos)))["input_ids"] for p in prompts]


def encode_left(tokenizer, prompts: list[str], device) -> dict:
    """:func:`prompt_token_ids`, left-padded into a batch."""
    ids = prompt_token_ids(tokenizer, prompts)
    width = max(map(len, ids))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    input_ids = torch.tensor([[pad] * (width - len(x)) + x for x in ids])
    mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids])
    return {"input_ids": input_ids.to(device), "attention_mask": mask.to(device)}


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


def cuda_visible() -> bool:
    """Whether torch sees a CUDA GPU (vLLM needs one; tests with a stand-in vLLM replace this)."""
    return torch.cuda.is_available()


def check_backend(backend: str, option: str = "--backend") -> None:
    """Refuse a backend that cannot run here, before any model is loaded; ``option`` names it in the message."""
    if backend not in BACKENDS:
        raise ConfigError(f"{option}: must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if backend == "vllm":
        if importlib.util.find_spec("vllm") is None:
            raise ConfigError(f"{option} vllm: vLLM is not installed (pip install vllm), use {option} hf")
        if not cuda_visible():
            raise ConfigError(f"{option} vllm: needs a CUDA GPU and none is visible; use {option} hf")


def check_vllm_memory(share: float | None, backend: str, backend_option: str) -> None:
    """``--vllm_gpu_memory_utilization`` (None: not given) in (0, 1], and only where vLLM samples (else it would
    change nothing); ``backend_option`` names the option that chooses the backend."""
    if share is None:
        return
    if backend != "vllm":
        raise ConfigError(f"--vllm_gpu_memory_utilization: only used with {backend_option} vllm; drop it or add "
                          f"{backend_option} vllm")
    if not 0 < share <= 1:
        raise ConfigError(f"--vllm_gpu_memory_utilization: must be in (0, 1], got {share}")


def generate_vllm(
    model_path: str, tokenizer, prompts: list[str], *, max_new_tokens: int, temperature: float, top_p: float,
    num_return_sequences: int, seed: int, gpu_memory_utilization: float = VLLM_GPU_MEMORY_UTILIZATION,
    dtype: str = "auto",
) -> Generations:
    """The same samples' shape through vLLM's engine: prompt-major texts and token counts. ``model_path`` is a
    HF model directory (a ``.gguf`` file is converted first, as for the hf backend); the prompts go in as
    prefkit's token ids (:func:`prompt_token_ids`). The engine is built for this call and released after it."""
    import gc

    from vllm import LLM, SamplingParams

    from prefkit.models import resolve_model_path

    llm = LLM(model=resolve_model_path(model_path), seed=seed, gpu_memory_utilization=gpu_memory_utilization,
              dtype=dtype)
    params = SamplingParams(n=num_return_sequences, temperature=temperature, top_p=top_p,
                            max_tokens=max_new_tokens, seed=seed)
    inputs = [{"prompt_token_ids": ids} for ids in prompt_token_ids(tokenizer, prompts)]  # vLLM's TokensPrompt
    t0 = time.perf_counter()
    outputs = llm.generate(inputs, params)
    seconds = time.perf_counter() - t0
    texts = [c.text for o in outputs for c in o.outputs]
    lengths = [len(c.token_ids) for o in outputs for c in o.outputs]
    del llm  # its share of the GPU's memory goes back before the run trains or scores on it
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return Generations(texts, lengths, seconds)
