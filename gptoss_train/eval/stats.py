"""Confidence intervals and paired significance for eval scores (stdlib only: no scipy needed at eval time).

* Pass rates (0/1 per sample): Wilson score interval, which behaves at 0% and 100% and on small n (AIME has 30 items),
  unlike the normal approximation.
* Mean of fractional scores (pass^k, partial credit): percentile bootstrap over samples, seeded.
* Base vs tuned on the same items: exact McNemar test on the discordant pairs, and a paired bootstrap interval of
  the score difference.
"""

from __future__ import annotations

import math
import random

Z95 = 1.959963984540054


def wilson_interval(successes: float, n: int, z: float = Z95) -> tuple[float, float]:
    if n == 0:
        return (0.0, 0.0)
    p = successes / n
    denominator = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator
    return (max(0.0, centre - half), min(1.0, centre + half))


def bootstrap_interval(values: list[float], *, resamples: int = 2000, seed: int = 0, level: float = 0.95):
    if not values:
        return (0.0, 0.0)
    rng = random.Random(seed)
    n = len(values)
    means = sorted(sum(values[rng.randrange(n)] for _ in range(n)) / n for _ in range(resamples))
    low = means[int((1 - level) / 2 * resamples)]
    high = means[min(resamples - 1, int((1 + level) / 2 * resamples))]
    return (low, high)


def score_interval(scores: list[float]) -> dict:
    """Mean with a 95% interval: Wilson when every score is 0/1, bootstrap otherwise."""
    n = len(scores)
    mean = sum(scores) / n if n else 0.0
    if all(score in (0, 1) for score in scores):
        low, high = wilson_interval(sum(scores), n)
        method = "wilson"
    else:
        low, high = bootstrap_interval(scores)
        method = "bootstrap"
    return {"mean": mean, "ci95": [low, high], "ci_method": method, "n": n}


def mcnemar_exact(base_only: int, tuned_only: int) -> float:
    """Two-sided exact McNemar p-value from the discordant counts (binomial test with p = 1/2)."""
    discordant = base_only + tuned_only
    if discordant == 0:
        return 1.0
    k = min(base_only, tuned_only)
    tail = sum(math.comb(discordant, i) for i in range(k + 1)) / 2**discordant
    return min(1.0, 2 * tail)


def paired_bootstrap(base: list[float], tuned: list[float], *, resamples: int = 2000, seed: int = 0) -> dict:
    """Difference of means (tuned - base) over paired items, its 95% interval and a two-sided bootstrap p-value."""
    if len(base) != len(tuned):
        raise ValueError("paired_bootstrap needs the same items on both sides")
    n = len(base)
    if n == 0:
        return {"delta": 0.0, "ci95": [0.0, 0.0], "p_value": 1.0}
    differences = [t - b for b, t in zip(base, tuned)]
    delta = sum(differences) / n
    rng = random.Random(seed)
    deltas = sorted(sum(differences[rng.randrange(n)] for _ in range(n)) / n for _ in range(resamples))
    low, high = deltas[int(0.025 * resamples)], deltas[min(resamples - 1, int(0.975 * resamples))]
    # share of resampled deltas on the other side of zero, doubled
    if delta > 0:
        p_value = 2 * sum(d <= 0 for d in deltas) / resamples
    elif delta < 0:
        p_value = 2 * sum(d >= 0 for d in deltas) / resamples
    else:
        p_value = 1.0
    return {"delta": delta, "ci95": [low, high], "p_value": min(1.0, p_value)}
