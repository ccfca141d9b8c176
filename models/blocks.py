"""RD blocks → embeddings (numpy only: API processes use it without loading torch)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from models.sequences import Handling


@dataclass(slots=True)
class ItemBlocks:
    """RD blocks computed for one sequence."""

    blocks: list[np.ndarray]  # blocks of levels start … stop: (k_l,) pooled or (L, k_l) per residue
    residues: int  # residues embedded (after truncation)
    handling: Handling  # full | truncated | chunked


@dataclass(slots=True)
class ItemFailure:
    """Why one sequence was not embedded: it failed even in a batch of its own."""

    message: str  # the error, e.g. "OutOfMemoryError: CUDA out of memory. Tried to allocate …"
    out_of_memory: bool  # the device ran out of memory (a larger device or chunking may help)


def assemble(blocks: Sequence[np.ndarray], k: int, normalize: bool = False) -> np.ndarray:
    """Concatenate RD blocks (last axis), keep the first k dims, optionally L2-normalise."""
    out = np.concatenate(blocks, axis=-1)[..., :k]
    if out.shape[-1] < k:
        raise ValueError(f"blocks hold {out.shape[-1]} dims, {k} requested")
    out = np.ascontiguousarray(out, dtype=np.float32)
    if normalize:
        norm = np.linalg.norm(out, axis=-1, keepdims=True)
        out = out / np.where(norm > 0, norm, 1.0)
    return out
