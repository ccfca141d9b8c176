"""The linear probe: ridge regression on a training fold, Spearman ρ on the held-out fold.

Three documented variants (``--probe``); each is fitted on the training folds only, and its
penalty α is chosen by an inner leave-one-out CV on the training rows (closed form from one
decomposition, sklearn ``RidgeCV``), so the held-out fold is never seen:

- ``standardised`` (default): z = (x − μ_train)/σ_train, α over ``ALPHAS`` minimising the LOO
  squared error;
- ``unstandardised``: x centred only, α over ``ALPHAS`` · mean_j Var_train(x_j) (the same grid
  relative to the features' average scale) minimising the LOO squared error; high-variance
  directions are penalised least;
- ``spearman-cv``: as ``standardised``, but α maximises the Spearman ρ of the LOO predictions
  with y (the metric reported) instead of their squared error.
"""

from __future__ import annotations

import numpy as np
from scipy.stats import spearmanr
from sklearn.linear_model import RidgeCV
from sklearn.metrics import make_scorer
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits

from models.evaluation.folds import N_FOLDS, random_folds
from models.evaluation.options import ALPHAS, Probe

__all__ = ["ALPHAS", "N_FOLDS", "Probe", "fold_spearmans", "probe_score", "random_folds"]


def spearman(pred: np.ndarray, target: np.ndarray) -> float:
    """Spearman ρ; 0 when either side is constant (a constant predictor ranks nothing)."""
    if np.ptp(pred) == 0 or np.ptp(target) == 0:
        return 0.0
    return float(spearmanr(pred, target).statistic)


def _spearman_score(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    return spearman(y_pred, y_true)


_SPEARMAN_SCORER = make_scorer(_spearman_score)


def ridge_predict(
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_test: np.ndarray,
    alphas: np.ndarray = ALPHAS,
    probe: Probe = Probe.standardised,
) -> np.ndarray:
    """ŷ on x_test of the ridge probe fitted on (x_train, y_train) alone."""
    xtr = np.asarray(x_train, dtype=np.float64)
    ytr = np.asarray(y_train, dtype=np.float64)
    if probe == Probe.unstandardised:
        scale = float(xtr.var(axis=0).mean()) or 1.0
        model = RidgeCV(alphas=alphas * scale)
    else:
        scoring = _SPEARMAN_SCORER if probe == Probe.spearman_cv else None
        model = make_pipeline(StandardScaler(), RidgeCV(alphas=alphas, scoring=scoring))
    model.fit(xtr, ytr)
    return model.predict(np.asarray(x_test, dtype=np.float64))


def fold_spearmans(
    x: np.ndarray,
    y: np.ndarray,
    folds: np.ndarray,
    alphas: np.ndarray = ALPHAS,
    probe: Probe = Probe.standardised,
) -> np.ndarray:
    """ρ_f = Spearman(probe trained on folds ≠ f, evaluated on fold f), one per fold label."""
    labels = np.unique(folds)
    if len(labels) < 2:
        raise ValueError("need at least two folds")
    out = np.empty(len(labels))
    # One BLAS thread: these matrices are small (hundreds of rows), and threaded OpenBLAS
    # spin-waits, which on shared cores made the probes ~20× slower (measured on 2 cores).
    with threadpool_limits(limits=1, user_api="blas"):
        for j, f in enumerate(labels):
            test = folds == f
            pred = ridge_predict(x[~test], y[~test], x[test], alphas, probe)
            out[j] = spearman(pred, y[test])
    return out


def probe_score(
    x: np.ndarray,
    y: np.ndarray,
    folds: np.ndarray,
    alphas: np.ndarray = ALPHAS,
    probe: Probe = Probe.standardised,
) -> float:
    """Mean over held-out folds of the Spearman ρ of the probe (the per-assay score)."""
    return float(fold_spearmans(x, y, folds, alphas, probe).mean())
