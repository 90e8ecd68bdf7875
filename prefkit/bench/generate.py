"""The KL of a policy to its reference along the policy's own samples; generation is
:func:`prefkit.pairs.sample.generate`, re-exported here for the bench."""

from __future__ import annotations

from contextlib import nullcontext

import torch
from torch import nn

from prefkit.logprobs import eval_mode
from prefkit.pairs.sample import Generations, encode_left, gen_lengths, generate

__all__ = ["Generations", "generate", "sequence_kl"]


@torch.no_grad()
def sequence_kl(
    policy: nn.Module, reference: nn.Module | None, tokenizer, prompts: list[str], *, max_new_tokens: int,
    batch_size: int = 64,
) -> float:
    """Mean over prompts of KL(π‖π_ref) of whole responses, estimated on one sample y ~ π per prompt as
    Σ_t KL(π(·|x,y<t) ‖ π_ref(·|x,y<t)) (exact over the vocabulary at each step, so low variance).
    ``reference=None`` means the policy with its LoRA adapters disabled."""
    device = next(policy.parameters()).device
    total, count = 0.0, 0
    with eval_mode(policy):
        for start in range(0, len(prompts), batch_size):
            enc = encode_left(tokenizer, prompts[start : start + batch_size], device)
            plen = enc["input_ids"].shape[1]
            out = policy.generate(
                **enc, max_new_tokens=max_new_tokens, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
            )
            gen = out[:, plen:]
            n = gen_lengths(gen, tokenizer.eos_token_id)
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
    return total / max(count, 1)
