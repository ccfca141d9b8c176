"""The nested embedding cache: per-sequence RD blocks by level, never keyed by k.

An entry holds the RD blocks of levels 0 … j of one sequence (pooled vectors, or per-residue
matrices under a size cap).  Any k ≤ dims[j] is a full hit; a larger k reuses blocks 0 … j as
the prefix and only the missing models run.  Two backends: an in-process LRU (embedded mode)
and Redis hashes (distributed mode, shared by every API replica).  Cache failures never fail a
request: lookups degrade to misses and stores are skipped.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import numpy as np

from app.metrics import CACHE_ERRORS
from models.artifact import Artifact
from models.sequences import Handling, Pooling

if TYPE_CHECKING:
    import redis.asyncio as aioredis

log = logging.getLogger(__name__)


@dataclass(slots=True)
class CacheEntry:
    """Known RD blocks of one sequence."""

    blocks: list[np.ndarray]  # blocks of levels 0 … len−1: (k_l,) pooled or (L, k_l) per residue
    residues: int  # residues embedded
    handling: Handling  # full | truncated | chunked


#: Version of what a key means: bumped whenever its parts change meaning, so that entries
#: written under an older meaning are never read (v2: handling spelled as models.Handling).
KEY_VERSION = "v2"


def cache_namespace(artifact: Artifact) -> str:
    """What makes embeddings of the same sequence comparable: family, models, projection."""
    models = ",".join(f"{lv.model_id}@{lv.revision or ''}" for lv in artifact.levels)
    return f"{KEY_VERSION}|{artifact.family}|{models}|{artifact.sha256}"


def cache_key(namespace: str, pooling: Pooling, handling: Handling, seq: str) -> str:
    """sha256 of (namespace, pooling, long-sequence handling, sequence) — not of k."""
    return hashlib.sha256(
        f"{namespace}|{pooling.value}|{handling.value}|{seq}".encode()
    ).hexdigest()


class Cache(Protocol):
    """The cache interface the service uses."""

    async def get_many(self, keys: list[str]) -> list[CacheEntry | None]:
        """Entries for keys (None for misses), in order."""
        ...

    async def put_many(self, entries: list[tuple[str, int, CacheEntry]]) -> None:
        """Store (key, first new level, full entry) triples."""
        ...

    async def close(self) -> None:
        """Release connections."""
        ...


def _nbytes(entry: CacheEntry) -> int:
    return sum(b.nbytes for b in entry.blocks)


class MemoryCache:
    """Thread-safe LRU bounded by bytes (embedded mode)."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.size = 0
        self._data: OrderedDict[str, CacheEntry] = OrderedDict()
        self._lock = threading.Lock()

    async def get_many(self, keys: list[str]) -> list[CacheEntry | None]:
        out: list[CacheEntry | None] = []
        with self._lock:
            for k in keys:
                e = self._data.get(k)
                if e is not None:
                    self._data.move_to_end(k)
                out.append(e)
        return out

    async def put_many(self, entries: list[tuple[str, int, CacheEntry]]) -> None:
        with self._lock:
            for key, _, entry in entries:
                n = _nbytes(entry)
                if n > self.max_bytes:
                    continue
                old = self._data.pop(key, None)
                if old is not None:
                    self.size -= _nbytes(old)
                self._data[key] = entry
                self.size += n
                while self.size > self.max_bytes:
                    _, ev = self._data.popitem(last=False)
                    self.size -= _nbytes(ev)

    async def close(self) -> None:
        return None


class RedisCache:
    """Redis hashes: field "m" = "residues|handling|rows", fields "0", "1", … = float32 blocks.

    All keys of a request are read in one pipelined round trip (HMGET each) and written in one
    (HSET only the new levels + EXPIRE).  Redis' own eviction (allkeys-lru) and the TTL bound it.
    """

    def __init__(
        self,
        client: aioredis.Redis | aioredis.RedisCluster,
        prefix: str,
        n_levels: int,
        dims: list[int],
        ttl_s: int,
    ) -> None:
        self.r = client  # with short socket timeouts: a slow cache must not stall requests
        self.prefix = f"{prefix}:emb:"
        self.n_levels = n_levels
        self.widths = [dims[0]] + [b - a for a, b in itertools.pairwise(dims)]
        self.ttl_s = ttl_s

    async def get_many(self, keys: list[str]) -> list[CacheEntry | None]:
        fields = ["m", *map(str, range(self.n_levels))]
        try:
            async with self.r.pipeline(transaction=False) as pipe:
                for k in keys:
                    pipe.hmget(self.prefix + k, fields)
                rows = await pipe.execute()
        except Exception as e:  # noqa: BLE001 — any cache failure degrades to a miss
            CACHE_ERRORS.labels("get").inc()
            log.warning("cache lookup failed; computing instead", extra={"error": repr(e)})
            return [None] * len(keys)
        return [self._decode(row) for row in rows]

    def _decode(self, row: list[bytes | None]) -> CacheEntry | None:
        meta, *raw = row
        if meta is None or raw[0] is None:
            return None
        residues, handling, rows = meta.decode().split("|")
        n_rows = int(rows)
        blocks = []
        for width, data in zip(self.widths, raw, strict=False):
            if data is None:
                break  # only a contiguous prefix of levels is usable
            arr = np.frombuffer(data, dtype="<f4")
            blocks.append(arr.reshape(n_rows, width) if n_rows else arr)
        return CacheEntry(blocks, int(residues), Handling(handling))

    async def put_many(self, entries: list[tuple[str, int, CacheEntry]]) -> None:
        if not entries:
            return
        try:
            async with self.r.pipeline(transaction=False) as pipe:
                for key, start, e in entries:
                    rows = e.blocks[0].shape[0] if e.blocks[0].ndim == 2 else 0
                    mapping: dict[str, bytes | str] = {
                        "m": f"{e.residues}|{e.handling.value}|{rows}"
                    }
                    for lvl in range(start, len(e.blocks)):
                        mapping[str(lvl)] = np.ascontiguousarray(
                            e.blocks[lvl], dtype="<f4"
                        ).tobytes()
                    pipe.hset(self.prefix + key, mapping=mapping)
                    if self.ttl_s:
                        pipe.expire(self.prefix + key, self.ttl_s)
                await pipe.execute()
        except Exception as e:  # noqa: BLE001 — a failed store only costs a future recompute
            CACHE_ERRORS.labels("put").inc()
            log.warning("cache store failed", extra={"error": repr(e)})

    async def close(self) -> None:
        await self.r.aclose()
