"""On-policy pairs: sample k completions per prompt, score them with a checker, reward model or user code,
and pair them (docs/pairs.md). Used by `prefkit pairs`, `prefkit train --rounds` and `prefkit bench`."""

from prefkit.pairs.pairing import PAIRINGS, pair_samples
from prefkit.pairs.pipeline import (
    PairOptions,
    SampleOptions,
    Summary,
    make_pairs,
    score_and_pair,
    write_outputs,
)
from prefkit.pairs.sample import Generations, generate
from prefkit.pairs.scorers import build_scorer, final_number, math_equal

__all__ = [
    "PAIRINGS",
    "Generations",
    "PairOptions",
    "SampleOptions",
    "Summary",
    "build_scorer",
    "final_number",
    "generate",
    "make_pairs",
    "math_equal",
    "pair_samples",
    "score_and_pair",
    "write_outputs",
]
