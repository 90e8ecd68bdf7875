"""Tiny random models of every causal-LM architecture in the installed transformers (the zoo test's models).

Each is built from its config class with small sizes (hidden 64, 2-4 layers, 4 heads, a 96-token vocabulary),
random weights from seed 0, fp32, eval mode. Windows, chunks and hybrid layer patterns are shrunk so that the test
pairs cross them: a sliding window of 8 tokens, at least one layer of every distinct layer type the default
config has.
"""

from __future__ import annotations

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

VOCAB = 96
WINDOW = 8

# every spelling of a size option across the config classes -> the tiny value
_SIZES = {
    ("hidden_size", "n_embd", "d_model", "dim", "embed_dim", "model_dim", "hidden_dim"): 64,
    ("num_attention_heads", "n_head", "num_heads", "n_heads", "attention_heads", "encoder_attention_heads",
     "decoder_attention_heads"): 4,
    ("num_key_value_heads", "n_kv_heads", "num_kv_heads", "multi_query_group_num", "n_head_kv"): 2,
    ("head_dim", "kv_channels", "attention_head_dim", "v_head_dim", "qk_nope_head_dim"): 16,
    ("qk_rope_head_dim",): 8,
    ("kv_lora_rank",): 32,
    ("q_lora_rank",): 32,
    ("intermediate_size", "n_inner", "ffn_dim", "ffn_hidden_size", "d_ff", "decoder_ffn_dim", "encoder_ffn_dim",
     "inner_hidden_size", "mlp_dim"): 128,
    ("moe_intermediate_size", "expert_intermediate_size", "shared_expert_intermediate_size", "moe_ffn_hidden_size",
     "shared_intermediate_size"): 32,
    ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts", "num_routed_experts"): 4,
    ("num_experts_per_tok", "top_k", "moe_topk", "num_experts_per_token", "moe_k"): 2,
    ("n_group",): 1,
    ("topk_group",): 1,
    ("vocab_size",): VOCAB,
    ("max_position_embeddings", "n_positions", "max_seq_len", "max_sequence_length", "n_ctx",
     "max_window_layers"): 256,
    ("sliding_window", "attention_window_size", "sliding_window_size", "window_size"): WINDOW,
    ("attention_chunk_size",): WINDOW,
    ("state_size", "ssm_state_size", "mamba_d_state", "d_state"): 8,
    ("mamba_n_heads", "linear_num_value_heads", "linear_num_key_heads"): 4,
    ("mamba_head_dim", "linear_key_head_dim", "linear_value_head_dim"): 16,
    ("time_step_rank", "mamba_dt_rank"): 8,
    ("num_global_key_value_heads",): 2,
}
_LAYERS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers", "decoder_layers")
_PATTERNS = ("layer_types", "layers_block_type", "block_types")


def causal_lm_types() -> list[str]:
    return sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


# families whose layer pattern lives in an option of their own: one token-mixing layer of each kind
_PATTERN_OPTIONS = {
    "lfm2": {"layer_types": ["conv", "full_attention"]},
    "lfm2_moe": {"layer_types": ["conv", "full_attention"]},
    "jamba": {"attn_layer_period": 2, "attn_layer_offset": 1, "expert_layer_period": 2, "expert_layer_offset": 1},
    "bamba": {"attn_layer_indices": [1]},
    "falcon_h1": {},
}


def _settable(cls: type, name: str) -> bool:
    return not isinstance(getattr(cls, name, None), property)


def tiny_config(model_type: str) -> PretrainedConfig:
    base = AutoConfig.for_model(model_type)
    overrides: dict = dict(_PATTERN_OPTIONS.get(model_type, {}))
    for names, value in _SIZES.items():
        for n in names:
            if getattr(base, n, None) is not None and isinstance(getattr(base, n), int) and not isinstance(
                    getattr(base, n), bool):
                overrides[n] = value
    if "num_key_value_heads" in overrides and getattr(base, "num_key_value_heads", None) == getattr(
            base, "num_attention_heads", None):
        overrides["num_key_value_heads"] = 4  # a model without grouped-query attention keeps one head per query
    n_layers = 2
    for p in _PATTERNS:
        pattern = getattr(base, p, None)
        if isinstance(pattern, (list, tuple)) and pattern and _settable(type(base), p) and p not in overrides:
            kinds = list(dict.fromkeys(pattern))[:4]  # one layer of every distinct type, in their first order
            n_layers = max(2, len(kinds))
            overrides[p] = (kinds * 2)[:n_layers]
    base_layers = next((getattr(base, n) for n in _LAYERS if isinstance(getattr(base, n, None), int)), None)
    for n in _LAYERS:
        if isinstance(getattr(base, n, None), int):
            overrides[n] = n_layers
    for k, v in base.to_dict().items():  # other per-layer lists (MLP types, per-layer limits) follow the layer count
        if k not in overrides and isinstance(v, list) and base_layers and len(v) == base_layers:
            overrides[k] = (list(dict.fromkeys(map(str, v))) and v)[:n_layers]
    for k in ("pad_token_id", "bos_token_id", "eos_token_id"):
        if isinstance(getattr(base, k, None), int) and getattr(base, k) >= VOCAB:
            overrides[k] = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}[k]
    overrides = {k: v for k, v in overrides.items() if _settable(type(base), k)}
    if hasattr(base, "is_decoder"):
        overrides["is_decoder"] = True  # encoder classes used as causal LMs (BERT-style) are causal only as decoders
    return type(base)(**{**base.to_dict(), **overrides})


MAX_PARAMS = 3_000_000


class TooLarge(ValueError):
    """A config whose sizes the tiny overrides do not reach (options this module does not know by name)."""


def tiny_model(model_type: str) -> torch.nn.Module:
    config = tiny_config(model_type)
    with torch.device("meta"):  # count first: an unshrunk option can make a tiny config a multi-GB model
        n = sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters())
    if n > MAX_PARAMS:
        raise TooLarge(f"{n / 1e6:.0f}M parameters at the tiny sizes")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return model.eval()


def pair_features(vocab: int, lengths=((5, 7, 4), (3, 9, 12), (6, 2, 3)), seed: int = 0) -> list[dict]:
    """Pairs of random tokens (ids 4..vocab-1, so no special ids) with the given (prompt, chosen, rejected)
    lengths; the second pair is longer than :data:`WINDOW`."""
    g = torch.Generator().manual_seed(seed)

    def ids(n: int) -> list[int]:
        return torch.randint(4, vocab, (n,), generator=g).tolist()

    return [{"prompt_ids": ids(p), "chosen_ids": ids(c), "rejected_ids": ids(r), "row_id": i}
            for i, (p, c, r) in enumerate(lengths)]
