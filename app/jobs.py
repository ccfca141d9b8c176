"""What travels between the API and workers, and its compact wire format.

A job is one request's cache misses; its result carries the computed RD blocks.  On the wire
(Redis Streams) a message is ``u32 header length | orjson header | raw array bytes``: arrays are
replaced in the header by ``{"__nd__": [offset, [shape…], dtype]}`` so embeddings travel as raw
little-endian bytes instead of JSON numbers.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import orjson


@dataclass(slots=True)
class WorkItem:
    """One sequence to compute: RD blocks of levels start … stop."""

    seq: str  # validated sequence
    start: int  # first level to compute (levels before it are known)
    stop: int  # last level to compute (the chain prefix k needs)
    prefix: np.ndarray | None = None  # known first dims[start−1] RD dims (pooled or per residue)


@dataclass(slots=True)
class Job:
    """One request's work, as queued for a worker."""

    id: str  # request id (also names the reply)
    artifact: str  # sha256 of the artifact the API serves; workers must match
    pooling: str  # mean | per_residue | bos
    policy: str  # long-sequence policy
    items: list[WorkItem]  # sequences to compute
    deadline: float  # unix time after which the result is useless
    reply_to: str = ""  # where the worker sends the result (stream key in distributed mode)


@dataclass(slots=True)
class ItemResult:
    """Computed blocks of one work item, or why it failed."""

    blocks: list[np.ndarray]  # RD blocks of levels start … stop (float32); empty on failure
    residues: int  # residues embedded
    handling: str  # full | truncated | chunked
    error: str | None = None  # set when this item failed even in a batch of its own
    code: str | None = None  # out_of_memory | compute_failed, with error


@dataclass(slots=True)
class JobResult:
    """A worker's answer to a job: results in item order, or an error."""

    id: str  # the job id
    items: list[ItemResult] = field(default_factory=list)  # one per work item unless error is set
    error: str | None = None  # message when the whole job failed
    code: str | None = None  # machine-readable error code (timeout, artifact_mismatch, internal)
    worker: str = ""  # which worker computed it


def _strip(obj: Any, chunks: list[bytes], offset: list[int]) -> Any:
    if isinstance(obj, np.ndarray):
        arr = np.ascontiguousarray(obj)
        if arr.dtype.byteorder == ">":
            arr = arr.astype(arr.dtype.newbyteorder("<"))
        data = arr.tobytes()
        ref = {"__nd__": [offset[0], list(arr.shape), arr.dtype.str]}
        chunks.append(data)
        offset[0] += len(data)
        return ref
    if isinstance(obj, dict):
        return {k: _strip(v, chunks, offset) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_strip(v, chunks, offset) for v in obj]
    return obj


def _restore(obj: Any, payload: memoryview) -> Any:
    if isinstance(obj, dict):
        nd = obj.get("__nd__")
        if nd is not None and len(obj) == 1:
            off, shape, dtype = nd
            dt = np.dtype(dtype)
            count = int(np.prod(shape)) if shape else 1
            return np.frombuffer(payload, dtype=dt, count=count, offset=off).reshape(shape)
        return {k: _restore(v, payload) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_restore(v, payload) for v in obj]
    return obj


def pack(obj: Any) -> bytes:
    """Serialise JSON-like data containing numpy arrays."""
    chunks: list[bytes] = []
    header = orjson.dumps(_strip(obj, chunks, [0]))
    return struct.pack("<I", len(header)) + header + b"".join(chunks)


def unpack(data: bytes) -> Any:
    """Inverse of pack(); arrays are read-only views of ``data``."""
    (n,) = struct.unpack_from("<I", data)
    header = orjson.loads(data[4 : 4 + n])
    return _restore(header, memoryview(data)[4 + n :])


def job_to_wire(job: Job) -> bytes:
    return pack(
        {
            "id": job.id,
            "artifact": job.artifact,
            "pooling": job.pooling,
            "policy": job.policy,
            "deadline": job.deadline,
            "reply_to": job.reply_to,
            "items": [[it.seq, it.start, it.stop, it.prefix] for it in job.items],
        }
    )


def job_from_wire(data: bytes) -> Job:
    d = unpack(data)
    return Job(
        id=d["id"],
        artifact=d["artifact"],
        pooling=d["pooling"],
        policy=d["policy"],
        deadline=d["deadline"],
        reply_to=d["reply_to"],
        items=[WorkItem(s, a, b, p) for s, a, b, p in d["items"]],
    )


def result_to_wire(res: JobResult) -> bytes:
    return pack(
        {
            "id": res.id,
            "error": res.error,
            "code": res.code,
            "worker": res.worker,
            "items": [[it.blocks, it.residues, it.handling, it.error, it.code] for it in res.items],
        }
    )


def result_from_wire(data: bytes) -> JobResult:
    d = unpack(data)
    return JobResult(
        id=d["id"],
        error=d["error"],
        code=d["code"],
        worker=d["worker"],
        items=[ItemResult(list(b), r, h, e, c) for b, r, h, e, c in d["items"]],
    )
