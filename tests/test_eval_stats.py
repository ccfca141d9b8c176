"""Paired statistics, the PCA baselines and the probe options (issue 18 items 3–5)."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.decomposition import PCA

from models.evaluation.baselines import CONCAT, TOP, Baselines, pca_basis
from models.evaluation.folds import random_folds
from models.evaluation.options import Probe
from models.evaluation.probe import probe_score
from models.evaluation.stats import assays_needed, bootstrap_ci, paired, t_test_power
from models.moments import Moments

# -- item 3: paired differences, bootstrap CI, Wilcoxon, power ---------------------------------


def test_bootstrap_ci_covers_the_mean_and_narrows_with_more_assays():
    rng = np.random.default_rng(0)
    small, large = rng.normal(0.02, 0.04, 20), rng.normal(0.02, 0.04, 500)
    lo_s, hi_s = bootstrap_ci(small)
    lo_l, hi_l = bootstrap_ci(large)
    assert lo_s < small.mean() < hi_s and lo_l < large.mean() < hi_l
    assert hi_l - lo_l < (hi_s - lo_s) / 3  # ∝ 1/√n: √25 = 5
    # Percentile bootstrap ≈ mean ± 1.96·sd/√n for many assays.
    half = 1.96 * large.std(ddof=1) / np.sqrt(len(large))
    assert (hi_l - lo_l) / 2 == pytest.approx(half, rel=0.1)
    assert bootstrap_ci(np.full(10, 0.3)) == pytest.approx((0.3, 0.3))
    assert bootstrap_ci(small) == bootstrap_ci(small)  # seeded


def test_assays_needed_is_the_paired_t_test_sample_size():
    # Textbook values for a two-sided paired t-test at α = 0.05, power 0.8: d = 0.5 → 34,
    # d = 0.8 → 15, d = 0.2 → 199.
    assert assays_needed(0.5, 1.0) == 34
    assert assays_needed(-0.8, 1.0) == 15
    assert assays_needed(0.02, 0.1) == 199
    n = assays_needed(0.004, 0.039)
    assert t_test_power(n, 0.004 / 0.039) >= 0.8 > t_test_power(n - 1, 0.004 / 0.039)
    assert assays_needed(0.0, 0.1) is None


def test_paired_summary():
    a = np.array([0.5, 0.4, 0.3, 0.6, 0.2, 0.45])
    b = a - np.array([0.1, 0.05, -0.02, 0.08, 0.03, 0.04])
    p = paired(a, b)
    assert p.n == 6 and p.wins == 5 and p.win_rate == pytest.approx(100 * 5 / 6)
    assert p.mean == pytest.approx(0.28 / 6)
    assert p.ci[0] < p.mean < p.ci[1] and p.resolved
    assert p.wilcoxon_p is not None and 0 < p.wilcoxon_p < 0.1
    assert p.assays_needed == assays_needed(p.mean, p.sd) == 9  # d = 1.12: few assays do
    same = paired(a, a)
    assert same.mean == 0 and same.wilcoxon_p is None and not same.resolved
    assert same.assays_needed is None


# -- item 4: PCA baselines from the joint moments ----------------------------------------------


def test_pca_from_moments_equals_pca_of_the_rows():
    rng = np.random.default_rng(1)
    dims = [3, 5, 8]
    rows = rng.normal(size=(400, 16)) @ rng.normal(size=(16, 16)) + 5.0
    m = Moments(16)
    for chunk in np.array_split(rows, 7):  # streamed in batches, like a fit
        m.update(chunk)
    b = Baselines.from_moments(m, dims, k_max=8)
    ref = PCA(n_components=8).fit(rows)
    # Same subspace and scores up to each component's sign.
    scores = b.concat.project(rows)
    want = ref.transform(rows)
    signs = np.sign(np.sum(scores * want, axis=0))
    np.testing.assert_allclose(scores, want * signs, atol=1e-8)
    np.testing.assert_allclose(b.concat.variances, ref.explained_variance_ * 399 / 400)
    top = PCA(n_components=8).fit(rows[:, 8:]).transform(rows[:, 8:])
    got = b.top.project(rows[:, 8:])
    np.testing.assert_allclose(np.abs(got), np.abs(top), atol=1e-8)
    # Linear: the projection of a mean-pooled block is the mean of the projections.
    raw = [rows[:50, :3], rows[:50, 3:8], rows[:50, 8:]]
    pooled = b.project([x.mean(axis=0, keepdims=True) for x in raw])
    per_row = b.project(raw)
    for kind in (CONCAT, TOP):
        np.testing.assert_allclose(pooled[kind][0], per_row[kind].mean(axis=0), atol=1e-10)
    with pytest.raises(ValueError, match="k must be"):
        pca_basis(m.mean, m.covariance(), 17)


# -- item 5: the probe options -----------------------------------------------------------------


def test_probe_options_differ_as_documented():
    rng = np.random.default_rng(2)
    n = 200
    signal = rng.normal(size=(n, 5))
    y = signal @ rng.normal(size=5) + 0.3 * rng.normal(size=n)
    folds = random_folds(n, seed=0)
    # Loud noise columns: standardisation makes them as loud as the signal, no standardisation
    # lets their scale dominate the penalty; a different answer, neither random.
    x = np.hstack([signal, 100.0 * rng.normal(size=(n, 40))])
    std = probe_score(x, y, folds, probe=Probe.standardised)
    raw = probe_score(x, y, folds, probe=Probe.unstandardised)
    spr = probe_score(x, y, folds, probe=Probe.spearman_cv)
    assert std > 0.8 and spr > 0.8 and raw != std
    # Standardised probes do not see per-feature scales; the unstandardised one does.
    scaled = x * rng.uniform(0.01, 100.0, size=x.shape[1])
    assert probe_score(scaled, y, folds, probe=Probe.standardised) == pytest.approx(std, abs=1e-9)
    assert probe_score(scaled, y, folds, probe=Probe.unstandardised) != pytest.approx(raw, abs=1e-3)
    # …but a common scale changes nothing for it (its α grid follows the mean variance).
    assert probe_score(7.0 * x, y, folds, probe=Probe.unstandardised) == pytest.approx(
        raw, abs=1e-9
    )
