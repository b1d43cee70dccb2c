"""The statistics `minsota compare` reports: mean ± std over seeds, and a paired t-test of a variant against the base.

Why paired: run k of every recipe is trained with the same seed (``train.seed``), which sets the
initialisation (and the end-of-run sample), so run k of the base and run k of a variant form a pair; where
the two share what the seed decides (the same initial weights when the parameter shapes agree, as for a
changed learning rate), the per-seed differences cancel it, which Welch's unpaired test would count as noise.
The data order does not depend on the seed: every run of every recipe sees the same batches in the same order.
So the spread over seeds measures initialisation variance, not data-order variance, and a difference is
established for this one data order. The test needs no assumption about the correlation within a pair: it is
valid whether or not pairing helps.

scipy is not a dependency for one distribution: Student's t CDF comes from the regularized incomplete beta
function, evaluated by its continued fraction (Numerical Recipes 3rd ed. §6.4, modified Lentz), and the
quantile for the confidence interval by bisection on that CDF.
"""

import math
from dataclasses import dataclass

_TINY = 1e-300  # keeps Lentz's denominators off zero


def mean_std(values) -> tuple[float, float]:
    """Mean and sample standard deviation (n - 1 in the denominator; 0.0 for a single value)."""
    n = len(values)
    mean = sum(values) / n
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0


def _beta_continued_fraction(a: float, b: float, x: float) -> float:
    def nonzero(v):
        return v if abs(v) > _TINY else _TINY

    c, d = 1.0, 1.0 / nonzero(1.0 - (a + b) * x / (a + 1.0))
    result = d
    for m in range(1, 1000):
        even = m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m))
        odd = -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))
        for coefficient in (even, odd):
            d = 1.0 / nonzero(1.0 + coefficient * d)
            c = nonzero(1.0 + coefficient / c)
            result *= c * d
        if abs(c * d - 1.0) < 1e-15:
            break
    return result


def incomplete_beta(a: float, b: float, x: float) -> float:
    """The regularized incomplete beta function I_x(a, b)."""
    if x <= 0.0 or x >= 1.0:
        return 0.0 if x <= 0.0 else 1.0
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    # the continued fraction converges fast only below (a + 1) / (a + b + 2); use the symmetry above it
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _beta_continued_fraction(a, b, x) / a
    return 1.0 - math.exp(log_front) * _beta_continued_fraction(b, a, 1.0 - x) / b


def t_two_sided_p(t: float, df: float) -> float:
    """P(|T| >= |t|) for Student's t with ``df`` degrees of freedom."""
    return incomplete_beta(df / 2.0, 0.5, df / (df + t * t))


def t_quantile(level: float, df: float) -> float:
    """The t with P(|T| <= t) = level (e.g. level 0.95, df 4 -> 2.776)."""
    low, high = 0.0, 1.0
    while t_two_sided_p(high, df) > 1.0 - level:
        high *= 2.0
    for _ in range(200):  # p is monotone in t: bisect to float precision
        mid = (low + high) / 2.0
        low, high = (mid, high) if t_two_sided_p(mid, df) > 1.0 - level else (low, mid)
    return (low + high) / 2.0


def confidence_half_width(std: float, n: int, level: float = 0.95) -> float:
    """Half the width of the two-sided ``level`` confidence interval of a mean over ``n`` values (Student t)."""
    return t_quantile(level, n - 1) * std / math.sqrt(n)


@dataclass
class Difference:
    """variant − base: the mean over seeds, its confidence interval and the two-sided p-value (None for one seed)."""

    mean: float
    ci_low: float | None
    ci_high: float | None
    p_value: float | None


def paired_difference(base, variant, level: float = 0.95) -> Difference:
    """Paired t-test of ``variant[k] - base[k]`` (lists ordered by seed) against zero."""
    differences = [v - b for b, v in zip(base, variant, strict=True)]
    n = len(differences)
    mean, std = mean_std(differences)
    if n < 2:
        return Difference(mean, None, None, None)
    if std == 0.0:  # identical differences in every seed: no spread to test against
        return Difference(mean, mean, mean, 1.0 if mean == 0.0 else 0.0)
    half_width = confidence_half_width(std, n, level)
    return Difference(mean, mean - half_width, mean + half_width, t_two_sided_p(mean / (std / math.sqrt(n)), n - 1))
