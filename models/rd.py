"""Reverse distillation in closed form: pure functions from moments to step parameters.

Notation (per step i → i+1, fitted on per-residue pairs):
    h ∈ ℝ^{d_i}      accumulated RD embedding so far (h_1 = x_1)
    x ∈ ℝ^{d_{i+1}}  next model's raw representation
    regression       ŷ = W (h − m_h) + m_x
    residual         r = x − ŷ,  μ = E[r]
    appended block   a = (r − μ) Vᵀ,  V = top (d_{i+1} − d_i) eigenvectors of Cov(r)
    next embedding   h_{i+1} = [h, a]
Everything is computed from the joint mean and covariance of z = [x_1, …, x_n], because each h_i
is an affine function of z: h_i = T_i z + t_i.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from enum import StrEnum

import numpy as np


class Regressor(StrEnum):
    """How f_i: h_i → x_{i+1} is fitted."""

    pcr = "pcr"  # principal-component regression, components chosen by Johnstone's threshold
    ols = "ols"  # ordinary least squares (minimum-norm when singular)
    ridge = "ridge"  # L2-penalised least squares with penalty alpha on the scatter scale


@dataclass(frozen=True)
class StepParams:
    """One fitted step; a = (x − W(h − m_h) − m_x − μ) Vᵀ."""

    weight: np.ndarray  # W (d_out, d_in)
    input_mean: np.ndarray  # m_h (d_in,)
    output_mean: np.ndarray  # m_x (d_out,)
    residual_mean: np.ndarray  # μ (d_out,)
    components: np.ndarray  # V (d_out − d_in, d_out), rows are principal directions

    @property
    def d_in(self) -> int:
        return self.weight.shape[1]

    @property
    def d_out(self) -> int:
        return self.weight.shape[0]


@dataclass(frozen=True)
class StepStats:
    """Diagnostics of one fitted step (None when unknown, e.g. imported artifacts)."""

    r2: float | None  # 1 − tr Cov(r) / tr Cov(x): variance of x the regressor explains
    components_kept: int | None  # principal components of h used by PCR (d_in for ols/ridge)
    appended_variance_explained: float | None  # share of tr Cov(r) captured by the appended dims
    residues: int | None  # residues the step was fitted on


def eigh_desc(cov: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Exact eigendecomposition, eigenvalues descending, eigenvector signs fixed.

    Each eigenvector (a column) is flipped so that its largest-magnitude entry is positive,
    which makes the result deterministic across runs.
    """
    vals, vecs = np.linalg.eigh((cov + cov.T) / 2.0)
    vals, vecs = vals[::-1].copy(), vecs[:, ::-1].copy()
    pivot = np.abs(vecs).argmax(axis=0)
    signs = np.sign(vecs[pivot, np.arange(vecs.shape[1])])
    signs[signs == 0] = 1.0
    return vals, vecs * signs


