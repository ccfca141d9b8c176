"""Streaming first and second moments (float64), constant memory in the number of rows."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class Moments:
    """Running mean and centred scatter of row vectors, merged batch by batch.

    Chan, Golub & LeVeque's pairwise update: for a batch B with n_b rows, mean m_b and centred
    scatter C_b = (B − m_b)ᵀ(B − m_b), and δ = m_b − m,

        M₂ ← M₂ + C_b + δδᵀ · n·n_b/(n + n_b),   m ← m + δ · n_b/(n + n_b),   n ← n + n_b.

    Centring each batch first keeps float64 exact enough even when means dwarf the spread
    (naive Σxxᵀ − n·mmᵀ cancels catastrophically).
    """

    dim: int
    n: int = 0
    mean: np.ndarray = field(init=False)
    scatter: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        self.mean = np.zeros(self.dim, dtype=np.float64)
        self.scatter = np.zeros((self.dim, self.dim), dtype=np.float64)

    def update(self, rows: np.ndarray) -> None:
        """Fold in a (n_b, dim) batch of rows."""
        rows = np.asarray(rows, dtype=np.float64)
        if rows.ndim != 2 or rows.shape[1] != self.dim:
            raise ValueError(f"expected (n, {self.dim}) rows, got {rows.shape}")
        nb = rows.shape[0]
        if nb == 0:
            return
        mb = rows.mean(axis=0)
        centred = rows - mb
        cb = centred.T @ centred
        total = self.n + nb
        delta = mb - self.mean
        self.scatter += cb + np.outer(delta, delta) * (self.n * nb / total)
        self.mean += delta * (nb / total)
        self.n = total

    def covariance(self) -> np.ndarray:
        """Population covariance M₂ / n (the 1/n convention; the fit is scale-invariant)."""
        if self.n == 0:
            raise ValueError("no rows accumulated")
        return self.scatter / self.n
