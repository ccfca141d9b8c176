"""One embeddings request: validate → cache lookup → queue misses → cache store → vectors.

The HTTP layer hands over a plain :class:`EmbedQuery` (pydantic stays at the boundary) and gets
an :class:`Outcome`; failures are :class:`~app.core.errors.APIError` naming the field and item.
"""

from __future__ import annotations

import logging
import time
import uuid
from dataclasses import dataclass

import numpy as np

from app import metrics as m
from app.core.cache import Cache, CacheEntry, cache_key, cache_namespace
from app.core.dispatch import Dispatcher, DispatchError
from app.core.errors import APIError
from app.core.jobs.leases import Leases
from app.core.query import EmbedQuery, check_query
from app.core.tasks import ItemResult, Task, WorkItem
from app.settings import Settings
from models.artifact import Artifact
from models.blocks import assemble
from models.sequences import (
    Handling,
    Pooling,
)
from models.specs import family_spec

log = logging.getLogger(__name__)


@dataclass(slots=True)
class ItemOutcome:
    """One returned embedding and how it was obtained."""

    vector: np.ndarray  # (k,) pooled or (L, k) per residue, float32
    residues: int  # residues embedded
    handling: Handling  # full | truncated | chunked
    tier: str  # full_hit | partial | miss


@dataclass(slots=True)
class Partial:
    """A served request whose items may have failed one by one (bulk-job chunks)."""

    items: list[ItemOutcome | None]  # in input order; None where the item failed
    failures: dict[int, ItemResult]  # input index → why it failed (code, message)
    k: int  # dims returned
    stop: int  # last chain level used


@dataclass(slots=True)
class Outcome:
    """A served request."""

    items: list[ItemOutcome]  # in input order
    k: int  # dims returned
    stop: int  # last chain level used


