"""Closed-form reverse distillation on synthetic data (no models)."""

from __future__ import annotations

import numpy as np
import pytest

from models.moments import Moments
from models.rd import Regressor, apply_chain, eigh_desc, fit_chain, fit_regression, johnstone_rank

DIMS = [6, 10, 16]


def synthetic_chain(n: int = 4000, seed: int = 0) -> list[np.ndarray]:
    """Three 'models' sharing latent structure plus their own signal and noise."""
    rng = np.random.default_rng(seed)
    latent = rng.normal(size=(n, 12))
    xs = []
    for d in DIMS:
        mix = rng.normal(size=(12, d))
        xs.append(latent @ mix + 0.3 * rng.normal(size=(n, d)) + rng.normal(size=d) * 5)
    return xs


def moments_of(z: np.ndarray, batch: int) -> Moments:
    m = Moments(z.shape[1])
    for i in range(0, len(z), batch):
        m.update(z[i : i + batch])
    return m


def test_moments_stream_equals_in_memory():
    z = np.concatenate(synthetic_chain(), axis=1) + 1e6  # large offset: cancellation-prone
    m = moments_of(z, 333)
    assert m.n == len(z)
    np.testing.assert_allclose(m.mean, z.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(m.covariance(), np.cov(z.T, bias=True), rtol=1e-8, atol=1e-8)


@pytest.mark.parametrize("signal", [1, 4, 9])
def test_johnstone_keeps_the_signal_components(signal):
    rng = np.random.default_rng(signal)
    n, p = 5000, 40
    basis = np.linalg.qr(rng.normal(size=(p, signal)))[0]
    x = (rng.normal(size=(n, signal)) * np.linspace(6, 3, signal)) @ basis.T + rng.normal(
        size=(n, p)
    )
    lam, _ = eigh_desc(np.cov(x.T, bias=True))
    assert johnstone_rank(lam, n) == signal


def test_johnstone_falls_back_to_95_percent_variance():
    # Equal eigenvalues: none exceeds the noise edge, so keep enough for 95 % of the variance.
    assert johnstone_rank(np.ones(20), 10) == 19


@pytest.mark.parametrize("regressor", [Regressor.ols, Regressor.ridge])
def test_least_squares_recovers_a_linear_map(regressor):
    rng = np.random.default_rng(3)
    h = rng.normal(size=(3000, 5))
    w_true = rng.normal(size=(4, 5))
    x = h @ w_true.T + 0.01 * rng.normal(size=(3000, 4))
    cov = np.cov(np.concatenate([h, x], axis=1).T, bias=True)
    w, kept = fit_regression(cov[:5, :5], cov[:5, 5:], 3000, regressor, alpha=1e-3)
    np.testing.assert_allclose(w, w_true, atol=0.01)
    assert kept == 5


def test_pcr_regresses_on_the_signal_subspace_only():
    rng = np.random.default_rng(4)
    n, p, s = 6000, 20, 3
    latent = rng.normal(size=(n, s)) * 4
    h = latent @ np.linalg.qr(rng.normal(size=(p, s)))[0].T + rng.normal(size=(n, p))
    x = latent @ rng.normal(size=(s, 4))
    cov = np.cov(np.concatenate([h, x], axis=1).T, bias=True)
    w, kept = fit_regression(cov[:p, :p], cov[:p, p:], n, Regressor.pcr)
    assert kept == s
    _lam, u = eigh_desc(cov[:p, :p])
    # W only reads the kept principal subspace of h …
    np.testing.assert_allclose(w @ u[:, s:], 0, atol=1e-10)
    # … and predicts x well from it.
    pred = (h - h.mean(0)) @ w.T + x.mean(0)
    assert 1 - ((x - pred) ** 2).sum() / ((x - x.mean(0)) ** 2).sum() > 0.9


def test_streaming_fit_equals_in_memory_fit():
    xs = synthetic_chain()
    z = np.concatenate(xs, axis=1)
    m = moments_of(z, 257)
    steps_s, stats_s = fit_chain(m.mean, m.covariance(), m.n, DIMS)
    steps_m, stats_m = fit_chain(z.mean(axis=0), np.cov(z.T, bias=True), len(z), DIMS)
    for a, b in zip(steps_s, steps_m, strict=True):
        for name in ("weight", "input_mean", "output_mean", "components"):
            np.testing.assert_allclose(getattr(a, name), getattr(b, name), rtol=1e-7, atol=1e-9)
    assert [s.components_kept for s in stats_s] == [s.components_kept for s in stats_m]


@pytest.mark.parametrize("regressor", list(Regressor))
def test_nested_and_appended_dims_are_decorrelated(regressor):
    xs = synthetic_chain()
    z = np.concatenate(xs, axis=1)
    steps, stats = fit_chain(z.mean(axis=0), np.cov(z.T, bias=True), len(z), DIMS, regressor, 10.0)
    h2 = apply_chain(xs[:2], steps)
    h3 = apply_chain(xs, steps)
    assert h3.shape == (len(z), 16)
    np.testing.assert_array_equal(h3[:, :6], xs[0])  # nested: level 1 is exactly x_1
    np.testing.assert_array_equal(h3[:, :10], h2)
    for i, (d_in, d_out) in enumerate([(6, 10), (10, 16)]):
        prev, new = h3[:, :d_in], h3[:, d_in:d_out]
        np.testing.assert_allclose(new.mean(axis=0), 0, atol=1e-9)  # appended dims are centred
        cross = (prev - prev.mean(0)).T @ new / len(z)
        if regressor == Regressor.ols:
            # OLS on the accumulated h: residuals are orthogonal to every earlier dim.
            np.testing.assert_allclose(cross, 0, atol=1e-8)
        elif regressor == Regressor.pcr:
            # PCR: orthogonal to the principal components it kept (the dropped ones are noise).
            _lam, u = eigh_desc(np.cov(prev.T, bias=True))
            kept = u[:, : stats[i].components_kept]
            np.testing.assert_allclose(kept.T @ cross, 0, atol=1e-8)
        # Appended dims are uncorrelated with each other, variance-ordered.
        c_new = np.cov(new.T, bias=True)
        np.testing.assert_allclose(c_new - np.diag(np.diag(c_new)), 0, atol=1e-8)
        assert np.all(np.diff(np.diag(c_new)) <= 1e-12)
    assert all(0 < s.r2 <= 1 and 0 < s.appended_variance_explained <= 1 for s in stats)


def test_fit_chain_rejects_bad_shapes():
    with pytest.raises(ValueError, match="increase strictly"):
        fit_chain(np.zeros(12), np.eye(12), 10, [6, 6])
    with pytest.raises(ValueError, match="do not match dims"):
        fit_chain(np.zeros(12), np.eye(12), 10, [6, 10])
