"""The bench's arithmetic pairs come from prefkit.pairs' sampler, checker and pairing: the same seeds give the
same pairs as the bench's own sampler and checker did before they folded in (kept verbatim below as the
reference implementation)."""

from __future__ import annotations

import itertools
import random
import re

import pytest
import torch

from prefkit.bench.arithmetic import extract_answer, make_model, make_splits, make_tokenizer
from prefkit.bench.generate import generate
from prefkit.bench.tasks import _pairs_from_samples

# ---- the bench's sampler, checker and pairing before prefkit.pairs (commit 2701928), verbatim ------------

_OLD_ANSWER = re.compile(r"A:(-?\d+)")


def _old_extract_answer(text):
    found = _OLD_ANSWER.findall(text)
    return int(found[-1]) if found else None


def _old_encode_left(tokenizer, prompts, device):
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        enc = tokenizer(prompts, return_tensors="pt", padding=True)
    finally:
        tokenizer.padding_side = side
    return {k: v.to(device) for k, v in enc.items() if k in ("input_ids", "attention_mask")}


def _old_gen_lengths(gen, eos):
    is_eos = gen == eos
    return torch.where(is_eos.any(1), is_eos.float().argmax(1) + 1, torch.full_like(gen[:, 0], gen.shape[1]))


@torch.no_grad()
def _old_generate(model, tokenizer, prompts, *, max_new_tokens, batch_size=64, do_sample=False, temperature=1.0,
                  num_return_sequences=1):
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    texts, lengths = [], []
    sampling = dict(do_sample=True, temperature=temperature, top_k=0, top_p=1.0) if do_sample else dict(do_sample=False)
    try:
        for start in range(0, len(prompts), batch_size):
            enc = _old_encode_left(tokenizer, prompts[start : start + batch_size], device)
            out = model.generate(
                **enc, max_new_tokens=max_new_tokens, num_return_sequences=num_return_sequences,
                pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, **sampling,
            )
            gen = out[:, enc["input_ids"].shape[1] :]
            n = _old_gen_lengths(gen, tokenizer.eos_token_id)
            for row, k in zip(gen, n.tolist()):
                texts.append(tokenizer.decode(row[:k], skip_special_tokens=True))
                lengths.append(k)
    finally:
        model.train(was_training)
    return texts, lengths


def _old_pairs_from_samples(problems, texts, k, max_pairs, rng, extract, reference_fallback=False):
    rows, n_both, n_correct = [], 0, 0
    for i, p in enumerate(problems):
        samples = list(dict.fromkeys(texts[i * k : (i + 1) * k]))
        good = [s for s in samples if extract(s) == p.answer]
        bad = [s for s in samples if extract(s) != p.answer]
        if not good and reference_fallback:
            good = [p.solution]
        n_correct += sum(extract(s) == p.answer for s in texts[i * k : (i + 1) * k])
        if good and bad:
            n_both += 1
            combos = list(itertools.product(good, bad))
            rng.shuffle(combos)
            rows += [{"prompt": p.prompt, "chosen": c, "rejected": r} for c, r in combos[:max_pairs]]
    return rows, n_both, n_correct


# ---- the bench's pair section (prepare_arithmetic), run with the old and the current code ----------------

def _bench_pairs(gen, pairs_from_samples, extract, model, tok, splits, *, fallback: bool):
    k, max_new = 6, 16
    torch.manual_seed(5)
    rng = random.Random(5)
    out = []
    for split in ("pref", "val"):
        probs = splits[split]
        texts = gen(model, tok, [p.prompt for p in probs], max_new_tokens=max_new, batch_size=7, do_sample=True,
                    temperature=1.0, num_return_sequences=k)
        out.append(pairs_from_samples(probs, texts, k, 2, rng, extract, fallback))
    return out


def _solver_like_model(tok, splits):
    """A tiny model nudged towards the task's format, so that samples are a mix of correct and incorrect."""
    torch.manual_seed(0)
    model = make_model(tok, hidden_size=32, num_layers=1, num_heads=2)
    opt = torch.optim.Adam(model.parameters(), lr=3e-2)
    texts = [p.prompt + p.solution + tok.eos_token for p in splits["sft"]]
    for _ in range(25):
        enc = tok(texts, return_tensors="pt", padding=True)
        labels = enc.input_ids.masked_fill(enc.attention_mask == 0, -100)
        loss = model(**enc, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@pytest.mark.slow
def test_arithmetic_pairs_are_the_same_as_the_old_sampler_and_checker():
    tok = make_tokenizer()
    splits = make_splits(3, {"sft": 56, "pref": 14, "val": 8}, num_terms=2, digits=1)
    model = _solver_like_model(tok, splits)
    new_gen = lambda *a, **kw: generate(*a, **kw).texts  # noqa: E731
    old_gen = lambda *a, **kw: _old_generate(*a, **kw)[0]  # noqa: E731
    seen_correct = seen_pairs = 0
    for fallback in (False, True):
        old = _bench_pairs(old_gen, _old_pairs_from_samples, _old_extract_answer, model, tok, splits, fallback=fallback)
        new = _bench_pairs(new_gen, _pairs_from_samples, extract_answer, model, tok, splits, fallback=fallback)
        assert new == old
        seen_correct += sum(n_correct for _, _, n_correct in old)
        seen_pairs += sum(len(rows) for rows, _, _ in old)
    assert seen_correct > 0 and seen_pairs > 0  # the comparison covered pairs, not only empty lists


@pytest.mark.slow
def test_generate_token_counts_match_the_old_sampler():
    tok = make_tokenizer()
    splits = make_splits(4, {"x": 5}, num_terms=2, digits=2)
    torch.manual_seed(0)
    model = make_model(tok, hidden_size=16, num_layers=1, num_heads=2).eval()
    prompts = [p.prompt for p in splits["x"]]
    torch.manual_seed(1)
    old = _old_generate(model, tok, prompts, max_new_tokens=8, batch_size=2, do_sample=True, num_return_sequences=3)
    torch.manual_seed(1)
    new = generate(model, tok, prompts, max_new_tokens=8, batch_size=2, do_sample=True, num_return_sequences=3)
    assert (new.texts, new.num_tokens) == old
