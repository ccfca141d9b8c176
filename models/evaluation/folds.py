"""ProteinGym's three cross-validation schemes for DMS assays (5 folds each).

ProteinGym's supervised benchmark (Notin et al. 2023) scores every model under three fold
schemes, and the v1 assay files carry them as columns:

- ``fold_random_5``: variants assigned to folds at random (variants at one position land in
  training and test alike, which flatters every embedding);
- ``fold_modulo_5``: fold = mutated position mod 5 (positions 1-based), so neighbouring
  positions are in different folds but no position is in two;
- ``fold_contiguous_5``: the sorted distinct mutated positions split into 5 contiguous
  segments of near-equal size (the first ``n mod 5`` one position longer), fold = segment.

The definitions were checked against the columns of the 11 v1 assays in the shared data:
modulo matches all 11 exactly, contiguous matches the 4 non-Tsuboyama assays exactly (the
Tsuboyama files' contiguous column is not contiguous in position; files with the column are
always used as they are).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from enum import StrEnum

import numpy as np

N_FOLDS = 5


class FoldScheme(StrEnum):
    """A ProteinGym fold scheme, by its column name."""

    random = "fold_random_5"
    modulo = "fold_modulo_5"
    contiguous = "fold_contiguous_5"

    @property
    def short(self) -> str:
        """random | modulo | contiguous."""
        return self.name


ALL_SCHEMES: tuple[FoldScheme, ...] = tuple(FoldScheme)

_SUBSTITUTION = re.compile(r"^([A-Z])([1-9][0-9]*)([A-Z])$")


def parse_schemes(spec: str | Sequence[str]) -> list[FoldScheme]:
    """'random,modulo' or ['fold_contiguous_5', 'all'] → schemes in canonical order."""
    parts = spec.split(",") if isinstance(spec, str) else [p for s in spec for p in s.split(",")]
    chosen: set[FoldScheme] = set()
    for raw in parts:
        p = raw.strip().lower()
        if not p:
            continue
        if p == "all":
            chosen.update(ALL_SCHEMES)
            continue
        match = [s for s in ALL_SCHEMES if p in (s.value, s.short)]
        if not match:
            names = ", ".join(s.short for s in ALL_SCHEMES)
            raise ValueError(f"--folds: unknown fold scheme {raw.strip()!r}; choose {names} or all")
        chosen.add(match[0])
    if not chosen:
        raise ValueError("--folds: name at least one fold scheme")
    return [s for s in ALL_SCHEMES if s in chosen]


def parse_mutant(mutant: str) -> list[tuple[str, int, str]]:
    """'H24C' or 'H24C:A25D' → [(wild-type residue, 1-based position, mutant residue), …]."""
    out = []
    for part in mutant.split(":"):
        m = _SUBSTITUTION.match(part.strip())
        if m is None:
            raise ValueError(f"mutant {mutant!r} is not of the form H24C (or H24C:A25D)")
        out.append((m.group(1), int(m.group(2)), m.group(3)))
    return out


def random_folds(n: int, seed: int, k: int = N_FOLDS) -> np.ndarray:
    """Balanced seeded k-fold labels: a random permutation of (0, 1, …, k−1, 0, 1, …)[:n]."""
    return np.random.default_rng(seed).permutation(np.arange(n) % k)


def modulo_folds(positions: np.ndarray, k: int = N_FOLDS) -> np.ndarray:
    """fold = p mod k for 1-based mutated positions p (ProteinGym's fold_modulo_5)."""
    return np.asarray(positions, dtype=np.int64) % k


def contiguous_folds(positions: np.ndarray, k: int = N_FOLDS) -> np.ndarray:
    """fold = index of the segment holding p, the distinct positions sorted and split into k
    contiguous segments of near-equal size (``numpy.array_split``; ProteinGym's
    fold_contiguous_5)."""
    positions = np.asarray(positions, dtype=np.int64)
    distinct = np.unique(positions)
    if len(distinct) < k:
        raise ValueError(f"{len(distinct)} mutated positions; contiguous folds need ≥ {k}")
    segment = np.concatenate(
        [np.full(len(s), i, dtype=np.int64) for i, s in enumerate(np.array_split(distinct, k))]
    )
    return segment[np.searchsorted(distinct, positions)]


def built_source(scheme: FoldScheme, seed: int) -> str:
    """How folds are built when the file has no column for the scheme (for reports)."""
    return {
        FoldScheme.random: f"built: random(seed={seed})",
        FoldScheme.modulo: "built: position mod 5",
        FoldScheme.contiguous: "built: 5 contiguous position segments",
    }[scheme]
