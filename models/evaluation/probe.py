"""The linear probe: standardised ridge, alpha by inner CV, Spearman on each held-out fold."""

from __future__ import annotations

import numpy as np
from scipy.stats import spearmanr
from sklearn.linear_model import RidgeCV
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits

#: Ridge penalties searched by the inner CV: 10⁻² … 10⁶, half-decade steps.  Features are
#: standardised, so tr(XᵀX) = n·d; the top end (≈ n·d for a few hundred variants at d = 1900)
#: lets the probe shrink almost to the mean when the features carry no signal.
ALPHAS: np.ndarray = np.logspace(-2, 6, 17)

N_FOLDS = 5


def random_folds(n: int, seed: int, k: int = N_FOLDS) -> np.ndarray:
    """Balanced seeded k-fold labels: a random permutation of (0, 1, …, k−1, 0, 1, …)[:n]."""
    return np.random.default_rng(seed).permutation(np.arange(n) % k)


def spearman(pred: np.ndarray, target: np.ndarray) -> float:
    """Spearman ρ; 0 when either side is constant (a constant predictor ranks nothing)."""
    if np.ptp(pred) == 0 or np.ptp(target) == 0:
        return 0.0
    return float(spearmanr(pred, target).statistic)


def ridge_predict(
    x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, alphas: np.ndarray = ALPHAS
) -> np.ndarray:
    """ŷ = ridge fit on the training fold only: z = (x − μ_train)/σ_train, alpha by inner LOO.

    RidgeCV's default inner CV is efficient leave-one-out over ``alphas`` (closed form from one
    eigendecomposition), so it never sees the held-out fold.
    """
    model = make_pipeline(StandardScaler(), RidgeCV(alphas=alphas))
    model.fit(np.asarray(x_train, dtype=np.float64), np.asarray(y_train, dtype=np.float64))
    return model.predict(np.asarray(x_test, dtype=np.float64))


def fold_spearmans(
    x: np.ndarray, y: np.ndarray, folds: np.ndarray, alphas: np.ndarray = ALPHAS
) -> np.ndarray:
    """ρ_f = Spearman(ridge trained on folds ≠ f, evaluated on fold f), one per fold label."""
    labels = np.unique(folds)
    if len(labels) < 2:
        raise ValueError("need at least two folds")
    out = np.empty(len(labels))
    # One BLAS thread: these matrices are small (hundreds of rows), and threaded OpenBLAS
    # spin-waits, which on shared cores made the probes ~20× slower (measured on 2 cores).
    with threadpool_limits(limits=1, user_api="blas"):
        for j, f in enumerate(labels):
            test = folds == f
            pred = ridge_predict(x[~test], y[~test], x[test], alphas)
            out[j] = spearman(pred, y[test])
    return out


def probe_score(
    x: np.ndarray, y: np.ndarray, folds: np.ndarray, alphas: np.ndarray = ALPHAS
) -> float:
    """Mean over held-out folds of the Spearman ρ of the ridge probe (the per-assay score)."""
    return float(fold_spearmans(x, y, folds, alphas).mean())
