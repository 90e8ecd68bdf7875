"""Per-token log-probs of chosen and rejected responses from one forward pass.

The backbone runs once over the 2B rows of a :class:`~prefkit.data.types.PairBatch`; the LM head is applied
only at positions that predict a response token, in chunks, through :class:`_TokenLogprob`, which recomputes
each chunk's logits in backward instead of keeping a (tokens x vocab) float32 matrix alive. For 49k-150k
vocabularies those logits dominate activation memory.

:func:`compute_pair_logps` is not a pure function of (model, batch): given a packed batch it switches the
model's attention implementation, in place, to the segment attention (:func:`use_segment_attention`), which
behaves as ``sdpa`` for every other input.
"""

from __future__ import annotations

import contextlib
import inspect
import re
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import AttentionInterface

from prefkit.data.types import SEGMENT_ATTENTION, PairBatch, SharedMask
from prefkit.errors import ModelError
from prefkit.objectives.types import PairLogps

CHUNK_TOKENS = 1024


class _TokenLogprob(torch.autograd.Function):
    """log softmax(h W^T + b)[y] per row, chunked; backward recomputes logits chunk by chunk."""

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor,  # type: ignore[override]
                want_sq: bool = False) -> tuple[Tensor, Tensor]:
        # logits in at least float32: bf16 log-softmax over a large vocabulary loses the small terms
        ctx.compute_dtype = torch.promote_types(weight.dtype, torch.float32)
        # backward recomputes the logits under the forward's autocast, as torch.amp.custom_bwd would
        device = hidden.device.type
        ctx.autocast = (device, torch.is_autocast_enabled(device), torch.get_autocast_dtype(device))
        out = torch.empty(hidden.shape[0], dtype=ctx.compute_dtype, device=hidden.device)
        sq = torch.empty(hidden.shape[0] if want_sq else 0, dtype=ctx.compute_dtype, device=hidden.device)
        for s in range(0, hidden.shape[0], CHUNK_TOKENS):
            logits = F.linear(hidden[s : s + CHUNK_TOKENS], weight, bias).to(ctx.compute_dtype)
            tgt = targets[s : s + CHUNK_TOKENS]
            lse = logits.logsumexp(dim=1)
            out[s : s + CHUNK_TOKENS] = logits.gather(1, tgt[:, None]).squeeze(1) - lse
            if want_sq:  # log Σ_v p_v² = logsumexp(2·logits) − 2·logsumexp(logits), for WPO's weights
                sq[s : s + CHUNK_TOKENS] = (2 * logits).logsumexp(dim=1) - 2 * lse
        ctx.save_for_backward(hidden, weight, bias, targets)
        ctx.mark_non_differentiable(sq)
        return out, sq

    @staticmethod
    def backward(ctx, grad_out: Tensor, _grad_sq: Tensor | None = None):  # type: ignore[override]
        hidden, weight, bias, targets = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        grad_h = torch.empty_like(hidden) if need_h else None
        cd = ctx.compute_dtype
        grad_w = torch.zeros_like(weight, dtype=cd) if need_w else None
        grad_b = torch.zeros_like(bias, dtype=cd) if (need_b and bias is not None) else None
        device, enabled, dtype = ctx.autocast
        with torch.autocast(device, dtype=dtype, enabled=enabled):
            _chunked_backward(hidden, weight, bias, targets, grad_out, cd, grad_h, grad_w, grad_b)
        return (
            grad_h,
            grad_w.to(weight.dtype) if grad_w is not None else None,
            grad_b.to(bias.dtype) if grad_b is not None else None,
            None,
            None,
        )