class EmbeddingService:
    """Serves one artifact through a cache and a dispatcher."""

    def __init__(
        self,
        artifact: Artifact,
        cache: Cache,
        dispatcher: Dispatcher,
        settings: Settings,
        family_selection: str = "configured",
        token_budget: int | None = None,
        job_leases: Leases | None = None,
    ) -> None:
        self.artifact = artifact
        self.family_selection = family_selection  # how the family was chosen, for /info
        self.token_budget = token_budget  # the worker's batch budget, when the API knows it
        self.cache = cache
        self.dispatcher = dispatcher
        self.settings = settings
        # Who drives which bulk job, shared by the API processes (None: this process alone).
        self.job_leases = job_leases
        self.family = family_spec(artifact.family)
        self.namespace = cache_namespace(artifact)

    def accepts_model(self, name: str | None) -> bool:
        return name in (None, "", self.artifact.name, self.artifact.family)

    def _validate(self, q: EmbedQuery) -> tuple[list[str], list[Handling], int]:
        """Cleaned sequences, how each is fed to the model, and k; APIError naming the fault."""
        if q.model and not self.accepts_model(q.model):
            raise APIError(
                404,
                f"model {q.model!r} is not served here; this server serves "
                f"{self.artifact.name!r} (family {self.artifact.family!r})",
                param="model",
                code="model_not_found",
            )
        return check_query(q, self.artifact, self.family, self.settings)

    async def embed(self, q: EmbedQuery, request_id: str) -> Outcome:
        """The request's embeddings; an item that fails even alone fails the request (500
        naming it; the others are cached)."""
        part = await self.embed_items(q, request_id)
        if part.failures:
            i, r = next(iter(part.failures.items()))
            raise _item_failed(i, r, len(part.failures))
        return Outcome([it for it in part.items if it is not None], part.k, part.stop)

    async def embed_items(self, q: EmbedQuery, request_id: str, bulk: bool = False) -> Partial:
        """Like embed, but items that fail even alone are returned as failures by input index
        (what a bulk job records per record). ``bulk``: queued as a bulk-job chunk, which
        workers take only when no interactive request waits."""
        seqs, handling, k = self._validate(q)
        stop = self.artifact.level_for_dim(k)
        if self.settings.log_sequences:  # opt-in only: sequences can be confidential
            log.debug("sequences", extra={"request_id": request_id, "sequences": seqs})
        bucket = m.k_bucket(k, self.artifact.dims)
        m.ITEMS.labels(bucket, q.pooling.value).inc(len(seqs))

        # Identical sequences in one request are looked up and computed once.
        keys = [
            cache_key(self.namespace, q.pooling, h, s) for s, h in zip(seqs, handling, strict=True)
        ]
        unique = list(dict.fromkeys(keys))
        first = {key: keys.index(key) for key in unique}
        entries = dict(zip(unique, await self.cache.get_many(unique), strict=True))

        tiers: dict[str, str] = {}
        work: list[tuple[str, WorkItem]] = []
        for key in unique:
            e = entries[key]
            known = len(e.blocks) if e is not None else 0
            if known > stop:
                tiers[key] = "full_hit"
                continue
            tiers[key] = "partial" if known else "miss"
            prefix = np.concatenate(e.blocks, axis=-1) if e is not None and known else None
            work.append((key, WorkItem(seqs[first[key]], known, stop, prefix)))
        for key in keys:
            m.CACHE.labels(tiers[key]).inc()

        failed: dict[str, ItemResult] = {}
        if work:
            failed = dict(await self._compute(work, entries, q, bulk))

        items: list[ItemOutcome | None] = []
        failures: dict[int, ItemResult] = {}
        for i, key in enumerate(keys):
            e = entries[key]
            if key in failed or e is None:
                failures[i] = failed[key]
                items.append(None)
                continue
            items.append(
                ItemOutcome(
                    assemble(e.blocks[: stop + 1], k, q.normalize),
                    e.residues,
                    e.handling,
                    tiers[key],
                )
            )
        return Partial(items, failures, k, stop)

    async def _compute(
        self,
        work: list[tuple[str, WorkItem]],
        entries: dict[str, CacheEntry | None],
        q: EmbedQuery,
        bulk: bool = False,
    ) -> list[tuple[str, ItemResult]]:
        """Run the misses on a worker and store what came back; returns the items that failed
        (the others are cached either way, so a retry without the failed ones is served fast)."""
        timeout = self.settings.request_timeout_s
        task = Task(
            # Our own id, never the client's X-Request-ID: replies are routed by task id, and two
            # requests sharing a client-chosen id would receive each other's embeddings.
            id=uuid.uuid4().hex,
            artifact=self.artifact.sha256,
            pooling=q.pooling,
            policy=q.policy,
            items=[w for _, w in work],
            deadline=time.time() + timeout,
            bulk=bulk,
        )
        try:
            result = await self.dispatcher.submit(task, timeout)
        except DispatchError as e:
            raise APIError(
                e.status,
                str(e),
                type=e.type,
                code=e.code,
                headers={"Retry-After": str(e.retry_after_s)},
            ) from None
        except TimeoutError:
            raise APIError(
                504,
                f"the request did not finish within {timeout:g} s",
                type="server_error",
                code="timeout",
            ) from None
        if result.error is not None:
            status = 504 if result.code == "timeout" else 500
            raise APIError(status, result.error, type="server_error", code=result.code)
        stores, failed = [], []
        cap = self.settings.cache_per_residue_max_bytes
        for (key, w), r in zip(work, result.items, strict=True):
            if r.error is not None:
                failed.append((key, r))
                continue
            known = entries[key].blocks[: w.start] if entries[key] is not None else []
            entry = CacheEntry([*known, *r.blocks], r.residues, r.handling)
            entries[key] = entry
            per_residue = q.pooling == Pooling.per_residue
            if not per_residue or sum(b.nbytes for b in entry.blocks) <= cap:
                stores.append((key, w.start, entry))
        await self.cache.put_many(stores)
        return failed


def _item_failed(i: int, r: ItemResult, n_failed: int) -> APIError:
    """The error for sequences that failed even alone, naming the first by its input index."""
    others = f" ({n_failed - 1} more sequences failed too)" if n_failed > 1 else ""
    hint = (
        "; it does not fit in the worker's device memory even alone: send it with "
        "long_sequence_policy 'chunk' or shorter"
        if r.code == "out_of_memory"
        else ""
    )
    return APIError(
        500,
        f"input[{i}]: could not be embedded even in a batch of its own: {r.error}{hint}{others}. "
        "The other sequences were computed and cached: resending them is served from the cache.",
        type="server_error",
        param=f"input[{i}]",
        code=r.code or "compute_failed",
    )
