"""What a bulk job is: its options, its spec (fixed at intake) and its state (progress), as
stored in the job's folder (``job.json``, ``state.json``); plain dataclasses, JSON in and out."""

from __future__ import annotations

import secrets
import time
from dataclasses import asdict, dataclass, field, fields
from enum import StrEnum
from typing import Any, Self

from models.sequences import LongSequencePolicy, Pooling

#: Failures listed in a job's state (all of them are counted; the rest are in the chunk files).
MAX_LISTED_FAILURES = 100


class JobStatus(StrEnum):
    """Where a job is: queued → running → succeeded | failed | cancelled."""

    queued = "queued"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    cancelled = "cancelled"

    @property
    def ended(self) -> bool:
        return self in (JobStatus.succeeded, JobStatus.failed, JobStatus.cancelled)


class OnInvalid(StrEnum):
    """A record with invalid residues (or an unusable id) at intake."""

    error = "error"  # refuse the whole job (400 naming the record)
    skip = "skip"  # leave the record out; it is listed among the job's failures


@dataclass(frozen=True, slots=True)
class JobOptions:
    """What the client chose (the same options as /v1/embeddings, plus intake policies)."""

    dimensions: int | None = None  # k (default: the artifact's full dim)
    pooling: Pooling = Pooling.mean  # mean | per_residue | bos
    policy: LongSequencePolicy = LongSequencePolicy.truncate  # sequences over the context
    normalize: bool = False  # L2-normalise after truncating to k
    dtype: str = "float32"  # element type of the result arrays (float32 | float16)
    on_invalid: OnInvalid = OnInvalid.error  # records with invalid residues or ids
    strip_stop: bool = False  # drop one trailing '*' (a stop codon) from each record


@dataclass(slots=True)
class Failure:
    """A record that is not in the result, and why."""

    record: int  # 1-based record number in the input
    id: str  # its id
    error: str  # what went wrong
    code: str  # invalid_sequence | sequence_too_long | invalid_id | out_of_memory | …


@dataclass(slots=True)
class JobSpec:
    """A job as accepted: fixed once intake ends."""

    id: str  # job id (sortable by creation time)
    owner: str  # who may see it: the API key's digest prefix ("anonymous" without keys)
    created_at: float  # unix time
    source: str  # "fasta" (an upload) or "json"
    model: str  # the artifact's name
    family: str  # its model family
    artifact_sha256: str  # the artifact the job is computed with
    dimensions: int  # k, resolved
    pooling: Pooling
    policy: LongSequencePolicy
    normalize: bool
    dtype: str
    on_invalid: OnInvalid
    records: int  # records to embed (skipped ones not counted)
    residues: int  # their residues
    chunks: int  # input chunks
    skipped: list[Failure] = field(default_factory=list)  # records left out at intake
    input_bytes: int = 0  # bytes received (compressed, as sent)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Self:
        d = {f.name: d[f.name] for f in fields(cls) if f.name in d}
        d["pooling"] = Pooling(d["pooling"])
        d["policy"] = LongSequencePolicy(d["policy"])
        d["on_invalid"] = OnInvalid(d["on_invalid"])
        d["skipped"] = [Failure(**f) for f in d.get("skipped", [])]
        return cls(**d)


@dataclass(slots=True)
class JobState:
    """A job's progress, rewritten by the process driving it."""

    status: JobStatus = JobStatus.queued
    started_at: float | None = None  # unix time the first driver started
    ended_at: float | None = None  # unix time it succeeded, failed or was cancelled
    updated_at: float = field(default_factory=time.time)  # last rewrite
    records_done: int = 0  # records embedded (in the result)
    residues_done: int = 0  # their residues
    chunks_done: int = 0  # input chunks finished
    cache: dict[str, int] = field(default_factory=dict)  # records by tier: full_hit|partial|miss
    failures_total: int = 0  # records that failed while computing (not those skipped)
    failures: list[Failure] = field(default_factory=list)  # the first MAX_LISTED_FAILURES
    residues_per_s: float | None = None  # this driver's rate
    eta_s: float | None = None  # residues left ÷ that rate
    waiting: str | None = None  # why no chunk is moving (e.g. no live worker), when that is so
    error: str | None = None  # why the job failed
    error_code: str | None = None  # machine-readable reason
    result_bytes: int | None = None  # size of result.npz once succeeded

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Self:
        d = {f.name: d[f.name] for f in fields(cls) if f.name in d}
        d["status"] = JobStatus(d["status"])
        d["failures"] = [Failure(**f) for f in d.get("failures", [])]
        return cls(**d)


def new_job_id(now: float | None = None) -> str:
    """``job-<UTC time to the millisecond>-<random>``: unique, and sorted by creation time."""
    now = time.time() if now is None else now
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(now)) + f"{int(now * 1000) % 1000:03d}"
    return f"job-{stamp}-{secrets.token_hex(5)}"
