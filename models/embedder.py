"""Reverse-distilled embeddings: run the chain prefix a request needs, then project."""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from models.artifact import Artifact, check_levels_match
from models.blocks import assemble
from models.extract import Extractor, ForwardObserver, Pooling
from models.families.base import ModelFamily
from models.projection import Projector
from models.sequences import Handling, LongSequencePolicy

log = logging.getLogger(__name__)


@dataclass(slots=True)
class ItemBlocks:
    """RD blocks computed for one sequence."""

    blocks: list[np.ndarray]  # blocks of levels start … stop: (k_l,) pooled or (L, k_l) per residue
    residues: int  # residues embedded (after truncation)
    handling: Handling  # full | truncated | chunked


class Embedder:
    """A family chain plus its projection artifact, ready to embed."""

    def __init__(
        self,
        family: ModelFamily,
        artifact: Artifact,
        token_budget: int | None = None,
        chunk_overlap: int = 256,
    ) -> None:
        for w in check_levels_match(artifact, family.name, family.levels):
            log.warning(w)
        self.family = family
        self.artifact = artifact
        self.extractor = Extractor(family, token_budget, chunk_overlap)
        self.projector = Projector(artifact, family.device)

    def compute(
        self,
        seqs: Sequence[str],
        stop: int,
        start: int = 0,
        pooling: Pooling = Pooling.mean,
        policy: LongSequencePolicy = LongSequencePolicy.error,
        prefixes: Sequence[np.ndarray] | None = None,
        observer: ForwardObserver | None = None,
    ) -> list[ItemBlocks]:
        """Blocks of levels start … stop for each sequence, running only models start … stop.

        ``prefixes[i]`` are the already-known first dims[start−1] RD dims of sequence i (pooled
        vector or per-residue matrix), e.g. from a cache; required when start > 0.
        """
        results: list[ItemBlocks | None] = [None] * len(seqs)
        for done in self.iter_compute(seqs, stop, start, pooling, policy, prefixes, observer):
            for i, item in done:
                results[i] = item
        assert all(r is not None for r in results)
        return results  # type: ignore[return-value]

    def iter_compute(
        self,
        seqs: Sequence[str],
        stop: int,
        start: int = 0,
        pooling: Pooling = Pooling.mean,
        policy: LongSequencePolicy = LongSequencePolicy.error,
        prefixes: Sequence[np.ndarray] | None = None,
        observer: ForwardObserver | None = None,
    ) -> Iterator[list[tuple[int, ItemBlocks]]]:
        """Like compute(), but yields (input index, blocks) pairs batch by batch as they finish.

        Callers serving many requests at once answer each as soon as its batch is done, while
        the whole set is still planned (length-sorted) together.
        """
        if not 0 <= start <= stop < len(self.artifact.levels):
            raise ValueError(
                f"need 0 ≤ start ≤ stop < {len(self.artifact.levels)}, got {start}, {stop}"
            )
        if start > 0 and (prefixes is None or len(prefixes) != len(seqs)):
            raise ValueError("prefixes (one per sequence) are required when start > 0")
        plans, handling = self.extractor.plan(seqs, policy)
        levels = list(range(start, stop + 1))
        dev = self.family.device
        for plan in plans:
            out = self.extractor.run(plan, levels, pooling, observer)
            prefix = None
            if start > 0:
                assert prefixes is not None
                width = self.artifact.dims[start - 1]
                prefix = torch.from_numpy(
                    np.concatenate(
                        [np.asarray(prefixes[i], np.float32).reshape(-1, width) for i in plan.items]
                    )
                ).to(dev)
            blocks = [
                b.cpu().numpy() for b in self.projector.extend(prefix, out.levels, start, stop)
            ]
            if pooling == Pooling.per_residue:
                cuts = np.cumsum(out.lengths)[:-1]
                per_item = [np.split(b, cuts) for b in blocks]
            else:
                per_item = [list(b) for b in blocks]
            yield [
                (i, ItemBlocks([pb[row] for pb in per_item], int(out.lengths[row]), handling[i]))
                for row, i in enumerate(plan.items)
            ]

    def embed(
        self,
        seqs: Sequence[str],
        k: int,
        pooling: Pooling = Pooling.mean,
        policy: LongSequencePolicy = LongSequencePolicy.error,
        normalize: bool = False,
    ) -> tuple[list[np.ndarray], list[ItemBlocks]]:
        """k-dim RD embeddings: (k,) per sequence when pooled, (L, k) per residue."""
        stop = self.artifact.level_for_dim(k)
        items = self.compute(seqs, stop, 0, pooling, policy)
        return [assemble(it.blocks, k, normalize) for it in items], items
