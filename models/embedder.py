"""Reverse-distilled embeddings: run the chain prefix a request needs, then project."""

from __future__ import annotations

import itertools
import logging
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from models.artifact import Artifact, check_levels_match
from models.batching import bucket_tokens, token_buckets
from models.blocks import ItemBlocks, ItemFailure, assemble
from models.extract import BatchOutput, BatchPlan, Extractor, ForwardObserver, Pooling, split_plan
from models.families.base import CompileOptions, ModelFamily
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


def warm_buckets(token_budget: int, family: ModelFamily) -> list[int]:
    """The packed lengths steady traffic brings: the budget's buckets, and the bucket of the
    longest row one sequence makes when that is over the budget.  (A chunked sequence's
    windows stay in one batch: several long windows can exceed even that, rarely.)"""
    sizes = token_buckets(token_budget)
    if family.max_residues is not None:
        sizes.append(bucket_tokens(family.max_residues + family.special_tokens, token_budget))
    return sorted(set(sizes))


@dataclass(slots=True)
class _Launched:
    """A batch whose forwards, projection and device → host copy are queued (on CUDA, maybe
    still running)."""

    plan: BatchPlan
    out: BatchOutput  # raw outputs and forward timings
    widths: list[int]  # columns of each block
    rows: int  # rows of every block: items (pooled) or Σ lengths (per residue)
    per_residue: bool  # blocks hold residues (else one row per item)
    host: torch.Tensor  # the blocks, flattened block after block, on the host
    device_flat: torch.Tensor | None  # its device source, kept until the copy is done
    done: torch.cuda.Event | None  # recorded after the copy (CUDA)


