"""Same-width alternatives to RD, fitted on RD's own fitting data: PCA in closed form.

Both come from the float64 joint moments (mean m, covariance Σ) of the per-residue raw outputs
z = [x_1, …, x_n] of the fitting sequences, the same statistics RD is solved from
(:func:`models.fit.accumulate_moments`):

- ``pca-concat-k``: the top-k principal directions U_k of Σ (the concatenation of every level,
  unscaled: the paper's naive, not nested, baseline), p = (z − m) U_k;
- ``pca-top-k``: the top-k principal directions of the largest model's block Σ_nn,
  p = (x_n − m_n) U_k.

Both are linear, so the projection of a mean-pooled vector is the mean of the per-residue
projections, like RD.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from models.moments import Moments
from models.rd import eigh_desc

CONCAT = "pca-concat"
TOP = "pca-top"


@dataclass(frozen=True)
class PcaBasis:
    """p = (z − mean) · components[:, :k]; columns ordered by variance, descending."""

    mean: np.ndarray  # (D,)
    components: np.ndarray  # (D, K)
    variances: np.ndarray  # (K,) eigenvalues of the covariance

    def project(self, z: np.ndarray, k: int | None = None) -> np.ndarray:
        """(N, k) principal-component scores of rows z."""
        comps = self.components if k is None else self.components[:, :k]
        return (np.asarray(z, dtype=np.float64) - self.mean) @ comps


def pca_basis(mean: np.ndarray, cov: np.ndarray, k: int) -> PcaBasis:
    """Top-k eigenvectors of Σ (deterministic signs, :func:`models.rd.eigh_desc`)."""
    if not 1 <= k <= cov.shape[0]:
        raise ValueError(f"k must be in 1 … {cov.shape[0]}, got {k}")
    vals, vecs = eigh_desc(cov)
    return PcaBasis(np.array(mean, dtype=np.float64), vecs[:, :k].copy(), vals[:k].copy())


@dataclass(frozen=True)
class Baselines:
    """PCA of the concatenation and PCA of the largest model, up to width ``k_max``."""

    concat: PcaBasis
    top: PcaBasis
    n_residues: int  # residues the moments were accumulated over

    @classmethod
    def from_moments(cls, moments: Moments, dims: Sequence[int], k_max: int) -> Baselines:
        """Both bases from the joint moments of [x_1 … x_n] (dims d_1 … d_n)."""
        if moments.dim != sum(dims):
            raise ValueError(f"moments of {moments.dim} dims, the chain has {sum(dims)}")
        cov = moments.covariance()
        lo = sum(dims[:-1])
        return cls(
            concat=pca_basis(moments.mean, cov, k_max),
            top=pca_basis(moments.mean[lo:], cov[lo:, lo:], min(k_max, dims[-1])),
            n_residues=moments.n,
        )

    def project(self, raw: Sequence[np.ndarray]) -> dict[str, np.ndarray]:
        """Scores of every kept component of both bases for per-level rows (pooled or not)."""
        return {
            CONCAT: self.concat.project(np.concatenate(list(raw), axis=1)),
            TOP: self.top.project(raw[-1]),
        }
