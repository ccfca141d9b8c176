"""Batched extraction of raw per-level representations, pooled or per residue."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

__all__ = ["BatchOutput", "BatchPlan", "Extractor", "ForwardStats", "Pooling", "split_plan"]

from models.batching import bucket_tokens, default_token_budget, plan_batches, plan_packed
from models.families.base import ModelFamily
from models.sequences import Handling, LongSequencePolicy, Pooling, Segment, plan_segments


@dataclass(slots=True)
class ForwardStats:
    """What one level's forward over one batch did (for metrics and benchmarks)."""

    level: int  # level index
    seconds: float  # wall time of the forward (device-synchronised)
    rows: int  # model rows (segments) in the batch
    residues: int  # real residues processed
    padded_tokens: int  # rows × padded width, special tokens included


ForwardObserver = Callable[[ForwardStats], None]


@dataclass(slots=True)
class _Timing:
    """A level's forward whose duration may still be running on the device."""

    stats: ForwardStats  # seconds filled in by BatchOutput.report
    events: tuple[torch.cuda.Event, torch.cuda.Event] | None  # CUDA start/end; None: host timed


@dataclass(slots=True)
class BatchPlan:
    """One padded model batch: the items it completes and how segments map back to them."""

    items: list[int]  # input indices, in output row order
    segments: list[Segment]  # model rows, grouped by item
    lengths: np.ndarray  # (n,) residues of each item as embedded (after truncation)
    seg_row: torch.Tensor  # (S,) row in `items` of each segment
    first_seg: torch.Tensor  # (n,) first segment of each item (its start token for 'bos')
    weights: torch.Tensor  # (S, T) mean-pool weight of each segment position
    dest: torch.Tensor | None  # (Σ segment lengths,) packed residue row; None when 1:1
    counts: torch.Tensor | None  # (Σ lengths,) windows covering each packed residue
    tokens: int | None = None  # packed row length to pad to (default: the batch's bucket)


@dataclass(slots=True)
class BatchOutput:
    """Raw representations of one batch for each level run (on the family's device; on CUDA
    possibly still being computed)."""

    items: list[int]  # input indices, in row order
    lengths: np.ndarray  # (n,) residues per item
    levels: dict[int, torch.Tensor]  # level → (n, d) pooled, or (Σ lengths, d) packed residues
    timings: list[_Timing] = field(default_factory=list)  # per level run, for report()

    def report(self, observer: ForwardObserver) -> None:
        """Pass each level's ForwardStats to ``observer``, waiting for the device's timings.

        On CUDA, durations are device time between events recorded around each forward, so
        timing needs no synchronisation while the batch is launched, only here.
        """
        for t in self.timings:
            if t.events is not None:
                start, end = t.events
                end.synchronize()
                t.stats.seconds = start.elapsed_time(end) / 1000
            observer(t.stats)


def _make_plan(
    items: list[int], segs_of: dict[int, list[Segment]], lengths: Mapping[int, int] | Sequence[int]
) -> BatchPlan:
    segments = [s for i in items for s in segs_of[i]]
    seg_row = np.repeat(np.arange(len(items)), [len(segs_of[i]) for i in items])
    first_seg = np.concatenate([[0], np.cumsum([len(segs_of[i]) for i in items])[:-1]])
    item_len = np.array([lengths[i] for i in items], dtype=np.int64)
    width = max(len(s.seq) for s in segments)
    weights = np.zeros((len(segments), width), dtype=np.float32)
    chunked = len(segments) != len(items)
    dest = counts = None
    if chunked:
        offsets = np.concatenate([[0], np.cumsum(item_len)[:-1]])
        cover = np.zeros(int(item_len.sum()), dtype=np.float32)
        dest_parts = []
        for s, row in zip(segments, seg_row, strict=True):
            idx = offsets[row] + s.start + np.arange(len(s.seq))
            dest_parts.append(idx)
            cover[idx] += 1.0
        dest_np = np.concatenate(dest_parts)
        # Mean over residues of the window-averaged outputs: weight = 1 / (coverage · length).
        for k, (s, idx) in enumerate(zip(segments, dest_parts, strict=True)):
            weights[k, : len(s.seq)] = 1.0 / (cover[idx] * item_len[seg_row[k]])
        dest, counts = torch.from_numpy(dest_np), torch.from_numpy(cover)
    else:
        for k, s in enumerate(segments):
            weights[k, : len(s.seq)] = 1.0 / len(s.seq)
    return BatchPlan(
        items=items,
        segments=segments,
        lengths=item_len,
        seg_row=torch.from_numpy(seg_row),
        first_seg=torch.from_numpy(first_seg.astype(np.int64)),
        weights=torch.from_numpy(weights),
        dest=dest,
        counts=counts,
    )


