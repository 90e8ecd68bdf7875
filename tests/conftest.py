"""Shared fixtures: an offline word-level tokenizer and tiny random causal LMs built from configs."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

# the same fp32 defaults on every machine (and in the subprocesses tests launch), so figures compare across
# machines; the bf16 defaults of CPUs with bf16 matmul (AMX, AVX512-BF16) are tested by monkeypatching the detection
os.environ["PREFKIT_CPU_BF16"] = "0"

WORDS = (
    "the a cat dog sat ran on under mat log red blue big small quickly slowly home park what is it yes no "
    "good bad answer question Human Assistant : , . ? ! 1 2 3 4 5 6 7 8 9 0 + = hello world"
).split()
SPECIALS = ["<pad>", "<s>", "</s>", "<unk>", "<|user|>", "<|assistant|>", "<|system|>", "<|end|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} <|end|> {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|> {% endif %}"
)


def make_tokenizer(chat_template: bool = True, bos: bool = True) -> PreTrainedTokenizerFast:
    vocab = {t: i for i, t in enumerate(SPECIALS + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    if bos:  # like Llama: the tokenizer puts BOS in front by itself
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", vocab["<s>"])])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
        bos_token="<s>" if bos else None,
    )
    if chat_template:
        fast.chat_template = CHAT_TEMPLATE
    return fast


@pytest.fixture
def tiny_tokenizer() -> PreTrainedTokenizerFast:
    return make_tokenizer()


def _small(vocab: int) -> dict:
    return dict(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=256)


@pytest.fixture
def tiny_llama(tiny_tokenizer) -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**_small(len(tiny_tokenizer))))


@pytest.fixture
def tiny_qwen2(tiny_tokenizer) -> Qwen2ForCausalLM:
    torch.manual_seed(0)
    return Qwen2ForCausalLM(Qwen2Config(**_small(len(tiny_tokenizer))))


@pytest.fixture
def tmp_jsonl(tmp_path: Path) -> Callable[[list, str], Path]:
    def write(rows: list, name: str = "data.jsonl") -> Path:
        path = tmp_path / name
        with path.open("w") as f:
            for r in rows:
                f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
        return path

    return write


@pytest.fixture
def model_dir(tmp_path: Path, tiny_tokenizer) -> Path:
    """A tiny random Llama and its tokenizer saved as an HF model directory."""
    torch.manual_seed(0)
    cfg = LlamaConfig(**_small(len(tiny_tokenizer)), bos_token_id=tiny_tokenizer.bos_token_id,
                      eos_token_id=tiny_tokenizer.eos_token_id, pad_token_id=tiny_tokenizer.pad_token_id)
    path = tmp_path / "model"
    LlamaForCausalLM(cfg).save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path


def poison_loss(monkeypatch: pytest.MonkeyPatch, on_call: int | None = None) -> list[int]:
    """Make the objective's loss NaN, at every call or only at its ``on_call``-th (1-based); returns the list that
    counts the calls (clear it to count again)."""
    from prefkit.objectives.objective import Objective

    real, calls = Objective.__call__, []

    def poisoned(self, logps):
        out = real(self, logps)
        calls.append(1)
        if on_call is None or len(calls) == on_call:
            out.loss = out.loss * torch.tensor(float("nan"))
        return out

    monkeypatch.setattr(Objective, "__call__", poisoned)
    return calls
