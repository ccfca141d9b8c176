"""What the API hands to workers: a task is one request's cache misses (or one chunk of a bulk
job's), and its result.

Tasks travel in-process (embedded mode) or through Redis (``app.transport.wire`` encodes them);
enums stay enums here and become strings only on the wire.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from models.sequences import Handling, LongSequencePolicy, Pooling


@dataclass(slots=True)
class WorkItem:
    """One sequence to compute: RD blocks of levels start … stop."""

    seq: str  # validated sequence
    start: int  # first level to compute (levels before it are known)
    stop: int  # last level to compute (the chain prefix k needs)
    prefix: np.ndarray | None = None  # known first dims[start−1] RD dims (pooled or per residue)


@dataclass(slots=True)
class Task:
    """One request's work, as queued for a worker."""

    id: str  # task id, drawn by the API (also routes the reply)
    artifact: str  # sha256 of the artifact the API serves; workers must match
    pooling: Pooling  # mean | per_residue | bos
    policy: LongSequencePolicy  # long-sequence policy
    items: list[WorkItem]  # sequences to compute
    deadline: float  # unix time after which the result is useless
    reply_to: str = ""  # where the worker sends the result (stream key in distributed mode)
    bulk: bool = False  # a bulk job's chunk: queued apart, and yields to interactive tasks

    @property
    def residues(self) -> int:
        """Residues to compute: what a worker's batch budget counts."""
        return sum(len(it.seq) for it in self.items)


@dataclass(slots=True)
class ItemResult:
    """Computed blocks of one work item, or why it failed."""

    blocks: list[np.ndarray]  # RD blocks of levels start … stop (float32); empty on failure
    residues: int  # residues embedded
    handling: Handling  # full | truncated | chunked
    error: str | None = None  # set when this item failed even in a batch of its own
    code: str | None = None  # out_of_memory | compute_failed, with error

    @classmethod
    def failure(cls, message: str, code: str) -> ItemResult:
        """An item that failed even alone (its handling is moot: nothing was returned)."""
        return cls([], 0, Handling.full, error=message, code=code)


@dataclass(slots=True)
class TaskResult:
    """A worker's answer to a task: results in item order, or an error."""

    id: str  # the task id
    items: list[ItemResult] = field(default_factory=list)  # one per work item unless error is set
    error: str | None = None  # message when the whole task failed
    code: str | None = None  # machine-readable error code (timeout, artifact_mismatch, internal)
    worker: str = ""  # which worker computed it
