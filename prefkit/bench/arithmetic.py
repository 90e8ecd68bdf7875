"""A verifiable multi-step arithmetic task, small enough to train a model on 2 CPU cores.

It stands in for the ADPO paper's GSM8K setting (arXiv 2602.09533, §5: pairs of correct vs incorrect worked
solutions sampled from the policy): a prompt ``Q:47+38-19=?`` and a worked solution with one line per step,
``47+38=85`` / ``85-19=66`` / ``A:66``. An exact checker labels any sampled solution. The tokenizer is
character-level (every digit its own token), so carries are real multi-token reasoning for a tiny model.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from prefkit.errors import ConfigError
from prefkit.pairs.scorers import last_match

CHARS = list("0123456789+-=?:\nQA")
SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]
ANSWER = re.compile(r"A:(-?\d+)")


@dataclass(frozen=True)
class Problem:
    prompt: str
    solution: str
    answer: int


def make_problem(rng: random.Random, num_terms: int, digits: int) -> Problem:
    """``num_terms`` numbers of ``digits`` digits joined by + or −; the solution folds left, one step a line."""
    lo, hi = 10 ** (digits - 1), 10**digits - 1
    nums = [rng.randint(lo, hi) for _ in range(num_terms)]
    ops = [rng.choice("+-") for _ in range(num_terms - 1)]
    expr = str(nums[0]) + "".join(f"{op}{n}" for op, n in zip(ops, nums[1:]))
    acc, lines = nums[0], []
    for op, n in zip(ops, nums[1:]):
        new = acc + n if op == "+" else acc - n
        lines.append(f"{acc}{op}{n}={new}")
        acc = new
    return Problem(prompt=f"Q:{expr}=?\n", solution="\n".join(lines) + f"\nA:{acc}", answer=acc)


def make_splits(seed: int, sizes: dict[str, int], num_terms: int, digits: int) -> dict[str, list[Problem]]:
    """Disjoint splits (no prompt appears in two splits), deterministic in ``seed``."""
    distinct = (9 * 10 ** (digits - 1)) ** num_terms * 2 ** (num_terms - 1)
    if sum(sizes.values()) > 3 * distinct // 4:  # rejection sampling of unseen prompts slows down as it fills up
        raise ConfigError(f"task_options: {sum(sizes.values())} problems requested but only {distinct} distinct "
                          f"problems exist with num_terms={num_terms}, digits={digits}; ask for at most three quarters")
    rng = random.Random(seed)
    seen: set[str] = set()
    out: dict[str, list[Problem]] = {}
    for name, n in sizes.items():
        split: list[Problem] = []
        while len(split) < n:
            p = make_problem(rng, num_terms, digits)
            if p.prompt not in seen:
                seen.add(p.prompt)
                split.append(p)
        out[name] = split
    return out


def extract_answer(text: str) -> int | None:
    """The integer after the last ``A:``; None when the solution gives no final answer. The same extraction as
    the ``regex:A:(-?\\d+)`` scorer of `prefkit pairs` (its :func:`~prefkit.pairs.scorers.last_match`)."""
    found = last_match(ANSWER, text)
    return int(found) if found is not None else None


def make_tokenizer() -> PreTrainedTokenizerFast:
    """Character-level tokenizer; it prepends BOS by itself, like Llama's."""
    vocab = {t: i for i, t in enumerate(SPECIALS + CHARS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", vocab["<s>"])])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


def make_model(tokenizer: PreTrainedTokenizerFast, *, hidden_size: int, num_layers: int, num_heads: int,
               max_positions: int = 128) -> LlamaForCausalLM:
    """A tiny random Llama (seed the global RNG before calling for a reproducible init)."""
    cfg = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=4 * hidden_size,
        num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=num_heads,
        max_position_embeddings=max_positions, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True,
    )
    return LlamaForCausalLM(cfg)
