"""Small pure statistics for win-rates: binomial intervals, the sign test, Holm's correction.

Conventions used across the evaluation (and stated in every judge.json):

* win rate = (wins + ties / 2) / n, ties counted as half a win, n = all comparisons.
* ci90 = the 90% Wilson score interval of that rate with n trials and `wins + ties / 2`
  successes. A tie scored 1/2 has less variance than a Bernoulli trial of the same mean
  (Var = p_w + p_t/4 − p² ≤ p(1 − p)), so treating it as one binomial trial is conservative:
  the interval is, if anything, too wide, never too narrow.
* p_value = two-sided exact sign test of wins against losses, ties excluded (H0: P(win) =
  P(loss)); 1.0 when there are no decisive comparisons.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from statistics import NormalDist

CI_LEVEL = 0.90
CI_METHOD = "wilson"
CI_NOTE = ("90% Wilson score interval of the ties-as-half win rate over all n comparisons "
           "(ties count as half a success; conservative for ties)")
P_VALUE_NOTE = "two-sided exact sign test, wins vs losses, ties excluded"


def z_value(level: float = CI_LEVEL) -> float:
    """The two-sided normal quantile for a `level` interval (1.6449 for 90%)."""
    if not 0 < level < 1:
        raise ValueError(f"confidence level must be in (0, 1), got {level}")
    return NormalDist().inv_cdf(0.5 + level / 2)


def wilson_interval(successes: float, n: float, level: float = CI_LEVEL) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion; `successes` may be fractional (ties as
    half). (0.0, 1.0) when n is 0."""
    if n < 0 or successes < 0 or successes > n:
        raise ValueError(f"need 0 <= successes <= n, got successes={successes}, n={n}")
    if n == 0:
        return 0.0, 1.0
    z = z_value(level)
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def _log_binom_pmf(k: int, n: int, p: float) -> float:
    if p <= 0:
        return 0.0 if k == 0 else -math.inf
    if p >= 1:
        return 0.0 if k == n else -math.inf
    return (math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)
            + k * math.log(p) + (n - k) * math.log1p(-p))


def binom_cdf(k: int, n: int, p: float) -> float:
    """P(X <= k) for X ~ Binomial(n, p)."""
    if k < 0:
        return 0.0
    if k >= n:
        return 1.0
    return min(1.0, sum(math.exp(_log_binom_pmf(i, n, p)) for i in range(k + 1)))


def clopper_pearson_interval(successes: int, n: int, level: float = CI_LEVEL
                             ) -> tuple[float, float]:
    """Exact (Clopper–Pearson) interval for integer counts, by bisection on the binomial CDF."""
    if n < 0 or not 0 <= successes <= n or int(successes) != successes:
        raise ValueError(f"need integers 0 <= successes <= n, got {successes}, {n}")
    if n == 0:
        return 0.0, 1.0
    alpha = 1 - level
    # Lower bound: P(X >= s | p) = alpha/2 (increasing in p); upper: P(X <= s | p) = alpha/2
    # (decreasing in p).
    lower = 0.0 if successes == 0 else _bisect(
        lambda p: 1 - binom_cdf(successes - 1, n, p), alpha / 2, increasing=True)
    upper = 1.0 if successes == n else _bisect(
        lambda p: binom_cdf(successes, n, p), alpha / 2, increasing=False)
    return lower, upper


def _bisect(f, target: float, increasing: bool) -> float:
    """p in [0, 1] with f(p) = target, for a monotone f."""
    lo, hi = 0.0, 1.0
    for _ in range(100):
        mid = (lo + hi) / 2
        if (f(mid) < target) == increasing:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def sign_test_p_value(wins: int, losses: int) -> float:
    """Two-sided exact sign test (binomial test of wins among wins + losses against 1/2)."""
    if wins < 0 or losses < 0:
        raise ValueError(f"counts must be >= 0, got wins={wins}, losses={losses}")
    n = wins + losses
    if n == 0:
        return 1.0
    tail = binom_cdf(min(wins, losses), n, 0.5)
    return min(1.0, 2 * tail)


def holm(p_values: Sequence[float | None]) -> list[float | None]:
    """Holm–Bonferroni step-down adjusted p-values, in input order (None entries are skipped
    and stay None; the family is the non-None ones)."""
    indexed = sorted((p, i) for i, p in enumerate(p_values) if p is not None)
    m = len(indexed)
    adjusted: list[float | None] = [None] * len(p_values)
    running = 0.0
    for rank, (p, i) in enumerate(indexed):
        if not 0 <= p <= 1:
            raise ValueError(f"p-values must be in [0, 1], got {p}")
        running = max(running, min(1.0, (m - rank) * p))
        adjusted[i] = running
    return adjusted


def win_summary(wins: int, ties: int, losses: int, level: float = CI_LEVEL) -> dict:
    """win_rate (ties as half), its Wilson interval, and the sign-test p-value."""
    n = wins + ties + losses
    score = wins + ties / 2
    lo, hi = wilson_interval(score, n, level)
    return {
        "n": n, "wins": wins, "ties": ties, "losses": losses,
        "win_rate": score / n if n else None,
        "ci90": [lo, hi],
        "p_value": sign_test_p_value(wins, losses),
    }