def _chunked_backward(hidden, weight, bias, targets, grad_out, cd, grad_h, grad_w, grad_b) -> None:
    """Fill grad_h / accumulate grad_w, grad_b chunk by chunk (any may be None)."""
    for s in range(0, hidden.shape[0], CHUNK_TOKENS):
        h = hidden[s : s + CHUNK_TOKENS]
        logits = F.linear(h, weight, bias).to(cd)
        # d/dlogits of log p_y = onehot(y) - softmax
        g = -torch.softmax(logits, dim=1)
        g.scatter_add_(1, targets[s : s + CHUNK_TOKENS, None], torch.ones_like(g[:, :1]))
        g.mul_(grad_out[s : s + CHUNK_TOKENS, None])
        if grad_h is not None:
            grad_h[s : s + CHUNK_TOKENS] = (g.to(weight.dtype) @ weight).to(hidden.dtype)
        if grad_w is not None:
            # summed over chunks (and over a chunk's tokens) in fp32: an autocast product would round each
            # chunk's sum to bf16 before it is added, which biases the head's gradient (docs/gpu.md has the figures)
            with torch.autocast(h.device.type, enabled=False):
                grad_w.addmm_(g.t(), h.to(cd))
        if grad_b is not None:
            grad_b += g.sum(0)


def token_logprobs_and_sq(hidden: Tensor, head: nn.Module, targets: Tensor, want_sq: bool = False,
                          pad_to_multiple_of: int | None = None) -> tuple[Tensor, Tensor | None]:
    """(log p(target), log Σ_v p_v² or None) per row; the second, without gradient, only when ``want_sq``. A
    fused head rounds its N rows up to ``pad_to_multiple_of`` (for kernels built per shape, as CPU bf16 ones are)."""
    if not _plain_linear(head):
        return _logprobs_of_logits(head(hidden), targets, want_sq)
    return _fused_linear(hidden, head, targets, want_sq, pad_to_multiple_of)


def _plain_linear(head: nn.Module) -> bool:
    # nn.Linear's own forward (FSDP2 and parametrizations subclass the module but keep it), so h W^T + b is
    # what the head computes and the chunked function may stand in for it
    return isinstance(head, nn.Linear) and type(head).forward is nn.Linear.forward


def _fused_linear(hidden: Tensor, head: nn.Linear, targets: Tensor, want_sq: bool,
                  pad_to_multiple_of: int | None) -> tuple[Tensor, Tensor | None]:
    n = hidden.shape[0]
    pad = -n % pad_to_multiple_of if pad_to_multiple_of else 0
    if pad:  # zero rows predicting token 0, dropped below: a few repeated shapes instead of a new one per batch
        hidden, targets = F.pad(hidden, (0, 0, 0, pad)), F.pad(targets, (0, pad))
    out, sq = _TokenLogprob.apply(hidden, head.weight, head.bias, targets, want_sq)
    return out[:n], sq[:n] if want_sq else None


def _logprobs_of_logits(logits: Tensor, targets: Tensor, want_sq: bool) -> tuple[Tensor, Tensor | None]:
    logits = logits.float()
    lse = logits.logsumexp(dim=1)
    sq = ((2 * logits).logsumexp(dim=1) - 2 * lse).detach() if want_sq else None
    return logits.gather(1, targets[:, None]).squeeze(1) - lse, sq


@contextlib.contextmanager
def response_head(head: nn.Module, rows: Tensor, pred: Tensor, targets: Tensor, want_sq: bool = False,
                  pad_to_multiple_of: int | None = None) -> Iterator[dict[str, Tensor | None]]:
    """For the block, ``head`` returns the log-probs of ``targets`` predicted at positions ``(rows, pred)`` of its
    (rows, positions, H) input instead of logits: what :func:`token_logprobs_and_sq` gives, as a (N,) tensor that
    the model's forward returns as its ``logits``; log Σ_v p_v² (``want_sq``) is left in the yielded dict's
    ``"sq"``. Only the head's ``forward`` is replaced, so the hooks on the module (DDP's, FSDP2's and ZeRO-3's
    parameter gathering and their backward hooks on its output) still run."""
    extras: dict[str, Tensor | None] = {"sq": None}
    own = head.__dict__.get("forward")
    original = head.forward

    def forward(hidden: Tensor) -> Tensor:
        sel = hidden[rows, pred]
        if _plain_linear(head):
            lp, extras["sq"] = _fused_linear(sel, head, targets, want_sq, pad_to_multiple_of)
        else:
            lp, extras["sq"] = _logprobs_of_logits(original(sel), targets, want_sq)
        return lp

    head.forward = forward
    try:
        yield extras
    finally:
        if own is None:
            del head.forward
        else:
            head.forward = own


