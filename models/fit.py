"""Streaming fit of a reverse-distillation chain from raw model outputs."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from models import __version__
from models.artifact import Artifact
from models.extract import Extractor, Pooling
from models.families.base import ModelFamily
from models.moments import Moments
from models.rd import Regressor, fit_chain
from models.sequences import LongSequencePolicy, sequences_digest

log = logging.getLogger(__name__)

Progress = Callable[[int, int], None]  # (sequences done in this batch, residues in this batch)


#: Sequences planned (length-sorted and batched) together while accumulating moments.
FIT_SLICE = 4096


def accumulate_moments(
    extractor: Extractor,
    seqs: Sequence[str],
    policy: LongSequencePolicy = LongSequencePolicy.truncate,
    progress: Progress | None = None,
) -> Moments:
    """One pass over the data: each batch runs every level once; joint moments of z = [x_1 … x_n].

    Memory is O(D²) with D = Σ dims, independent of the number of residues.
    """
    family = extractor.family
    levels = list(range(len(family.levels)))
    moments = Moments(sum(lv.dim for lv in family.levels))
    # Batch plans hold token ids and pooling weights (~13 bytes per residue): plan one slice of
    # sequences at a time so that they, too, stay bounded however many residues are fitted.
    for lo in range(0, len(seqs), FIT_SLICE):
        plans, _ = extractor.plan(seqs[lo : lo + FIT_SLICE], policy)
        for plan in plans:
            out = extractor.run(plan, levels, Pooling.per_residue)
            z = torch.cat([out.levels[i] for i in levels], dim=1)
            moments.update(z.double().cpu().numpy())
            if progress is not None:
                progress(len(plan.items), int(out.lengths.sum()))
    return moments


def fit_artifact(
    family: ModelFamily,
    seqs: Sequence[str],
    regressor: Regressor = Regressor.pcr,
    alpha: float = 1.0,
    token_budget: int | None = None,
    policy: LongSequencePolicy = LongSequencePolicy.truncate,
    progress: Progress | None = None,
    source: str | None = None,
) -> Artifact:
    """Fit every step of ``family``'s chain on ``seqs`` (validated sequences)."""
    if len(family.levels) < 2:
        raise ValueError("fitting needs a chain of at least two models")
    names = " → ".join(f"{lv.name} ({lv.dim})" for lv in family.levels)
    log.info(f"fitting {family.name}: {names} on {len(seqs):,} sequences, regressor {regressor}")
    extractor = Extractor(family, token_budget)
    moments = accumulate_moments(extractor, seqs, policy, progress)
    return solve_artifact(
        family, moments, seqs, regressor, alpha, policy, extractor.token_budget, source
    )


def fit_models(
    family_name: str,
    refs: Sequence[str],
    seqs: Sequence[str],
    *,
    regressor: Regressor = Regressor.pcr,
    alpha: float = 1.0,
    revision: str | None = None,
    device: str | None = "auto",
    dtype: str | None = "auto",
    token_budget: int | None = None,
    policy: LongSequencePolicy = LongSequencePolicy.truncate,
    progress: Progress | None = None,
    source: str | None = None,
    cache_dir: str | Path | None = None,
) -> Artifact:
    """Fit the chain named by model references (shorthands, hub ids, local dirs) on ``seqs``:
    what `rdserve fit` and a service's first start both run."""
    from models.families import build_chain

    family = build_chain(
        family_name,
        models=list(refs),
        revision=revision,
        device=device,
        dtype=dtype,
        cache_dir=cache_dir,
    )
    return fit_artifact(family, seqs, regressor, alpha, token_budget, policy, progress, source)


def solve_artifact(
    family: ModelFamily,
    moments: Moments,
    seqs: Sequence[str],
    regressor: Regressor,
    alpha: float,
    policy: LongSequencePolicy,
    token_budget: int,
    source: str | None,
) -> Artifact:
    """Every step of the chain solved from the joint moments of ``seqs``, with provenance."""
    steps, stats = fit_chain(
        moments.mean,
        moments.covariance(),
        moments.n,
        [lv.dim for lv in family.levels],
        regressor,
        alpha,
    )
    return Artifact(
        family=family.name,
        levels=family.levels,
        steps=tuple(steps),
        stats=tuple(stats),
        regressor=str(regressor),
        alpha=alpha if regressor == Regressor.ridge else None,
        fitting={
            "data_sha256": sequences_digest(seqs),
            "n_sequences": len(seqs),
            "n_residues": moments.n,
            "long_sequence_policy": str(policy),
            # Batch composition changes float summation order (artifacts differ at ~1e-8), so
            # the budget that shaped the batches is part of "same data and settings".
            "token_budget": token_budget,
            "source": source,
        },
        rdserve_version=__version__,
    )