class HostCopier:
    """Device → host copies of finished blocks, overlapped with the next batch's forward.

    On CUDA a batch's blocks are flattened into one device buffer and copied once, on a side
    stream, into pinned host memory (non-blocking), while the compute stream goes on with the
    next batch; on CPU the blocks already are host memory and nothing is copied.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    def start(
        self, blocks: Sequence[torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.cuda.Event | None]:
        """(host buffer, device source to keep alive, event to wait for) of the flat blocks."""
        flat = torch.cat([b.reshape(-1) for b in blocks]) if len(blocks) > 1 else blocks[0]
        flat = flat.reshape(-1)
        if self.stream is None:
            return flat, None, None
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.stream):
            host = torch.empty(flat.shape, dtype=flat.dtype, pin_memory=True)
            host.copy_(flat, non_blocking=True)
            done = torch.cuda.Event()
            done.record(self.stream)
        # The caching allocator must not hand the source to the compute stream before the copy
        # stream has read it, even if the batch is dropped (a closed generator).
        flat.record_stream(self.stream)
        return host, flat, done

    @staticmethod
    def finish(launched: _Launched) -> np.ndarray:
        """The flat host blocks once the copy is done, as pageable memory: pinned pages go back
        to torch's pinned pool (callers, such as caches, may keep results for long)."""
        if launched.done is None:
            return launched.host.numpy()
        launched.done.synchronize()
        launched.device_flat = None
        return launched.host.numpy().copy()


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
        self.copier = HostCopier(family.device)
        # Batches launched ahead of the one being finished: on CUDA the next batch's kernels
        # queue while this one's blocks are copied out; on CPU launching is computing, and
        # running ahead would only delay each answer by a batch.
        self.pipeline_depth = 1 if family.device.type == "cuda" else 0

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
        packed: bool = False,
        compile: CompileOptions | None = None,
    ) -> Embedder:
        """The artifact's chain on ``device``, ready to embed (weights load lazily per level).

        ``models`` names where to load the chain from instead of the model ids the artifact
        records (e.g. local directories of the same models); it must match the artifact's family
        and dims, and differing ids are logged as warnings.  ``packed`` runs unpadded batches
        with variable-length attention; ``compile`` compiles each level as it loads (and
        implies ``packed``); warm() then compiles every bucketed batch shape.
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
        if packed or compile is not None:
            family.set_fast_path(packed=packed, compile=compile)
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
        first request does not pay for lazy initialisation.  A compiled family runs one batch
        per packed length (:func:`warm_buckets`): every shape steady traffic brings is compiled
        before the level counts as ready."""
        self.family.load(level)
        if not run_batch:
            return
        plans, _ = self.extractor.plan([WARMUP_SEQUENCE] * 2)
        if self.family.compile_options is None:
            self.extractor.run(plans[0], [level], Pooling.mean)
            return
        for tokens in warm_buckets(self.token_budget, self.family):
            plans[0].tokens = tokens
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
        k: int | None = None,
    ) -> list[ItemBlocks]:
        """Blocks of levels start … stop for each sequence, running only models start … stop.

        ``prefixes[i]`` are the already-known first dims[start−1] RD dims of sequence i (pooled
        vector or per-residue matrix), e.g. from a cache; required when start > 0.  ``k``
        (dims[stop−1] < k ≤ dims[stop]) cuts the last block so that the embedding ends at k
        dims: only those are projected and copied off the device.
        """
        results: list[ItemBlocks | None] = [None] * len(seqs)
        batches = self.iter_compute(seqs, stop, start, pooling, policy, prefixes, observer, k)
        for done in batches:
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
        k: int | None = None,
    ) -> Iterator[list[tuple[int, ItemBlocks | ItemFailure]]]:
        """Like compute(), but yields (input index, blocks) pairs batch by batch as they finish.

        Callers serving many requests at once answer each as soon as its batch is done, while
        the whole set is still planned (length-sorted) together.  A batch that fails (out of
        device memory, or any other error) is split in halves and retried; a sequence that
        still fails alone is yielded as an ItemFailure, and the other sequences go on.  On CUDA
        the next batch is launched before this one's results are copied out (pipeline_depth).
        """
        if not 0 <= start <= stop < len(self.artifact.levels):
            raise ValueError(
                f"need 0 ≤ start ≤ stop < {len(self.artifact.levels)}, got {start}, {stop}"
            )
        if start > 0 and (prefixes is None or len(prefixes) != len(seqs)):
            raise ValueError("prefixes (one per sequence) are required when start > 0")
        dims = self.artifact.dims
        if k is not None and not (dims[stop - 1] if stop else 0) < k <= dims[stop]:
            raise ValueError(f"k={k} does not end in level {stop} (dims {dims})")
        plans, handling = self.extractor.plan(seqs, policy)
        todo: deque[BatchPlan] = deque(plans)
        inflight: deque[_Launched] = deque()
        while todo or inflight:
            if todo and len(inflight) <= self.pipeline_depth:
                plan = todo.popleft()
                try:
                    inflight.append(self._launch(plan, stop, start, pooling, prefixes, k))
                    continue
                except Exception as e:  # noqa: BLE001 — isolate the failing sequence
                    failure = ItemFailure(f"{type(e).__name__}: {e}", is_out_of_memory(e))
            else:
                launched = inflight.popleft()
                plan = launched.plan
                try:
                    done = self._finish(launched, handling, observer)
                except Exception as e:  # noqa: BLE001 — isolate the failing sequence
                    failure = ItemFailure(f"{type(e).__name__}: {e}", is_out_of_memory(e))
                else:
                    yield done
                    continue
                finally:
                    del launched
            # Outside the except block: the traceback no longer pins the batch's tensors.
            release_device_memory(self.family.device)
            if len(plan.items) > 1:
                log.warning(
                    "batch failed; retrying it in halves",
                    extra={"sequences": len(plan.items), "error": failure.message[:300]},
                )
                todo.extendleft(reversed(split_plan(plan)))
            else:
                log.error("sequence failed on its own", extra={"error": failure.message[:300]})
                yield [(plan.items[0], failure)]

    def _launch(
        self,
        plan: BatchPlan,
        stop: int,
        start: int,
        pooling: Pooling,
        prefixes: Sequence[np.ndarray] | None,
        k: int | None,
    ) -> _Launched:
        """Queue levels start … stop on one batch, the projection, and the copy to the host."""
        out = self.extractor.launch(plan, list(range(start, stop + 1)), pooling)
        prefix = None
        if start > 0:
            assert prefixes is not None
            width = self.artifact.dims[start - 1]
            prefix = torch.from_numpy(
                np.concatenate(
                    [np.asarray(prefixes[i], np.float32).reshape(-1, width) for i in plan.items]
                )
            ).to(self.family.device)
        blocks = self.projector.extend(prefix, out.levels, start, stop, k)
        host, source, done = self.copier.start(blocks)
        return _Launched(
            plan=plan,
            out=out,
            widths=[b.shape[1] for b in blocks],
            rows=blocks[0].shape[0],
            per_residue=pooling == Pooling.per_residue,
            host=host,
            device_flat=source,
            done=done,
        )

    def _finish(
        self,
        launched: _Launched,
        handling: Sequence[Handling],
        observer: ForwardObserver | None,
    ) -> list[tuple[int, ItemBlocks | ItemFailure]]:
        """Wait for one launched batch and split its blocks per item (views, no copies)."""
        flat = self.copier.finish(launched)
        if observer is not None:
            launched.out.report(observer)
        out, rows, widths = launched.out, launched.rows, launched.widths
        ends = np.cumsum([rows * w for w in widths])
        blocks = [
            flat[e - rows * w : e].reshape(rows, w) for e, w in zip(ends, widths, strict=True)
        ]
        if launched.per_residue:  # each item's residues, in order
            bounds = np.concatenate([[0], np.cumsum(out.lengths)]).tolist()
            per_item = [[b[lo:hi] for b in blocks] for lo, hi in itertools.pairwise(bounds)]
        else:  # one row per item
            per_item = [[b[row] for b in blocks] for row in range(rows)]
        return [
            (i, ItemBlocks(per_item[row], int(out.lengths[row]), handling[i]))
            for row, i in enumerate(out.items)
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