def split_plan(plan: BatchPlan) -> list[BatchPlan]:
    """The plan's items in two halves (same order), each a plan of its own.

    A batch that failed (e.g. out of device memory) is retried as two smaller ones; a chunked
    item's windows always stay together, since they are pooled into one output row.
    """
    segs_of: dict[int, list[Segment]] = {}
    for s in plan.segments:
        segs_of.setdefault(s.item, []).append(s)
    lengths = {i: int(n) for i, n in zip(plan.items, plan.lengths, strict=True)}
    half = (len(plan.items) + 1) // 2
    halves = [plan.items[:half], plan.items[half:]]
    return [_make_plan(h, segs_of, lengths) for h in halves if h]


class Extractor:
    """Plans residue-budget batches and runs family levels on them."""

    def __init__(
        self, family: ModelFamily, token_budget: int | None = None, chunk_overlap: int = 256
    ) -> None:
        if family.max_residues is not None and not 0 <= chunk_overlap < family.max_residues:
            raise ValueError(f"chunk_overlap must be in [0, {family.max_residues})")
        self.family = family
        self.token_budget = token_budget or default_token_budget(family.device.type, family.name)
        self.chunk_overlap = chunk_overlap

    def plan(
        self, seqs: Sequence[str], policy: LongSequencePolicy = LongSequencePolicy.error
    ) -> tuple[list[BatchPlan], list[Handling]]:
        """Split long sequences per the policy and pack items into length-sorted batches."""
        segments, handling = plan_segments(
            seqs, self.family.max_residues, policy, self.chunk_overlap
        )
        segs_of: dict[int, list[Segment]] = {}
        for s in segments:
            segs_of.setdefault(s.item, []).append(s)
        cap = self.family.max_residues
        lengths = [
            len(s) if h != Handling.truncated else cap for s, h in zip(seqs, handling, strict=True)
        ]
        if self.family.packed:
            special = self.family.special_tokens
            tokens = [sum(len(s.seq) + special for s in segs_of[i]) for i in range(len(seqs))]
            groups = plan_packed(tokens, self.token_budget)
        else:
            widths = [min(n, cap) if cap else n for n in lengths]
            groups = plan_batches(
                widths,
                self.token_budget,
                self.family.special_tokens,
                rows=[len(segs_of[i]) for i in range(len(seqs))],
            )
        return [_make_plan(g, segs_of, lengths) for g in groups], handling

    def packed_tokens(self, plan: BatchPlan) -> int:
        """The length of the plan's packed row: ``plan.tokens`` when set, else the tokens it
        holds, rounded up to a bucket for a compiled family (a handful of static shapes)."""
        if plan.tokens:
            return plan.tokens
        used = sum(len(s.seq) + self.family.special_tokens for s in plan.segments)
        if self.family.compile_options is None:
            return used
        return bucket_tokens(used, self.token_budget)

    def run(
        self,
        plan: BatchPlan,
        levels: Sequence[int],
        pooling: Pooling,
        observer: ForwardObserver | None = None,
    ) -> BatchOutput:
        """Encode once, run each requested level once, pool; rows follow ``plan.items``."""
        out = self.launch(plan, levels, pooling)
        if observer is not None:
            out.report(observer)
        return out

    def launch(self, plan: BatchPlan, levels: Sequence[int], pooling: Pooling) -> BatchOutput:
        """Like run(), without waiting for the device: on CUDA the kernels are queued and the
        outputs are still being computed when this returns (``report`` waits for timings)."""
        if pooling == Pooling.bos and not self.family.has_bos:
            raise ValueError(
                f"family {self.family.name!r} has no start token; 'bos' pooling is unavailable"
            )
        seqs = [s.seq for s in plan.segments]
        pad_to = 0
        if self.family.packed:
            pad_to = self.packed_tokens(plan)
            batch = self.family.encode(seqs, pad_to=pad_to)  # type: ignore[call-arg]
        else:
            batch = self.family.encode(seqs)
        dev = self.family.device
        cuda = dev.type == "cuda"
        residues = sum(len(s) for s in seqs)
        out = BatchOutput(plan.items, plan.lengths, {})
        for level in levels:
            self.family.load(level)  # keep weight loading out of the forward timing
            events = None
            if cuda:
                events = (
                    torch.cuda.Event(enable_timing=True),
                    torch.cuda.Event(enable_timing=True),
                )
                events[0].record()
            t0 = time.perf_counter()
            lo = self.family.forward(level, batch)
            out.levels[level] = self._pool(plan, lo.residues, lo.mask, lo.bos, pooling, dev)
            if lo.mask is None:
                padded = pad_to
            else:
                rows, width = lo.mask.shape
                padded = rows * (width + self.family.special_tokens)
            stats = ForwardStats(
                level=level,
                seconds=time.perf_counter() - t0,
                rows=len(seqs),
                residues=residues,
                padded_tokens=padded,
            )
            if events is not None:
                events[1].record()
            out.timings.append(_Timing(stats, events))
        return out

    @staticmethod
    def _pool(
        plan: BatchPlan,
        residues: torch.Tensor,
        mask: torch.Tensor | None,
        bos: torch.Tensor | None,
        pooling: Pooling,
        dev: torch.device,
    ) -> torch.Tensor:
        """Pooled rows (n, d) or packed residues (Σ lengths, d) of one level's output; a packed
        output (``mask`` None) is already residues back to back in segment order."""
        n, d = len(plan.items), residues.shape[-1]
        if pooling == Pooling.bos:
            assert bos is not None
            return bos[plan.first_seg.to(dev)]
        if pooling == Pooling.mean:
            if mask is None:
                seg = _segment_means(plan, residues, dev)
            else:
                w = plan.weights.to(dev)
                seg = torch.bmm(w.unsqueeze(1), residues[:, : w.shape[1]]).squeeze(1)
            if plan.dest is None:
                return seg
            return torch.zeros(n, d, device=dev).index_add_(0, plan.seg_row.to(dev), seg)
        packed = residues if mask is None else residues[mask]
        if plan.dest is None:
            return packed
        assert plan.counts is not None
        acc = torch.zeros(plan.counts.shape[0], d, device=dev).index_add_(
            0, plan.dest.to(dev), packed
        )
        return acc / plan.counts.to(dev).unsqueeze(1)


def _segment_means(plan: BatchPlan, packed: torch.Tensor, dev: torch.device) -> torch.Tensor:
    """Σ_t w_st x_t per segment s of packed residues x: the plan's pooling weights, applied as
    one weighted segment sum (deterministic, unlike scatter-adds on CUDA)."""
    seg_len = torch.tensor([len(s.seq) for s in plan.segments])
    width = plan.weights.shape[1]
    w = plan.weights[torch.arange(width) < seg_len.unsqueeze(1)]  # (Σ lengths,) segment order
    cuda = dev.type == "cuda"
    w, seg_len = ((t.pin_memory() if cuda else t).to(dev, non_blocking=cuda) for t in (w, seg_len))
    return torch.segment_reduce(packed * w.unsqueeze(1), "sum", lengths=seg_len, unsafe=True)
