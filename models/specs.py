"""Torch-free descriptions of families and chain levels (what an API process needs to know)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Level:
    """One model of a family's chain."""

    name: str  # short name, e.g. "8M" or "1900"
    dim: int  # width of its per-residue representation
    model_id: str  # hub id, local directory or weights reference
    revision: str | None = None  # pinned hub revision (None: default branch)


@dataclass(frozen=True, slots=True)
class FamilySpec:
    """What a family is, without loading it."""

    name: str  # registry name
    max_residues: int | None  # context limit in residues; None = unlimited
    special_tokens: int  # tokens added per sequence (counted in batch budgets)
    has_bos: bool  # whether a start-token representation exists ('bos' pooling)
    default_models: tuple[str, ...]  # the chain served when none is named, smallest first


FAMILY_SPECS: dict[str, FamilySpec] = {
    # 1024-token context minus <cls> and <eos>.
    "esm2": FamilySpec(
        "esm2",
        max_residues=1022,
        special_tokens=2,
        has_bos=True,
        default_models=("8M", "35M", "150M"),
    ),
    # Recurrent: no context limit; one start token, whose state is not a representation.
    "unirep": FamilySpec(
        "unirep",
        max_residues=None,
        special_tokens=1,
        has_bos=False,
        default_models=("64", "256", "1900"),
    ),
}


def family_spec(name: str) -> FamilySpec:
    """The spec registered under ``name`` (ValueError listing the known ones)."""
    try:
        return FAMILY_SPECS[name]
    except KeyError:
        known = ", ".join(FAMILY_SPECS)
        raise ValueError(f"unknown model family {name!r}; known: {known}") from None
