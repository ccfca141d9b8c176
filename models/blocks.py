"""RD blocks → embeddings (numpy only: API processes use it without loading torch)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


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
