"""The wire format of tasks and results in Redis: ``u32 header length | orjson header | raw
array bytes``.

Arrays are replaced in the header by ``{"__nd__": [offset, [shape…], dtype]}``, so embeddings
travel as raw little-endian bytes instead of JSON numbers; enums travel as their string values
(this codec is the only place they are converted).
"""

from __future__ import annotations

import struct
from typing import Any

import numpy as np
import orjson

from app.core.tasks import ItemResult, Task, TaskResult, WorkItem
from models.sequences import Handling, LongSequencePolicy, Pooling


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


def task_to_wire(task: Task) -> bytes:
    return pack(
        {
            "id": task.id,
            "artifact": task.artifact,
            "pooling": str(task.pooling),
            "policy": str(task.policy),
            "deadline": task.deadline,
            "reply_to": task.reply_to,
            "bulk": task.bulk,
            "items": [[it.seq, it.start, it.stop, it.prefix] for it in task.items],
        }
    )


def task_from_wire(data: bytes) -> Task:
    d = unpack(data)
    return Task(
        id=d["id"],
        artifact=d["artifact"],
        pooling=Pooling(d["pooling"]),
        policy=LongSequencePolicy(d["policy"]),
        deadline=d["deadline"],
        reply_to=d["reply_to"],
        items=[WorkItem(s, a, b, p) for s, a, b, p in d["items"]],
        bulk=d.get("bulk", False),
    )


def result_to_wire(res: TaskResult) -> bytes:
    return pack(
        {
            "id": res.id,
            "error": res.error,
            "code": res.code,
            "worker": res.worker,
            "items": [
                [it.blocks, it.residues, str(it.handling), it.error, it.code] for it in res.items
            ],
        }
    )


def result_from_wire(data: bytes) -> TaskResult:
    d = unpack(data)
    return TaskResult(
        id=d["id"],
        error=d["error"],
        code=d["code"],
        worker=d["worker"],
        items=[ItemResult(list(b), r, Handling(h), e, c) for b, r, h, e, c in d["items"]],
    )
