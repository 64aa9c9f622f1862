"""The experiment's statistics: intervals over seeds and paired bootstraps over users. The only owner.

What is computed, exactly
-------------------------
Per-user metrics. From a user's 0-based target rank r (None: not in the ranked top K, see `cprec.eval.ranks`),
HR@K = 1 if r < K else 0 and NDCG@K = 1 / log2(r + 2) if r < K else 0 (one relevant item), as in
`cprec.eval.metrics`; the mean over users is the metric that `results.json` reports.

Interval over seeds (`seed_interval`). For one model, domain and metric, the n values x_1..x_n are the metric
of n training seeds (all on the same users and candidates). The report gives the mean and the two-sided 95%
Student-t interval mean +- t(0.975, n-1) * s / sqrt(n), s the sample standard deviation (ddof 1). With one
value (a deterministic model such as the base model zero-shot, or one seed) the interval is None: there is
no spread to estimate, and the report says "single run".

Paired bootstrap over users (`paired_bootstrap`). Two models A and B scored on the same users u_1..u_m: each
user's metric is first averaged over that model's seeds (a_i, b_i), giving per-user differences
d_i = a_i - b_i whose mean is the observed difference (= metric of A minus metric of B, seed-averaged). The
bootstrap draws B_n resamples of m users with replacement (numpy PCG64 seeded by `seed`) and takes each
resample's mean difference d*. Its 2.5% and 97.5% percentiles (numpy's linear interpolation) are the 95%
interval of the difference. The two-sided p-value of "no difference" is the percentile-bootstrap one:
p = min(1, 2 * min(#{d* <= 0} + 1, #{d* >= 0} + 1) / (B_n + 1)) — so p is never 0 (its floor is
2 / (B_n + 1)), and all-zero differences give p = 1. Users, not seeds, are resampled: seeds vary training,
users are the sample of the population the claim is about. The difference is called significant at level
alpha = 0.05 when p < alpha (then the interval also excludes 0, up to the bootstrap's granularity); no
correction for the several comparisons is applied, and the report says so.
"""

from __future__ import annotations

import math

import numpy as np

from cprec.errors import CPRecError
from cprec.eval.metrics import HR_KS, NDCG_KS

ALPHA = 0.05
# t(0.975, df) for df = 1..30 from tables; past 30 the Cornish-Fisher expansion around the normal quantile,
# within 1e-4 there (scipy is not a dependency)
_T975 = [12.7062, 4.3027, 3.1824, 2.7764, 2.5706, 2.4469, 2.3646, 2.3060, 2.2622, 2.2281, 2.2010, 2.1788,
         2.1604, 2.1448, 2.1314, 2.1199, 2.1098, 2.1009, 2.0930, 2.0860, 2.0796, 2.0739, 2.0687, 2.0639, 2.0595,
         2.0555, 2.0518, 2.0484, 2.0452, 2.0423]


def t975(df: int) -> float:
    """The 97.5% quantile of Student's t with `df` degrees of freedom."""
    if df < 1:
        raise CPRecError(f"a t interval needs at least 2 values, got {df + 1}")
    if df <= len(_T975):
        return _T975[df - 1]
    z = 1.959964
    return (z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)
            + (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / (384 * df**3))


def metric_names() -> list[str]:
    return [f"HR@{k}" for k in HR_KS] + [f"NDCG@{k}" for k in NDCG_KS]


def per_user(ranks: list[int | None], metric: str) -> np.ndarray:
    """Each user's HR@K or NDCG@K from its target rank (None: outside the ranked top K)."""
    kind, k = metric.split("@")
    k = int(k)
    hit = np.array([r is not None and r < k for r in ranks], dtype=bool)
    if kind == "HR":
        return hit.astype(np.float64)
    if kind == "NDCG":
        return np.array([1.0 / math.log2(r + 2) if h else 0.0 for r, h in zip(ranks, hit)])
    raise CPRecError(f"unknown metric '{metric}' (HR@K or NDCG@K)")


def seed_interval(values: list[float]) -> dict:
    """{mean, low, high, n}: the mean over seeds and its two-sided 95% t interval (None with one value)."""
    x = np.asarray(values, dtype=np.float64)
    if x.size == 0:
        raise CPRecError("no values to average over seeds")
    mean = float(x.mean())
    if x.size == 1:
        return {"mean": mean, "low": None, "high": None, "n": 1}
    half = t975(x.size - 1) * float(x.std(ddof=1)) / math.sqrt(x.size)
    return {"mean": mean, "low": mean - half, "high": mean + half, "n": int(x.size)}


def paired_bootstrap(a, b, resamples: int = 10_000, seed: int = 0) -> dict:
    """{diff, low, high, p, users, resamples}: A minus B over users paired by position (see the docstring)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1 or a.size == 0:
        raise CPRecError(f"a paired bootstrap needs the same users on both sides, got {a.shape} and {b.shape}")
    if resamples < 1:
        raise CPRecError(f"bootstrap resamples must be at least 1, got {resamples}")
    d = a - b
    rng = np.random.default_rng(seed)
    boot = np.empty(resamples)
    for start in range(0, resamples, 1000):  # bounded memory: 1000 x users indices at a time
        n = min(1000, resamples - start)
        boot[start:start + n] = d[rng.integers(0, d.size, size=(n, d.size))].mean(axis=1)
    below, above = int(np.sum(boot <= 0)), int(np.sum(boot >= 0))
    p = min(1.0, 2.0 * min(below + 1, above + 1) / (resamples + 1))
    low, high = np.percentile(boot, [2.5, 97.5])
    return {"diff": float(d.mean()), "low": float(low), "high": float(high), "p": p, "users": int(d.size),
            "resamples": resamples}


def seed_averaged_per_user(rank_lists: list[list[int | None]], metric: str) -> np.ndarray:
    """A model's per-user metric averaged over its seeds (each list: one seed's ranks, users in one order)."""
    if len({len(r) for r in rank_lists}) != 1:
        raise CPRecError("the seeds of one model were scored on different numbers of users")
    return np.mean([per_user(r, metric) for r in rank_lists], axis=0)


def significant(test: dict, alpha: float = ALPHA) -> bool:
    return test["p"] < alpha


def describe(test: dict, a: str, b: str, metric: str, alpha: float = ALPHA) -> str:
    """One sentence in words: which model is better and whether the difference is significant."""
    diff, lo, hi = test["diff"], test["low"], test["high"]
    span = f"{metric} difference {diff:+.4f}, 95% CI [{lo:+.4f}, {hi:+.4f}], p = {test['p']:.4f}"
    if not significant(test, alpha):
        return f"{a} vs {b}: no significant difference ({span})."
    better, worse = (a, b) if diff > 0 else (b, a)
    return f"{a} vs {b}: {better} is significantly better than {worse} at the {alpha:g} level ({span})."
