"""Paired statistics over assays: differences, bootstrap CIs, Wilcoxon, and power.

Every comparison of two configurations a, b is paired by assay: Δ_i = ρ_i(a) − ρ_i(b).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.stats import bootstrap, nct, norm, wilcoxon
from scipy.stats import t as student_t

#: Resamples of the percentile bootstrap, its confidence level, and the power calculation's
#: settings (two-sided α, target power).
N_RESAMPLES = 10_000
CI_LEVEL = 0.95
ALPHA = 0.05
POWER = 0.8
MAX_ASSAYS = 1_000_000


def win_rate(a: np.ndarray, b: np.ndarray) -> float:
    """% of assays where a > b (strictly; ties count as losses)."""
    return float(100.0 * np.mean(a > b))


def wilcoxon_p(a: np.ndarray, b: np.ndarray) -> float | None:
    """Two-sided Wilcoxon signed-rank p of the paired differences (None when all are zero)."""
    if len(a) < 2 or np.all(a == b):
        return None
    return float(wilcoxon(a, b).pvalue)


def bootstrap_ci(values: np.ndarray, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap CI (``CI_LEVEL``) of the mean, resampling assays with replacement
    (``N_RESAMPLES`` resamples, seeded); a point when every value is the same."""
    v = np.asarray(values, dtype=np.float64)
    if len(v) < 2 or np.ptp(v) == 0:
        m = float(v.mean()) if len(v) else float("nan")
        return m, m
    res = bootstrap(
        (v,),
        np.mean,
        n_resamples=N_RESAMPLES,
        confidence_level=CI_LEVEL,
        method="percentile",
        rng=np.random.default_rng(seed),
    )
    return float(res.confidence_interval.low), float(res.confidence_interval.high)


def t_test_power(n: int, effect: float) -> float:
    """Power of the two-sided one-sample t-test at level ``ALPHA`` with n pairs, for a
    standardised effect d = mean Δ / sd Δ: P(|T| > t_{1−α/2, n−1}), T ~ noncentral
    t(n − 1, √n·d)."""
    df = n - 1
    crit = student_t.ppf(1 - ALPHA / 2, df)
    nc = np.sqrt(n) * effect
    return float(nct.sf(crit, df, nc) + nct.cdf(-crit, df, nc))


def assays_needed(mean: float, sd: float) -> int | None:
    """Smallest number of assays for which a paired t-test at two-sided α = ``ALPHA`` detects
    a true mean difference ``mean`` with power ``POWER``, if the per-assay differences have
    standard deviation ``sd``; None when mean = 0 (or more than ``MAX_ASSAYS``).

    Starts from the normal approximation n ≈ ((z_{1−α/2} + z_{power})·sd/|mean|)² and steps
    to the exact noncentral-t answer. (The Wilcoxon test needs ≈ 5 % more for normal Δ: its
    asymptotic relative efficiency is 3/π.)
    """
    if mean == 0 or not np.isfinite(mean):
        return None
    if sd == 0:
        return 2
    d = abs(mean) / sd
    n = max(2, int(np.ceil(((norm.ppf(1 - ALPHA / 2) + norm.ppf(POWER)) / d) ** 2)))
    if n > MAX_ASSAYS:
        return None
    while n > 2 and t_test_power(n - 1, d) >= POWER:
        n -= 1
    while t_test_power(n, d) < POWER:
        n += 1
        if n > MAX_ASSAYS:
            return None
    return n


@dataclass(frozen=True)
class Paired:
    """a vs b over the same assays."""

    n: int
    mean: float  # mean Δ
    ci: tuple[float, float]  # bootstrap CI of mean Δ
    sd: float  # sd of Δ over assays (ddof = 1)
    wins: int  # assays with a > b
    wilcoxon_p: float | None
    assays_needed: int | None  # for ``POWER`` at the observed mean and sd

    @property
    def win_rate(self) -> float:
        return 100.0 * self.wins / self.n if self.n else float("nan")

    @property
    def resolved(self) -> bool:
        """Whether the CI excludes 0."""
        return self.ci[0] > 0 or self.ci[1] < 0


def paired(a: np.ndarray, b: np.ndarray, seed: int = 0) -> Paired:
    """Paired summary of Δ = a − b."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    d = a - b
    sd = float(d.std(ddof=1)) if len(d) > 1 else float("nan")
    mean = float(d.mean())
    return Paired(
        n=len(d),
        mean=mean,
        ci=bootstrap_ci(d, seed),
        sd=sd,
        wins=int(np.sum(a > b)),
        wilcoxon_p=wilcoxon_p(a, b),
        assays_needed=assays_needed(mean, sd) if np.isfinite(sd) else None,
    )
