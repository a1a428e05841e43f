"""The book's one rule for calling a difference between two methods real."""
from __future__ import annotations

import math


def difference_is_real(mean_a: float, std_a: float, mean_b: float, std_b: float, n: int,
                       single_seed_margin: float = 1.0) -> tuple[float, bool]:
    """(2·SE, real) for the difference of two means over ``n`` seeds each: real when
    |mean_a − mean_b| > 2·√((s²ₐ + s²ᵦ)/n), roughly a 95% test with few seeds. With one seed
    there is no spread to compare with; then 2·SE is NaN and the difference counts as real
    only beyond ``single_seed_margin`` points."""
    diff = mean_a - mean_b
    if n > 1:
        two_se = 2 * math.sqrt((std_a ** 2 + std_b ** 2) / n)
        return two_se, abs(diff) > two_se
    return math.nan, abs(diff) > single_seed_margin


def verdict(mean_a: float, std_a: float, mean_b: float, std_b: float, n: int,
            names: tuple[str, str] = ("A", "B"), single_seed_margin: float = 1.0) -> tuple[float, str]:
    """(2·SE, word) where word is "<A> better", "<B> better" or "tie" by
    :func:`difference_is_real`."""
    two_se, real = difference_is_real(mean_a, std_a, mean_b, std_b, n, single_seed_margin)
    if not real:
        return two_se, "tie"
    return two_se, f"{names[0] if mean_a > mean_b else names[1]} better"
