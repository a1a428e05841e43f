"""The book's rules for calling a difference real — between two PTQ methods over seeds
(:func:`verdict`), between two accuracy predictors on the same configurations
(:func:`mae_verdict`) — and the error metrics, with bootstrap intervals, that chapters 5–7
judge predictors by."""
from __future__ import annotations

import math

import numpy as np

#: "near float": a quantized model within this many top-1 points of its float model, where
#: deployment decisions are made (the population's dense band, chapters 5–6's per-band errors)
BAND_POINTS = 10.0


def pooled_sd(stds, counts) -> tuple[float, int]:
    """The seed-to-seed standard deviation pooled over groups (e.g. every method × setting
    of one model), √(Σ(nᵢ − 1)sᵢ² / Σ(nᵢ − 1)), and its degrees of freedom Σ(nᵢ − 1).
    Groups of one seed (or a NaN std) add nothing. (nan, 0) when no group repeats a seed."""
    num, df = 0.0, 0
    for sd, n in zip(stds, counts):
        n = int(n)
        if n >= 2 and math.isfinite(float(sd)):
            num += (n - 1) * float(sd) ** 2
            df += n - 1
    return (math.sqrt(num / df) if df else math.nan), df


def difference_is_real(mean_a: float, mean_b: float, n_a: int, n_b: int, sd: float, df: int,
                       single_seed_margin: float = 1.0) -> tuple[float, bool]:
    """(half-width, real) for the difference of two means over ``n_a`` and ``n_b`` seeds:
    a two-sided 95% t test, real when the absolute difference exceeds
    t₀.₉₇₅(df) · sd · √(1/n_a + 1/n_b).

    ``sd`` is the seed-to-seed standard deviation pooled over every run of the model
    (:func:`pooled_sd`) on ``df`` degrees of freedom, not the two groups' own: two seeds
    give a std on one degree of freedom (t₀.₉₇₅ = 12.7) that can come out 0.00 and make any
    gap "real". With a pooled spread the same rule serves one seed and several. Without
    one (df = 0: no run of the model repeats a seed) the half-width is NaN and the
    difference counts as real only beyond ``single_seed_margin`` points."""
    from scipy import stats

    if min(n_a, n_b) < 1:
        raise ValueError(f"each mean needs at least one seed, got n_a={n_a}, n_b={n_b}")
    diff = mean_a - mean_b
    if df < 1 or not math.isfinite(sd):
        return math.nan, abs(diff) > single_seed_margin
    half = float(stats.t.ppf(0.975, df)) * sd * math.sqrt(1 / n_a + 1 / n_b)
    return half, abs(diff) > half


def verdict(mean_a: float, mean_b: float, n_a: int, n_b: int, sd: float, df: int,
            names: tuple[str, str] = ("A", "B"), single_seed_margin: float = 1.0) -> tuple[float, str]:
    """(half-width, word) where word is "<A> better", "<B> better" or "tie" by
    :func:`difference_is_real`."""
    half, real = difference_is_real(mean_a, mean_b, n_a, n_b, sd, df, single_seed_margin)
    if not real:
        return half, "tie"
    return half, f"{names[0] if mean_a > mean_b else names[1]} better"


# --- predictors: error metrics with bootstrap intervals ------------------------------------

def _point_metrics(y, p) -> dict[str, float]:
    from scipy import stats

    err = p - y
    ss_tot = float(((y - y.mean()) ** 2).sum())
    const = len(set(np.round(y, 9))) < 2 or len(set(np.round(p, 9))) < 2
    return {"MAE": float(np.abs(err).mean()), "RMSE": float(np.sqrt((err ** 2).mean())),
            "max": float(np.abs(err).max()), "bias": float(err.mean()),
            "Spearman": math.nan if const else float(stats.spearmanr(y, p).statistic),
            "Kendall": math.nan if const else float(stats.kendalltau(y, p).statistic),
            "R2": 1 - float((err ** 2).sum()) / ss_tot if ss_tot > 0 else math.nan}


def regression_metrics(y_true, y_pred, *, n_boot: int = 1000, seed: int = 0, level: float = 0.95) -> dict:
    """MAE, RMSE, largest absolute error, bias (mean of prediction − truth), Spearman and Kendall rank
    correlation and R² of ``y_pred`` against ``y_true`` (points), each with a percentile
    bootstrap interval over the evaluated items (``n_boot`` resamples, ``level``).
    Returns {metric: (value, low, high)}."""
    y, p = np.asarray(y_true, dtype=float), np.asarray(y_pred, dtype=float)
    if y.shape != p.shape or y.ndim != 1 or len(y) == 0:
        raise ValueError(f"y_true and y_pred must be equal-length non-empty 1-D, got {y.shape} and {p.shape}")
    point = _point_metrics(y, p)
    rng = np.random.default_rng(seed)
    boots = {k: [] for k in point}
    for _ in range(n_boot if len(y) > 1 else 0):
        i = rng.integers(0, len(y), len(y))
        for k, v in _point_metrics(y[i], p[i]).items():
            boots[k].append(v)
    a = (1 - level) / 2
    out = {}
    for k, v in point.items():
        b = np.asarray([x for x in boots[k] if not math.isnan(x)])
        out[k] = (v, float(np.quantile(b, a)), float(np.quantile(b, 1 - a))) if len(b) else (v, math.nan, math.nan)
    return out


