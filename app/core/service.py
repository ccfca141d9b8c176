"""One embeddings request: validate → cache lookup → queue misses → cache store → vectors.

The HTTP layer hands over a plain :class:`EmbedQuery` (pydantic stays at the boundary) and gets
an :class:`Outcome`; failures are :class:`~app.core.errors.APIError` naming the field and item.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from app import metrics as m
from app.core.cache import Cache, CacheEntry, cache_key, cache_namespace
from app.core.dispatch import Dispatcher, DispatchError
from app.core.errors import APIError
from app.core.tasks import ItemResult, Task, WorkItem
from app.settings import Settings
from models.artifact import Artifact
from models.blocks import assemble
from models.formats import member_name_problem
from models.sequences import (
    Handling,
    LongSequencePolicy,
    Pooling,
    SequenceError,
    clean_sequence,
    first_duplicate,
    handling_for,
)
from models.specs import family_spec

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class EmbedQuery:
    """What a client asks for (already type-checked at the boundary)."""

    inputs: Sequence[str]  # sequences as sent (cleaned and checked here)
    ids: Sequence[str] | None = None  # one per input, unique, when given
    model: str | None = None  # the served family or artifact name, if named
    dimensions: int | None = None  # k (default: the artifact's full dim)
    pooling: Pooling = Pooling.mean  # mean | per_residue | bos
    policy: LongSequencePolicy = LongSequencePolicy.truncate  # for sequences over the context
    normalize: bool = False  # L2-normalise after truncating to k
    value_bytes: float = 4.0  # bytes per returned number in the response's encoding
    encoding: str = "binary"  # what value_bytes describes, for the 413 message


@dataclass(slots=True)
class ItemOutcome:
    """One returned embedding and how it was obtained."""

    vector: np.ndarray  # (k,) pooled or (L, k) per residue, float32
    residues: int  # residues embedded
    handling: Handling  # full | truncated | chunked
    tier: str  # full_hit | partial | miss


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
    ) -> None:
        self.artifact = artifact
        self.family_selection = family_selection  # how the family was chosen, for /info
        self.token_budget = token_budget  # the worker's batch budget, when the API knows it
        self.cache = cache
        self.dispatcher = dispatcher
        self.settings = settings
        self.family = family_spec(artifact.family)
        self.namespace = cache_namespace(artifact)

    def accepts_model(self, name: str | None) -> bool:
        return name in (None, "", self.artifact.name, self.artifact.family)

    def _validate(self, q: EmbedQuery) -> tuple[list[str], list[Handling], int]:
        """Cleaned sequences, how each is fed to the model, and k; APIError naming the fault."""
        raw = q.inputs
        if not raw:
            raise APIError(
                400, "input must contain at least one sequence", param="input", code="empty_input"
            )
        s = self.settings
        if len(raw) > s.max_sequences:
            raise APIError(
                413,
                f"input has {len(raw)} sequences; the limit is {s.max_sequences} "
                "(GET /info lists the limits): split the request",
                param="input",
                code="too_many_sequences",
            )
        if q.model and not self.accepts_model(q.model):
            raise APIError(
                404,
                f"model {q.model!r} is not served here; this server serves "
                f"{self.artifact.name!r} (family {self.artifact.family!r})",
                param="model",
                code="model_not_found",
            )
        if q.ids is not None and len(q.ids) != len(raw):
            raise APIError(
                400,
                f"ids has {len(q.ids)} entries but input has {len(raw)}",
                param="ids",
                code="ids_length_mismatch",
            )
        # ids key the .npz output and must identify one item each.
        if q.ids is not None and (dup := first_duplicate(q.ids)) is not None:
            i, j = dup
            raise APIError(
                400,
                f"ids[{i}] repeats ids[{j}] ({q.ids[i]!r}); ids must be unique",
                param=f"ids[{i}]",
                code="duplicate_id",
            )
        for i, id_ in enumerate(q.ids or ()):
            if (why := member_name_problem(id_)) is not None:
                raise APIError(400, f"ids[{i}]: {why}", param=f"ids[{i}]", code="invalid_id")
        k = q.dimensions if q.dimensions is not None else self.artifact.max_dim
        if not 1 <= k <= self.artifact.max_dim:
            raise APIError(
                400,
                f"dimensions must be between 1 and {self.artifact.max_dim}, got {k}",
                param="dimensions",
                code="invalid_dimensions",
            )
        try:
            self.family.check_pooling(q.pooling)
        except ValueError as e:
            raise APIError(400, str(e), param="pooling", code="unsupported_pooling") from None
        seqs, handling = [], []
        total = 0
        for i, r in enumerate(raw):
            try:
                seq = clean_sequence(r, i)
            except SequenceError as e:
                raise APIError(
                    400, f"input[{i}]: {e.reason}", param=f"input[{i}]", code="invalid_sequence"
                ) from None
            try:
                handling.append(handling_for(i, len(seq), self.family.max_residues, q.policy))
            except SequenceError as e:
                raise APIError(
                    400, f"input[{i}]: {e.reason}", param=f"input[{i}]", code="sequence_too_long"
                ) from None
            total += len(seq)
            seqs.append(seq)
        if total > s.max_residues:
            raise APIError(
                413,
                f"input has {total} residues; the limit is {s.max_residues} "
                "(GET /info lists the limits): split the request",
                param="input",
                code="too_many_residues",
            )
        self._check_output_size(q, seqs, handling, k)
        return seqs, handling, k

    def _check_output_size(
        self, q: EmbedQuery, seqs: list[str], handling: list[Handling], k: int
    ) -> None:
        """413 before any work when the answer would exceed max_output_bytes: the response in
        its encoding, or the float32 blocks up to k's level a worker sends back for it."""
        if q.pooling == Pooling.per_residue:
            cap = self.family.max_residues
            rows = sum(
                cap if h == Handling.truncated and cap else len(seq)
                for seq, h in zip(seqs, handling, strict=True)
            )
        else:
            rows = len(seqs)
        width = self.artifact.dims[self.artifact.level_for_dim(k)]
        size = max(rows * k * q.value_bytes, rows * width * 4)
        limit = self.settings.max_output_bytes
        if size > limit:
            raise APIError(
                413,
                f"the response would take about {size / 2**20:,.1f} MiB ({rows:,} vectors × "
                f"{k} dims as {q.encoding}); the limit is {limit / 2**20:,.1f} MiB "
                "(max_output_bytes). Ask for binary output (Accept: application/x-npy, "
                "dtype float16), fewer dimensions or fewer sequences per request, or run a bulk "
                "job with `rdserve embed`.",
                param="input",
                code="output_too_large",
            )

    async def embed(self, q: EmbedQuery, request_id: str) -> Outcome:
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

        if work:
            failed = await self._compute(work, entries, q)
            if failed:
                raise _item_failed(failed, keys)

        items = []
        for key in keys:
            e = entries[key]
            assert e is not None
            items.append(
                ItemOutcome(
                    assemble(e.blocks[: stop + 1], k, q.normalize),
                    e.residues,
                    e.handling,
                    tiers[key],
                )
            )
        return Outcome(items, k, stop)

    async def _compute(
        self,
        work: list[tuple[str, WorkItem]],
        entries: dict[str, CacheEntry | None],
        q: EmbedQuery,
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


def _item_failed(failed: list[tuple[str, ItemResult]], keys: list[str]) -> APIError:
    """The error for sequences that failed even alone, naming the first by its input index."""
    key, r = failed[0]
    i = keys.index(key)
    others = f" ({len(failed) - 1} more sequences failed too)" if len(failed) > 1 else ""
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
