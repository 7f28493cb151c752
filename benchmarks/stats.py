"""Small-sample statistics for the benchmark: t confidence intervals over seeds, paired differences, and a
question bootstrap.

Two sources of noise, reported separately because they answer different questions:

* **seeds** (training noise): the mean over seeds with a Student-t 95% interval (``t_{0.975, n-1} s / sqrt(n)``);
  the paired difference of two methods uses the per-seed differences (same seed = same data order).
* **questions** (which test questions were drawn): a paired bootstrap over questions of the seed-averaged
  difference. All methods answer the same questions, so this is the noise of "would it hold on other questions".

A difference is called *inside the noise* when either interval contains 0.
"""

from __future__ import annotations

import math
import random
import statistics

# Two-sided 95% Student-t quantiles t_{0.975, df}, used when scipy is not installed.
_T975 = {
    1: 12.706,
    2: 4.303,
    3: 3.182,
    4: 2.776,
    5: 2.571,
    6: 2.447,
    7: 2.365,
    8: 2.306,
    9: 2.262,
    10: 2.228,
    11: 2.201,
    12: 2.179,
    13: 2.160,
    14: 2.145,
    15: 2.131,
    16: 2.120,
    17: 2.110,
    18: 2.101,
    19: 2.093,
    20: 2.086,
    25: 2.060,
    30: 2.042,
    40: 2.021,
    60: 2.000,
    120: 1.980,
}


def t_quantile(df: int, level: float = 0.95) -> float:
    """Two-sided ``level`` quantile of Student's t with ``df`` degrees of freedom (scipy if present, else a table)."""
    if df < 1:
        return float("nan")
    try:
        from scipy.stats import t

        return float(t.ppf(0.5 + level / 2, df))
    except ImportError:
        if level != 0.95:
            raise
        known = sorted(_T975)
        below = max(k for k in known if k <= df) if df <= known[-1] else known[-1]
        return _T975[below] if df <= known[-1] else 1.960


def mean_ci(values, level: float = 0.95) -> dict:
    """``{"mean", "half", "low", "high", "n", "sd"}``: the mean and its t interval (half = nan for n < 2)."""
    values = [float(v) for v in values if v is not None and math.isfinite(v)]
    n = len(values)
    if n == 0:
        return {
            "mean": float("nan"),
            "half": float("nan"),
            "low": float("nan"),
            "high": float("nan"),
            "n": 0,
            "sd": float("nan"),
        }
    mean = statistics.fmean(values)
    if n < 2:
        return {
            "mean": mean,
            "half": float("nan"),
            "low": float("nan"),
            "high": float("nan"),
            "n": 1,
            "sd": float("nan"),
        }
    sd = statistics.stdev(values)
    half = t_quantile(n - 1, level) * sd / math.sqrt(n)
    return {"mean": mean, "half": half, "low": mean - half, "high": mean + half, "n": n, "sd": sd}


def paired_diff_ci(a: dict, b: dict, level: float = 0.95) -> dict:
    """Mean and t interval of ``a[seed] - b[seed]`` over the seeds both have."""
    seeds = sorted(set(a) & set(b))
    out = mean_ci([a[s] - b[s] for s in seeds], level)
    out["seeds"] = seeds
    return out


def example_bootstrap_mean(per_task, n_boot: int = 2000, level: float = 0.95, seed: int = 0) -> dict:
    """Bootstrap over questions / examples of a macro-averaged mean: ``{"mean", "low", "high"}``.

    ``per_task`` holds, for each task, a list of vectors (one per seed) over the same ordered examples. Each
    example's value is averaged over seeds; examples are then resampled with replacement within each task and the
    task means averaged, so the interval is the noise of "which examples were drawn", not of training.
    """
    values = []
    for vectors in per_task:
        vectors = list(vectors)
        if not vectors:
            return {"mean": float("nan"), "low": float("nan"), "high": float("nan")}
        n = len(vectors[0])
        if any(len(v) != n for v in vectors):
            raise ValueError("bootstrap: runs were scored on different questions")
        values.append([statistics.fmean(v[i] for v in vectors) for i in range(n)])
    if not values:
        return {"mean": float("nan"), "low": float("nan"), "high": float("nan")}
    rng = random.Random(seed)
    boots = sorted(statistics.fmean(statistics.fmean(rng.choices(d, k=len(d))) for d in values) for _ in range(n_boot))
    lo = boots[int((1 - level) / 2 * n_boot)]
    hi = boots[min(n_boot - 1, int((1 + level) / 2 * n_boot))]
    return {"mean": statistics.fmean(statistics.fmean(d) for d in values), "low": lo, "high": hi}


def question_bootstrap_diff(
    per_task: list[tuple[list[list[float]], list[list[float]]]], n_boot: int = 2000, level: float = 0.95, seed: int = 0
) -> dict:
    """Paired bootstrap over questions of the macro-averaged ``a - b`` (accuracy 0/1 or per-example losses).

    ``per_task`` holds, for each task, ``(values_a, values_b)``: lists of vectors, one per seed, over the same
    ordered questions. Each question's difference of seed means is resampled (:func:`example_bootstrap_mean`).
    """
    diffs = []
    for values_a, values_b in per_task:
        if not values_a or not values_b:
            return {"mean": float("nan"), "low": float("nan"), "high": float("nan")}
        n = len(values_a[0])
        if any(len(v) != n for v in values_a + values_b):
            raise ValueError("question bootstrap: runs were scored on different questions")
        diffs.append(
            [[statistics.fmean(v[i] for v in values_a) - statistics.fmean(v[i] for v in values_b) for i in range(n)]]
        )
    return example_bootstrap_mean(diffs, n_boot, level, seed)


def inside_noise(*intervals: dict) -> bool:
    """True when any of the intervals is undefined or contains 0."""
    for ci in intervals:
        low, high = ci.get("low", float("nan")), ci.get("high", float("nan"))
        if not (math.isfinite(low) and math.isfinite(high)) or low <= 0 <= high:
            return True
    return False


def median_iqr(values) -> dict:
    values = sorted(float(v) for v in values if math.isfinite(v))
    if not values:
        return {"median": float("nan"), "q1": float("nan"), "q3": float("nan"), "n": 0}
    if len(values) == 1:
        return {"median": values[0], "q1": values[0], "q3": values[0], "n": 1}
    q = statistics.quantiles(values, n=4, method="inclusive")
    return {"median": statistics.median(values), "q1": q[0], "q3": q[2], "n": len(values)}
