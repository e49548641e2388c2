"""Intervals for comparing runs: over seeds (Student t) and over evaluation items (bootstrap).

- `t_interval(xs)`: mean, sample standard deviation (ddof 1) and the two-sided 95%
  Student-t interval `mean ± t_{0.975, n-1}·std/√n` of one cell's per-seed values.
- `paired_difference(xs, ys)`: the same interval for the per-seed differences x_i - y_i
  (seed i of both cells shares its initialisation seed and data order, so the pairing
  removes the seed-to-seed variation both cells share); `significant` when it excludes 0.
- `bootstrap_interval(scores)`: percentile bootstrap (Efron & Tibshirani 1993, ch. 13) of
  the mean over items of a downstream task: items are resampled with replacement; with
  several seeds, an item's score is its mean over the seeds.

scipy (a dependency of jax) supplies the t quantile; the bootstrap is a few lines of numpy
so that it is seeded and vectorised the same way everywhere.
"""

from __future__ import annotations

import math

import numpy as np

LEVEL = 0.95


def t_interval(xs, level: float = LEVEL) -> dict:
    """{n, mean, std, lo, hi}; std, lo and hi are NaN with fewer than two values."""
    from scipy import stats  # about 1 s to import; only the t quantile needs it

    x = np.asarray(xs, np.float64)
    n = len(x)
    if n == 0:
        raise ValueError("t_interval: no values")
    mean = float(x.mean())
    if n < 2:
        return {"n": n, "mean": mean, "std": math.nan, "lo": math.nan, "hi": math.nan}
    std = float(x.std(ddof=1))
    half = float(stats.t.ppf(0.5 + level / 2, n - 1)) * std / math.sqrt(n)
    return {"n": n, "mean": mean, "std": std, "lo": mean - half, "hi": mean + half}


def paired_difference(xs, ys, level: float = LEVEL) -> dict:
    """t interval of x_i - y_i over paired seeds; `significant` when it excludes 0."""
    x, y = np.asarray(xs, np.float64), np.asarray(ys, np.float64)
    if x.shape != y.shape:
        raise ValueError(f"paired_difference: {len(x)} vs {len(y)} values; pair by seed")
    out = t_interval(x - y, level)
    out["significant"] = bool(out["lo"] > 0 or out["hi"] < 0)  # False when NaN (n < 2)
    return out


def bootstrap_interval(scores, level: float = LEVEL, n_resamples: int = 2000,
                       seed: int = 0) -> dict:
    """Percentile bootstrap of the mean item score. `scores`: [items] or [seeds, items]
    (an item's score is then its mean over seeds). Returns {n, mean, lo, hi}."""
    s = np.asarray(scores, np.float64)
    if s.ndim == 2:
        s = s.mean(0)
    n = len(s)
    if n == 0:
        raise ValueError("bootstrap_interval: no items")
    rng = np.random.default_rng(seed)
    means = s[rng.integers(0, n, size=(n_resamples, n))].mean(1)
    lo, hi = np.quantile(means, [0.5 - level / 2, 0.5 + level / 2])
    return {"n": n, "mean": float(s.mean()), "lo": float(lo), "hi": float(hi)}
