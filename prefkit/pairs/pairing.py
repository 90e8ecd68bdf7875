"""Pairing rules: a prompt's scored samples → (chosen, rejected) index pairs.

Identical completions count once (the first one). A pair needs a strictly higher chosen score: pairs of
distinct completions with equal scores are ties, dropped and counted.

- ``best_worst``: the first best-scored sample against the first worst-scored one (one pair, or a tie);
- ``all``: every (i, j) with score_i > score_j, i-major in sample order; with ``max_pairs`` a random subset of
  that many (the list shuffled with the caller's ``random.Random``, then cut);
- ``random``: ``max_pairs`` (default 1) pairs drawn at random from ``all``'s pairs.

With a ``fallback`` (a reference solution) a prompt with no correct sample (score ≥ ``correct``) pairs the
reference, as chosen, against its samples: index :data:`FALLBACK`.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

PAIRINGS = ("best_worst", "all", "random")
FALLBACK = -1


@dataclass
class PromptPairs:
    pairs: list[tuple[int, int]]  # (chosen index, rejected index) into the prompt's samples; FALLBACK: reference
    tied_pairs: int  # pairs of distinct completions with equal scores
    duplicates: int  # samples identical to an earlier one
    used_fallback: bool


def pair_samples(texts: list[str], scores: list[float], *, pairing: str, rng: random.Random,
                 max_pairs: int | None = None, fallback: bool = False, correct: float = 1.0) -> PromptPairs:
    """Pairs for one prompt; NaN-scored samples are skipped (the caller counts them)."""
    first: dict[str, int] = {}
    for i, (t, s) in enumerate(zip(texts, scores)):
        if not math.isnan(s) and t not in first:
            first[t] = i
    scored = sum(not math.isnan(s) for s in scores)
    order = list(first.values())
    score = {i: scores[i] for i in order}
    used_fallback = fallback and order != [] and not any(score[i] >= correct for i in order)
    if used_fallback:
        order = [FALLBACK, *order]
        score[FALLBACK] = math.inf
    tied = sum(score[a] == score[b] for x, a in enumerate(order) for b in order[x + 1 :])
    pairs: list[tuple[int, int]]
    if pairing == "best_worst":
        pairs = []
        if order:
            best = max(order, key=lambda i: score[i])  # max/min return the first of equals: sample order
            worst = min(order, key=lambda i: score[i])
            pairs = [(best, worst)] if score[best] > score[worst] else []
    elif pairing in ("all", "random"):
        pairs = [(a, b) for a in order for b in order if score[a] > score[b]]
        cap = max_pairs if max_pairs is not None else (1 if pairing == "random" else None)
        if cap is not None and pairs:
            rng.shuffle(pairs)
            pairs = pairs[:cap]
    else:
        raise ValueError(f"unknown pairing {pairing!r}")
    return PromptPairs(pairs, tied, scored - len(first), used_fallback)