def mae_difference(y_true, pred_a, pred_b, *, n_boot: int = 2000, seed: int = 0,
                   level: float = 0.95) -> tuple[float, float, float]:
    """MAE(a) − MAE(b) on the same items with a paired percentile bootstrap interval:
    (difference, low, high). An interval that excludes 0 is the book's "beyond the
    intervals" for two predictors."""
    y, a, b = (np.asarray(v, dtype=float) for v in (y_true, pred_a, pred_b))
    if not (y.shape == a.shape == b.shape) or len(y) == 0:
        raise ValueError("y_true, pred_a and pred_b must be equal-length and non-empty")
    d = np.abs(a - y) - np.abs(b - y)
    rng = np.random.default_rng(seed)
    boots = d[rng.integers(0, len(d), (n_boot, len(d)))].mean(1)
    q = (1 - level) / 2
    return float(d.mean()), float(np.quantile(boots, q)), float(np.quantile(boots, 1 - q))


def mae_verdict(y_true, pred_a, pred_b, *, margin: float = 0.0, n_boot: int = 2000,
                seed: int = 0) -> dict:
    """Predictor ``a`` against ``b`` on the same items by :func:`mae_difference`: "better"
    when the interval of MAE(a) − MAE(b) lies below 0 and the difference exceeds ``margin``
    (e.g. the predictor's own seed-to-seed spread), "worse" when it lies above 0 and exceeds
    ``margin``, else "not distinguishable". Returns {"diff", "low", "high", "verdict"}."""
    d, lo, hi = mae_difference(y_true, pred_a, pred_b, n_boot=n_boot, seed=seed)
    if lo > 0 and d > margin:
        word = "worse"
    elif hi < 0 and -d > margin:
        word = "better"
    else:
        word = "not distinguishable"
    return {"diff": d, "low": lo, "high": hi, "verdict": word}


def seed_proof(verdicts: list[dict]) -> str:
    """One verdict from several runs (seeds × splits) of :func:`mae_verdict`: "better" or
    "worse" only when every run says so, else "not distinguishable": wording that no
    reseeding in the set overturns."""
    if not verdicts:
        raise ValueError("no runs to combine: pass one mae_verdict per seed and split")
    words = {v["verdict"] for v in verdicts}
    return words.pop() if len(words) == 1 and "not distinguishable" not in words else "not distinguishable"


def versus(verdict: str) -> str:
    """The verdict word as a phrase before the other predictor's name: "better than",
    "worse than", "not distinguishable from"."""
    return {"better": "better than", "worse": "worse than",
            "not distinguishable": "not distinguishable from"}[verdict]


def span(values, fmt: str = "{:.2f}", unit: str = "") -> str:
    """The range of ``values`` as prose: "0.12 to 0.40", or one number when both ends print
    the same ("0.12", not "0.12 to 0.12"); ``unit`` follows each number."""
    vals = [float(v) for v in values]
    if not vals:
        raise ValueError("span needs at least one value")
    lo, hi = (fmt.format(v) + unit for v in (min(vals), max(vals)))
    return lo if lo == hi else f"{lo} to {hi}"


def count_text(k: int, n: int, noun: str = "setting") -> str:
    """"1 of 6 settings", "all 3 settings", "none of the 2 settings", "the one setting"."""
    if not 0 <= k <= n or n < 1:
        raise ValueError(f"need 0 ≤ k ≤ n and n ≥ 1, got k={k}, n={n}")
    plural = noun + ("" if n == 1 else "s")
    if n == 1:
        return f"the one {noun}" if k == 1 else f"not the one {noun}"
    if k == n:
        return f"all {n} {plural}" if n > 2 else f"both {plural}"
    if k == 0:
        return f"none of the {n} {plural}"
    return f"{k} of {n} {plural}"


def interval(value: float, low: float, high: float, digits: int = 2, signed: bool = False) -> str:
    """ "1.23 [0.98, 1.51]" (``signed``: "+1.23 [+0.98, +1.51]")."""
    f = f"{{:{'+' if signed else ''}.{digits}f}}"
    return f"{f.format(value)} [{f.format(low)}, {f.format(high)}]"


def near_float(float_acc, acc) -> np.ndarray:
    """Which models lie within :data:`BAND_POINTS` of their float model (drop ≤ the band)."""
    return (np.asarray(float_acc, dtype=float) - np.asarray(acc, dtype=float)) <= BAND_POINTS