def unwrap_model(model: nn.Module) -> nn.Module:
    """The transformers CausalLM inside peft / DDP wrappers (peft injects LoRA in place, so it stays active)."""
    while True:
        if hasattr(model, "get_base_model"):
            model = model.get_base_model()
        elif hasattr(model, "module") and isinstance(model.module, nn.Module):
            model = model.module
        else:
            return model


# The causal-LM forward that the fused head may stand in for: the backbone's last hidden state as it is, one head
# call on it, and the logits returned untouched (no scaling, soft-capping or transform before or after the head).
_HIDDEN = re.compile(r"^\s*hidden_states\s*=\s*(.*?)\s*$", re.M)
_PLAIN_HIDDEN = re.compile(r"\w*outputs(\.last_hidden_state|\[0\])|slice_logits_to_keep\(hidden_states, logits_to_keep\)")
_HEAD_CALL = re.compile(r"^\s*logits\s*=\s*self\.(\w+)\(hidden_states(\[[^\]]*\])?\)(\.float\(\)|\.contiguous\(\))?\s*$", re.M)
_LOGITS_CHANGED = re.compile(r"^\s*logits\s*(?:[-+*/]=|=[^\n]*(?:\blogits\b\s*[-+*/]|\w\(\s*logits\b))", re.M)


def _plain_head_forward(inner: nn.Module, head: nn.Module) -> bool:
    try:
        src = inspect.getsource(type(inner).forward)
    except (OSError, TypeError):
        return False
    call = _HEAD_CALL.search(src)
    return (call is not None and getattr(inner, call.group(1), None) is head
            and all(_PLAIN_HIDDEN.fullmatch(m) for m in _HIDDEN.findall(src[: call.start()]))
            and not _LOGITS_CHANGED.search(src[call.end():]))


def _fused_parts(model: nn.Module) -> tuple[nn.Module, nn.Module] | None:
    """(backbone, lm_head) when the head can be applied separately to selected positions: the model's forward
    is read, and any model that does more than ``head(backbone(x)[0])`` goes through its own forward."""
    inner = unwrap_model(model)
    config = getattr(inner, "config", None)
    # models that scale or soft-cap their logits go through their own forward
    scaled = ("final_logit_softcapping", "logit_scale", "output_multiplier", "lm_head_multiplier", "logits_scaling")
    if config is None or any(getattr(config.get_text_config(), k, None) is not None for k in scaled):
        return None
    try:
        backbone, head = inner.get_decoder(), inner.get_output_embeddings()
    except (AttributeError, NotImplementedError):
        return None
    if backbone is None or head is None or backbone is inner:
        return None
    # logits = head(backbone(x)[0]) only if those two are the whole model: a head module nested in another
    # (BERT's transform + decoder) or a further module with weights (a norm or projection between them) is not
    others = [m for m in inner.children() if m is not backbone and m is not head and any(True for _ in m.parameters())]
    if others or not any(m is head for m in inner.children()) or not _plain_head_forward(inner, head):
        return None
    return backbone, head


def response_positions(response_start: Tensor, response_len: Tensor, seq_len: int) -> tuple[Tensor, Tensor]:
    """(position, mask), response-aligned (R, T), T the longest response: position of each response's j-th token
    in its row (clamped into the row past the response's end, where mask is False)."""
    width = int(response_len.max().item()) if response_len.numel() else 0
    j = torch.arange(width, device=response_len.device)
    mask = j[None, :] < response_len[:, None]
    return (response_start[:, None] + j[None, :]).clamp(max=seq_len - 1), mask