def johnstone_rank(eigvals: np.ndarray, n_samples: int, min_variance: float = 0.95) -> int:
    """Number of principal components above Johnstone's noise edge.

    With p = len(eigvals) features and n samples, β = (1 + √(p/n))² and τ = σ² β, where σ² is
    the median of the eigenvalues λ with λ / mean(λ) < β (else the median of the smallest
    quarter).  Components with λ > τ are kept; if none passes, the smallest number explaining
    ``min_variance`` of the total variance.
    """
    lam = np.sort(np.clip(np.asarray(eigvals, dtype=np.float64), 0.0, None))[::-1]
    p = lam.size
    beta = (1.0 + np.sqrt(p / n_samples)) ** 2
    mean = lam.mean()
    if mean <= 0:
        return 0
    noise = lam[lam / mean < beta]
    sigma2 = np.median(noise) if noise.size else np.median(lam[-max(1, p // 4) :])
    kept = int(np.count_nonzero(lam > sigma2 * beta))
    if kept == 0:
        cum = np.cumsum(lam) / lam.sum()
        kept = int(np.searchsorted(cum, min_variance) + 1)
    return min(kept, p)


def fit_regression(
    cov_hh: np.ndarray,
    cov_hx: np.ndarray,
    n_samples: int,
    regressor: Regressor,
    alpha: float = 1.0,
) -> tuple[np.ndarray, int]:
    """Slope W (d_out, d_in) of the centred regression x − m_x ≈ W (h − m_h); returns (W, kept).

    pcr:   W = Σ_xh U_k Λ_k⁻¹ U_kᵀ, (U, Λ) = eig Σ_hh, k = johnstone_rank(Λ, n)
    ols:   W = Σ_xh Σ_hh⁺ (minimum-norm least squares)
    ridge: W = Σ_xh (Σ_hh + (α/n) I)⁻¹, i.e. min ‖X_c − H_c Wᵀ‖² + α‖W‖² on the scatter scale
    """
    d_in = cov_hh.shape[0]
    if regressor == Regressor.pcr:
        lam, u = eigh_desc(cov_hh)
        k = johnstone_rank(lam, n_samples)
        uk = u[:, :k]
        scores_cov = uk.T @ cov_hx  # Cov(U_kᵀ h, x): (k, d_out)
        coef = scores_cov / lam[:k, None]  # OLS on uncorrelated scores: divide by their variances
        return (uk @ coef).T, k
    if regressor == Regressor.ols:
        w = np.linalg.lstsq(cov_hh, cov_hx, rcond=None)[0]
        return w.T, d_in
    if regressor == Regressor.ridge:
        w = np.linalg.solve(cov_hh + (alpha / n_samples) * np.eye(d_in), cov_hx)
        return w.T, d_in
    raise ValueError(f"unknown regressor {regressor!r}")


def fit_chain(
    mean: np.ndarray,
    cov: np.ndarray,
    n_samples: int,
    dims: list[int],
    regressor: Regressor = Regressor.pcr,
    alpha: float = 1.0,
) -> tuple[list[StepParams], list[StepStats]]:
    """Fit every step of a chain from the joint moments of z = [x_1, …, x_n].

    ``mean`` (D,) and ``cov`` (D, D) are over per-residue rows of z, D = Σ dims.  The accumulated
    embedding is tracked as h_i = T_i z + t_i, so each step sees exactly the h_i it is applied
    to at inference (not the raw x_i):

        Σ_hh = T Σ_zz Tᵀ,  Σ_hx = T Σ_z,x,  m_h = T m_z + t
        Σ_rr = Σ_xx − W Σ_hx − Σ_xh Wᵀ + W Σ_hh Wᵀ
        T_{i+1} = [T; V E − V W T],  t_{i+1} = [t; −V W (t − m_h) − V (m_x + μ)]

    where E selects the x_{i+1} block of z and μ = m_x − (W (m_h − m_h) + m_x) = 0 on the fitting
    data (kept explicit so imported steps with a non-zero μ share the same form).
    """
    if len(dims) < 2:
        raise ValueError("a chain needs at least two levels to fit")
    if any(b <= a for a, b in itertools.pairwise(dims)):
        raise ValueError(f"dims must increase strictly, got {dims}")
    total = sum(dims)
    if mean.shape != (total,) or cov.shape != (total, total):
        raise ValueError(f"moments of width {mean.shape} do not match dims {dims} (Σ = {total})")
    offsets = np.concatenate([[0], np.cumsum(dims)])
    t_mat = np.zeros((dims[0], total))
    t_mat[:, : dims[0]] = np.eye(dims[0])
    t_vec = np.zeros(dims[0])
    steps: list[StepParams] = []
    stats: list[StepStats] = []
    for i in range(len(dims) - 1):
        sl = slice(offsets[i + 1], offsets[i + 2])
        d_out, d_new = dims[i + 1], dims[i + 1] - dims[i]
        cov_hh = t_mat @ cov @ t_mat.T
        cov_hx = t_mat @ cov[:, sl]
        cov_xx = cov[sl, sl]
        m_h = t_mat @ mean + t_vec
        m_x = mean[sl]
        w, kept = fit_regression(cov_hh, cov_hx, n_samples, regressor, alpha)
        cov_rr = cov_xx - w @ cov_hx - cov_hx.T @ w.T + w @ cov_hh @ w.T
        lam_r, vec_r = eigh_desc(cov_rr)
        v = vec_r[:, :d_new].T
        mu = np.zeros(d_out)  # E[x − ŷ] = m_x − m_x: the intercept absorbs it
        steps.append(StepParams(w, m_h, m_x, mu, v))
        tr_r, tr_x = float(np.trace(cov_rr)), float(np.trace(cov_xx))
        stats.append(
            StepStats(
                r2=1.0 - tr_r / tr_x if tr_x > 0 else None,
                components_kept=kept,
                appended_variance_explained=float(np.clip(lam_r[:d_new], 0, None).sum() / tr_r)
                if tr_r > 0
                else None,
                residues=n_samples,
            )
        )
        e_sel = np.zeros((d_out, total))
        e_sel[:, sl] = np.eye(d_out)
        new_rows = v @ e_sel - v @ w @ t_mat
        new_const = -v @ w @ (t_vec - m_h) - v @ (m_x + mu)
        t_mat = np.vstack([t_mat, new_rows])
        t_vec = np.concatenate([t_vec, new_const])
    return steps, stats


def apply_step(h: np.ndarray, x: np.ndarray, step: StepParams) -> np.ndarray:
    """h_{i+1} = [h, (x − W(h − m_h) − m_x − μ) Vᵀ] for row-stacked h (…, d_in), x (…, d_out)."""
    r = x - (h - step.input_mean) @ step.weight.T - step.output_mean - step.residual_mean
    return np.concatenate([h, r @ step.components.T], axis=-1)


def apply_chain(xs: list[np.ndarray], steps: list[StepParams]) -> np.ndarray:
    """Reference (numpy, float64) RD embedding from raw level outputs x_1 … x_m (m ≤ n)."""
    h = np.asarray(xs[0], dtype=np.float64)
    for x, step in zip(xs[1:], steps, strict=False):
        h = apply_step(h, np.asarray(x, dtype=np.float64), step)
    return h
