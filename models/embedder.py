"""Reverse-distilled embeddings: run the chain prefix a request needs, then project."""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch

from models.artifact import Artifact, check_levels_match
from models.blocks import ItemBlocks, ItemFailure, assemble
from models.extract import BatchPlan, Extractor, ForwardObserver, Pooling, split_plan
from models.families.base import ModelFamily
from models.projection import Projector
from models.sequences import Handling, LongSequencePolicy

__all__ = ["Embedder", "EmbeddingError", "ItemBlocks", "ItemFailure"]

log = logging.getLogger(__name__)

#: What warm() runs through each level (any short valid sequence).
WARMUP_SEQUENCE = "MKTAYIAKQRQISFVKSHFSRQ"


class EmbeddingError(RuntimeError):
    """A sequence could not be embedded (compute() raises it; iter_compute() yields failures)."""


def is_out_of_memory(e: BaseException) -> bool:
    """A device (or host) allocation failure, as opposed to a bug or bad input."""
    return isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower()


def release_device_memory(device: torch.device) -> None:
    """Return cached blocks of a failed batch to the driver before retrying smaller batches."""
    if device.type == "cuda":
        torch.cuda.empty_cache()


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

    @classmethod
    def from_artifact(
        cls,
        artifact: Artifact | str | Path,
        *,
        models: Sequence[str] | None = None,
        revision: str | None = None,
        device: str | None = None,
        dtype: str | None = None,
        token_budget: int | None = None,
        chunk_overlap: int = 256,
        cache_dir: str | Path | None = None,
    ) -> Embedder:
        """The artifact's chain on ``device``, ready to embed (weights load lazily per level).

        ``models`` names where to load the chain from instead of the model ids the artifact
        records (e.g. local directories of the same models); it must match the artifact's family
        and dims, and differing ids are logged as warnings.
        """
        from models.artifact import load_artifact
        from models.families import build_chain

        art = artifact if isinstance(artifact, Artifact) else load_artifact(artifact)
        if models:
            family = build_chain(
                art.family,
                models=list(models),
                revision=revision,
                device=device,
                dtype=dtype,
                cache_dir=cache_dir,
            )
        else:
            family = build_chain(
                art.family, levels=list(art.levels), device=device, dtype=dtype, cache_dir=cache_dir
            )
        return cls(family, art, token_budget, chunk_overlap)

    @property
    def device(self) -> torch.device:
        """Where the models and projections run."""
        return self.family.device

    @property
    def token_budget(self) -> int:
        """Tokens per model batch, padding included (resolved for the device)."""
        return self.extractor.token_budget

    def warm(self, level: int, run_batch: bool = True) -> None:
        """Load one level's weights and (optionally) run a tiny batch through it, so that the
        first request does not pay for lazy initialisation."""
        self.family.load(level)
        if run_batch:
            plans, _ = self.extractor.plan([WARMUP_SEQUENCE] * 2)
            self.extractor.run(plans[0], [level], Pooling.mean)

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
                if isinstance(item, ItemFailure):
                    raise EmbeddingError(f"sequence {i}: {item.message}")
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
    ) -> Iterator[list[tuple[int, ItemBlocks | ItemFailure]]]:
        """Like compute(), but yields (input index, blocks) pairs batch by batch as they finish.

        Callers serving many requests at once answer each as soon as its batch is done, while
        the whole set is still planned (length-sorted) together.  A batch that fails (out of
        device memory, or any other error) is split in halves and retried; a sequence that
        still fails alone is yielded as an ItemFailure, and the other sequences go on.
        """
        if not 0 <= start <= stop < len(self.artifact.levels):
            raise ValueError(
                f"need 0 ≤ start ≤ stop < {len(self.artifact.levels)}, got {start}, {stop}"
            )
        if start > 0 and (prefixes is None or len(prefixes) != len(seqs)):
            raise ValueError("prefixes (one per sequence) are required when start > 0")
        plans, handling = self.extractor.plan(seqs, policy)
        todo = list(plans)
        while todo:
            plan = todo.pop(0)
            try:
                done = self._run_plan(plan, handling, stop, start, pooling, prefixes, observer)
            except Exception as e:  # noqa: BLE001 — isolate the failing sequence, keep the rest
                failure = ItemFailure(f"{type(e).__name__}: {e}", is_out_of_memory(e))
            else:
                yield done
                continue
            # Outside the except block: the traceback no longer pins the batch's tensors.
            release_device_memory(self.family.device)
            if len(plan.items) > 1:
                log.warning(
                    "batch failed; retrying it in halves",
                    extra={"sequences": len(plan.items), "error": failure.message[:300]},
                )
                todo[:0] = split_plan(plan)
            else:
                log.error("sequence failed on its own", extra={"error": failure.message[:300]})
                yield [(plan.items[0], failure)]

    def _run_plan(
        self,
        plan: BatchPlan,
        handling: Sequence[Handling],
        stop: int,
        start: int,
        pooling: Pooling,
        prefixes: Sequence[np.ndarray] | None,
        observer: ForwardObserver | None,
    ) -> list[tuple[int, ItemBlocks | ItemFailure]]:
        """Run levels start … stop on one batch and project: (input index, blocks) per item."""
        out = self.extractor.run(plan, list(range(start, stop + 1)), pooling, observer)
        prefix = None
        if start > 0:
            assert prefixes is not None
            width = self.artifact.dims[start - 1]
            prefix = torch.from_numpy(
                np.concatenate(
                    [np.asarray(prefixes[i], np.float32).reshape(-1, width) for i in plan.items]
                )
            ).to(self.family.device)
        blocks = [b.cpu().numpy() for b in self.projector.extend(prefix, out.levels, start, stop)]
        if pooling == Pooling.per_residue:
            cuts = np.cumsum(out.lengths)[:-1]
            per_item = [np.split(b, cuts) for b in blocks]
        else:
            per_item = [list(b) for b in blocks]
        return [
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