def compute_pair_logps(model: nn.Module, batch: PairBatch, *, want_sq: bool = False) -> PairLogps:
    """Policy per-token log-probs of chosen and rejected (ref fields left None), one forward for both;
    ``want_sq`` adds log Σ_v p_v² per token (WPO's weights) as ``chosen_sq`` / ``rejected_sq``."""
    # gather indices the collator worked out: no host sync for a length or a mask's count here
    mask, rows, pred = batch.response_mask, batch.token_row, batch.token_pred
    targets = batch.input_ids[rows, batch.token_pos]
    inputs = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask, "use_cache": False}
    if batch.position_ids is not None:
        # the additive 4D mask must match the activations' dtype, which the input embedding sets
        dtype = unwrap_model(model).get_input_embeddings().weight.dtype
        attn = batch.attention_mask
        attn = attn.dense(batch.position_ids, dtype) if isinstance(attn, SharedMask) else attn.to(dtype)
        inputs.update(position_ids=batch.position_ids, attention_mask=attn)
    if batch.segments is not None:
        use_segment_attention(unwrap_model(model))
        inputs["prefkit_segments"] = batch.segments
    parts = _fused_parts(model)
    if parts is not None and _is_distributed_wrapper(model):
        with response_head(parts[1], rows, pred, targets, want_sq, batch.pad_to_multiple_of) as extras:
            token_lp = model(**inputs).logits
        token_sq = extras["sq"]
    elif parts is not None:
        backbone, head = parts
        hidden = backbone(**inputs)[0]
        token_lp, token_sq = token_logprobs_and_sq(hidden[rows, pred], head, targets, want_sq,
                                                   batch.pad_to_multiple_of)
    else:
        logits = model(**inputs).logits
        token_lp, token_sq = _logprobs_of_logits(logits[rows, pred], targets, want_sq)
    per_token = torch.zeros(mask.shape, dtype=token_lp.dtype, device=token_lp.device)
    per_token = per_token.masked_scatter(mask, token_lp)
    sq = None if token_sq is None else torch.zeros_like(per_token).masked_scatter(mask, token_sq.to(per_token.dtype))
    b = batch.num_pairs
    return PairLogps(
        chosen=per_token[:b],
        rejected=per_token[b:],
        chosen_mask=mask[:b],
        rejected_mask=mask[b:],
        chosen_weights=batch.chosen_weights,
        rejected_weights=batch.rejected_weights,
        chosen_sq=None if sq is None else sq[:b],
        rejected_sq=None if sq is None else sq[b:],
    )


def use_segment_attention(model: nn.Module) -> None:
    """Switch a transformers model from ``sdpa`` to :data:`~prefkit.data.types.SEGMENT_ATTENTION` (idempotent);
    the host layer must have registered it with transformers (:func:`prefkit.accel.install`)."""
    impl = getattr(model.config, "_attn_implementation", None)
    if impl == SEGMENT_ATTENTION:
        return
    if impl != "sdpa" or not getattr(model, "_supports_attention_backend", False):
        raise ModelError(f"packed pairs need a model whose attention runs on sdpa through transformers' attention "
                         f"interface ({type(model).__name__} uses {impl!r}); run with --pack_pairs false")
    if not segment_attention_registered():
        raise ModelError("packed pairs (--pack_pairs true) need the segment attention, which the host layer "
                         "registers with transformers: call prefkit.accel.install(config) first, or run with "
                         "--pack_pairs false")
    model.set_attn_implementation(SEGMENT_ATTENTION)


def segment_attention_registered() -> bool:
    return SEGMENT_ATTENTION in AttentionInterface()


def _is_distributed_wrapper(model: nn.Module) -> bool:
    # DDP syncs gradients, and FSDP/DeepSpeed gather sharded parameters, only through the root module's own
    # forward, so under any multi-process engine the model is called as a whole, its head patched
    # (response_head) rather than called apart from the backbone.
    dist = torch.distributed
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` in eval mode (dropout off) for the block, then back in the mode it was in, even on error."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)
