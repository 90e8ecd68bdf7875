"""Batched generation and the KL of a policy to its reference along the policy's own samples."""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class Generations:
    texts: list[str]
    num_tokens: list[int]  # generated tokens up to and including EOS


def _encode_left(tokenizer, prompts: list[str], device) -> dict:
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        enc = tokenizer(prompts, return_tensors="pt", padding=True)
    finally:
        tokenizer.padding_side = side
    return {k: v.to(device) for k, v in enc.items() if k in ("input_ids", "attention_mask")}


def _gen_lengths(gen: torch.Tensor, eos: int) -> torch.Tensor:
    is_eos = gen == eos
    first = torch.where(is_eos.any(1), is_eos.float().argmax(1) + 1, torch.full_like(gen[:, 0], gen.shape[1]))
    return first


@torch.no_grad()
def generate(
    model: nn.Module, tokenizer, prompts: list[str], *, max_new_tokens: int, batch_size: int = 64,
    do_sample: bool = False, temperature: float = 1.0, num_return_sequences: int = 1,
) -> Generations:
    """Greedy or pure (top-k/top-p off) sampling; ``num_return_sequences`` samples per prompt, prompt-major."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    texts: list[str] = []
    lengths: list[int] = []
    sampling = dict(do_sample=True, temperature=temperature, top_k=0, top_p=1.0) if do_sample else dict(do_sample=False)
    try:
        for start in range(0, len(prompts), batch_size):
            enc = _encode_left(tokenizer, prompts[start : start + batch_size], device)
            out = model.generate(
                **enc, max_new_tokens=max_new_tokens, num_return_sequences=num_return_sequences,
                pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, **sampling,
            )
            gen = out[:, enc["input_ids"].shape[1] :]
            n = _gen_lengths(gen, tokenizer.eos_token_id)
            for row, k in zip(gen, n.tolist()):
                texts.append(tokenizer.decode(row[:k], skip_special_tokens=True))
                lengths.append(k)
    finally:
        model.train(was_training)
    return Generations(texts, lengths)


@torch.no_grad()
def sequence_kl(
    policy: nn.Module, reference: nn.Module | None, tokenizer, prompts: list[str], *, max_new_tokens: int,
    batch_size: int = 64,
) -> float:
    """Mean over prompts of KL(π‖π_ref) of whole responses, estimated on one sample y ~ π per prompt as
    Σ_t KL(π(·|x,y<t) ‖ π_ref(·|x,y<t)) (exact over the vocabulary at each step, so low variance).
    ``reference=None`` means the policy with its LoRA adapters disabled."""
    was_training = policy.training
    policy.eval()
    device = next(policy.parameters()).device
    total, count = 0.0, 0
    try:
        for start in range(0, len(prompts), batch_size):
            enc = _encode_left(tokenizer, prompts[start : start + batch_size], device)
            plen = enc["input_ids"].shape[1]
            out = policy.generate(
                **enc, max_new_tokens=max_new_tokens, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
            )
            gen = out[:, plen:]
            n = _gen_lengths(gen, tokenizer.eos_token_id)
            gen_mask = torch.arange(gen.shape[1], device=device)[None, :] < n[:, None]
            attn = torch.cat([enc["attention_mask"], gen_mask.long()], dim=1)
            pos = (attn.cumsum(-1) - 1).clamp(min=0)  # left padding: positions as during generation
            lp = policy(input_ids=out, attention_mask=attn, position_ids=pos).logits[:, plen - 1 : -1].float()
            ctx = policy.disable_adapter() if reference is None else nullcontext()
            with ctx:
                ref = policy if reference is None else reference
                lr = ref(input_ids=out, attention_mask=attn, position_ids=pos).logits[:, plen - 1 : -1].float()
            lp, lr = lp.log_softmax(-1), lr.log_softmax(-1)
            kl = (lp.exp() * (lp - lr)).sum(-1)
            total += (kl * gen_mask).sum().item()
            count += gen.shape[0]
    finally:
        policy.train(was_training)
    return total / max(count, 1)
