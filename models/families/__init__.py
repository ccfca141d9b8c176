"""Model families, by registry name."""

from __future__ import annotations

from pathlib import Path

from models.families.base import (
    Level,
    LevelMismatchError,
    LevelOutput,
    ModelFamily,
    WeightsUnavailableError,
)
from models.families.esm2 import ESM2Family
from models.families.unirep import UniRepFamily
from models.specs import family_spec

FAMILIES: dict[str, type[ModelFamily]] = {
    ESM2Family.name: ESM2Family,
    UniRepFamily.name: UniRepFamily,
}


def family_class(name: str) -> type[ModelFamily]:
    """The family class registered under ``name`` (ValueError listing the known ones)."""
    return FAMILIES[family_spec(name).name]  # the torch-free spec owns the "unknown" error


__all__ = [
    "FAMILIES",
    "Level",
    "LevelMismatchError",
    "LevelOutput",
    "ModelFamily",
    "WeightsUnavailableError",
    "build_chain",
    "family_class",
]


def build_chain(
    family: str,
    levels: list[Level] | None = None,
    models: list[str] | None = None,
    revision: str | None = None,
    device: str | None = None,
    dtype: str | None = None,
    cache_dir: str | Path | None = None,
) -> ModelFamily:
    """Instantiate a family chain from explicit levels or user model references (nothing loads)."""
    cls = family_class(family)
    if levels is None:
        if not models:
            raise ValueError("give either levels or model references")
        levels = cls.resolve_levels(models, revision)
    return cls(levels, device=device, dtype=dtype, cache_dir=cache_dir)
