"""Statistics of the bench's paired claims (docs/bench.md): Student's t distribution, the paired t-test, the
sign-flip permutation test, Holm's step-down adjustment, the minimum detectable effect at a given power and
the number of seeds that power needs. Pure Python (no SciPy in the environment)."""

from __future__ import annotations

import itertools
import math
import random

EXACT_MAX_N = 16  # 2^16 sign patterns are enumerated; beyond, Monte Carlo
MC_DRAWS = 100_000
MC_SEED = 0


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the regularised incomplete beta function (modified Lentz)."""
    tiny, qab, qap, qam = 1e-300, a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 500):
        m2 = 2 * m
        for num in (m * (b - m) * x / ((qam + m2) * (a + m2)), -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))):
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-15:
            break
    return h


def betainc(a: float, b: float, x: float) -> float:
    """I_x(a, b), the regularised incomplete beta function."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def t_cdf(t: float, df: int) -> float:
    """P(T ≤ t) for Student's t with ``df`` degrees of freedom."""
    tail = 0.5 * betainc(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t > 0 else tail


def t_quantile(p: float, df: int) -> float:
    """The p-quantile of Student's t (bisection on :func:`t_cdf`)."""
    lo, hi = -1e3, 1e3
    for _ in range(200):
        mid = (lo + hi) / 2
        if t_cdf(mid, df) < p:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def _mean_sd(values: list[float]) -> tuple[float, float]:
    n = len(values)
    mean = sum(values) / n
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))


def paired_t_p(diffs: list[float]) -> float:
    """Two-sided p of the paired t-test of mean(diffs) = 0 (n ≥ 2); 1 when every difference is 0."""
    mean, sd = _mean_sd(diffs)
    if sd == 0.0:
        return 1.0 if mean == 0.0 else 0.0
    t = mean / (sd / math.sqrt(len(diffs)))
    return 2.0 * t_cdf(-abs(t), len(diffs) - 1)


def sign_flip_p(diffs: list[float], draws: int = MC_DRAWS, seed: int = MC_SEED) -> float:
    """Two-sided sign-flip permutation p: the share of the 2^n sign patterns whose |Σ ±d_s| reaches the
    observed |Σ d_s| (the observed pattern included). Exact for n ≤ 16; beyond, ``draws`` random patterns from
    a fixed seed, counted with the observed one ((k + 1) / (draws + 1)). Needs no normality: with n seeds it
    cannot go below 2/2^n."""
    n = len(diffs)
    observed = abs(sum(diffs)) * (1 - 1e-12)  # ties (equal |sums| up to rounding) count as reaching it
    if n <= EXACT_MAX_N:
        hits = sum(abs(sum(s * d for s, d in zip(signs, diffs))) >= observed
                   for signs in itertools.product((1.0, -1.0), repeat=n))
        return hits / 2**n
    rng = random.Random(seed)
    hits = sum(abs(sum(d if rng.random() < 0.5 else -d for d in diffs)) >= observed for _ in range(draws))
    return (hits + 1) / (draws + 1)


def holm(pvalues: list[float]) -> list[float]:
    """Holm's step-down adjusted p-values (family-wise error control), in the input order: the k-th smallest
    of m is multiplied by m − k + 1, made monotone, capped at 1."""
    m = len(pvalues)
    order = sorted(range(m), key=lambda i: pvalues[i])
    out, running = [0.0] * m, 0.0
    for k, i in enumerate(order):
        running = max(running, min(1.0, (m - k) * pvalues[i]))
        out[i] = running
    return out


def mde(sd: float, n: int, alpha: float = 0.05, power: float = 0.8) -> float:
    """Minimum detectable effect of a two-sided paired t-test at level ``alpha`` with ``power``, n pairs of
    paired SD ``sd``: (t_{1−α/2, n−1} + t_{power, n−1})·sd/√n."""
    return (t_quantile(1 - alpha / 2, n - 1) + t_quantile(power, n - 1)) * sd / math.sqrt(n)


def seeds_for_power(sd: float, effect: float, alpha: float = 0.05, power: float = 0.8, max_n: int = 1000) -> int:
    """The fewest paired seeds (≥ 2) whose :func:`mde` is at most ``effect``, from a pilot's paired SD."""
    for n in range(2, max_n + 1):
        if mde(sd, n, alpha, power) <= effect:
            return n
    return max_n
