"""Torch-free descriptions of families and chain levels (what an API process needs to know)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

#: Where packaged data lives (the UniRef90 sample, shipped artifacts; see its README.md).
DATA_DIR = Path(__file__).resolve().parent / "data"


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
    #: Default tokens per model batch (padding included) by device type. A transformer on CPU
    #: is fastest with small batches (activations stay in cache); a recurrent model runs one
    #: sequential step per position of a batch, so it needs many rows per step instead.
    token_budgets: tuple[tuple[str, int], ...] = (("cpu", 1536), ("cuda", 16384))
    #: File name in models/data of the artifact of ``default_models`` fitted on the packaged
    #: sample (scripts/build_default_artifact.py), served without a fit; None: fitted on start.
    shipped_artifact: str | None = None

    def check_pooling(self, pooling: str) -> None:
        """ValueError when this family cannot pool that way ('bos' needs a start token)."""
        if pooling == "bos" and not self.has_bos:
            raise ValueError(
                f"family {self.name!r} has no start token; use pooling 'mean' or 'per_residue'"
            )

    @property
    def shipped_artifact_path(self) -> Path | None:
        """The shipped artifact of the default chain, if this family has one."""
        return DATA_DIR / self.shipped_artifact if self.shipped_artifact else None

    def token_budget(self, device_type: str) -> int:
        """The default token budget on ``device_type`` ('cpu', 'cuda', …; others: cuda's)."""
        budgets = dict(self.token_budgets)
        return budgets.get(device_type, budgets["cuda"])


FAMILY_SPECS: dict[str, FamilySpec] = {
    # 1024-token context minus <cls> and <eos>.
    "esm2": FamilySpec(
        "esm2",
        max_residues=1022,
        special_tokens=2,
        has_bos=True,
        default_models=("8M", "35M", "150M"),
        # CPU: ESM-2 8M, 2 cores, ~7k residues/s at 1,536 tokens vs ~3k at 8,192
        # (benchmarks/results/extraction.json); a GPU needs large batches to stay busy.
        token_budgets=(("cpu", 1536), ("cuda", 16384)),
    ),
    # Recurrent: no context limit; one start token, whose state is not a representation.
    "unirep": FamilySpec(
        "unirep",
        max_residues=None,
        special_tokens=1,
        has_bos=False,
        default_models=("64", "256", "1900"),
        # The 1,000-sequence default fit runs ~157k sequential recurrence steps at 1,536 tokens
        # and ~15k at 32,768 (same statistics: artifacts agree to 2.4e-5), 4.4x faster on CPU.
        token_budgets=(("cpu", 32768), ("cuda", 32768)),
        shipped_artifact="unirep-64-256-1900.safetensors",
    ),
}


def family_spec(name: str) -> FamilySpec:
    """The spec registered under ``name`` (ValueError listing the known ones)."""
    try:
        return FAMILY_SPECS[name]
    except KeyError:
        known = ", ".join(FAMILY_SPECS)
        raise ValueError(f"unknown model family {name!r}; known: {known}") from None
