"""Driving one job: its chunks through the embedding service, a few at a time, then the result.

Each chunk is a bulk request to the service (cache lookup, misses queued on the bulk stream,
cache store), so a chunk already computed by anyone — an earlier run at a smaller k, a crashed
driver — costs only what is missing. A chunk's outcome is written to the store before it counts
as done; a driver that takes a job over reads which chunks are done and does the rest. Transient
refusals (no worker, queue unavailable, timeouts) are retried with backoff for as long as the job
lives; records that fail even alone are listed, the others go on.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import asdict, dataclass

from app import metrics as m
from app.core.errors import APIError
from app.core.jobs.leases import Leases
from app.core.jobs.model import MAX_LISTED_FAILURES, Failure, JobSpec, JobState, JobStatus
from app.core.jobs.results import assemble, done_chunks, write_chunk
from app.core.query import EmbedQuery
from app.core.service import EmbeddingService
from app.core.store import ResultStore
from models.sequences import Pooling

log = logging.getLogger(__name__)

#: Answers that mean "not now" (the chunk is tried again), as opposed to a record's own fault.
TRANSIENT_STATUS = (429, 503, 504)
#: The longest pause between tries of a chunk that keeps being refused.
MAX_BACKOFF_S = 30.0
#: How often progress is written to the job's state (readers poll it).
STATE_EVERY_S = 1.0


@dataclass
class JobContext:
    """What every driver of this process shares."""

    service: EmbeddingService
    store: ResultStore
    leases: Leases
    lease_s: float  # lease time to live: renewed every third of it
    max_inflight: int  # chunks in flight per job at most (0: two per live worker)


class JobStopped(Exception):
    """This process no longer drives the job (its lease went to another, or it shuts down)."""


class JobRunner:
    """Drives one job to its end (or until it loses its lease)."""

    def __init__(self, ctx: JobContext, job_dir: str, spec: JobSpec) -> None:
        self.ctx, self.dir, self.spec = ctx, job_dir, spec
        self.store = ctx.store
        self.pooled = spec.pooling != Pooling.per_residue
        self.state = JobState()
        self.waiting: str | None = None
        self._t0 = time.monotonic()
        self._residues_here = 0  # residues this driver did (its rate)
        self._written = 0.0
        self._renewed = time.monotonic()

    def _path(self, *parts: str) -> str:
        return self.store.path(self.dir, *parts)

    async def run(self) -> JobStatus:
        """Drive the job; returns how it ended (raises JobStopped when another process takes
        over)."""
        saved = await self.store.aread_json(self._path("state.json"))
        if saved is not None:
            self.state = JobState.from_json(saved)
        if self.state.status.ended:
            return self.state.status
        self.state.status = JobStatus.running
        self.state.started_at = self.state.started_at or time.time()
        done = await asyncio.to_thread(done_chunks, self.store, self.dir)
        self._recount(done)
        await self._save(force=True)
        pending = [i for i in range(self.spec.chunks) if i not in done]
        inflight: dict[asyncio.Task, int] = {}
        cancelled = False
        try:
            while pending or inflight:
                if await self.store.aexists(self._path("cancel")):
                    cancelled = True
                    break
                window = await self._window()
                while pending and len(inflight) < window:
                    i = pending.pop(0)
                    inflight[asyncio.create_task(self._chunk(i), name=f"{self.spec.id}:{i}")] = i
                finished, _ = await asyncio.wait(
                    inflight, timeout=STATE_EVERY_S, return_when=asyncio.FIRST_COMPLETED
                )
                for t in finished:
                    inflight.pop(t)
                    self._count(t.result())
                await self._keep_lease()
                await self._save()
        finally:
            for t in inflight:  # cancelled: the service withdraws their tasks
                t.cancel()
            for t in inflight:
                with contextlib.suppress(BaseException):
                    await t
        if cancelled:  # only once nothing is in flight: no chunk is written after this
            return await self._end(JobStatus.cancelled)
        return await self._finish()

    async def _window(self) -> int:
        """Chunks in flight: two per live worker (each has the next one queued), or the cap."""
        if self.ctx.max_inflight:
            return self.ctx.max_inflight
        st = await self.ctx.service.dispatcher.status()
        return max(2, 2 * st.workers)

    async def _keep_lease(self) -> None:
        if time.monotonic() - self._renewed < self.ctx.lease_s / 3:
            return
        self._renewed = time.monotonic()
        if not await self.ctx.leases.renew(self.spec.id):
            log.warning("job lease taken by another process", extra={"job": self.spec.id})
            raise JobStopped(self.spec.id)

    async def _chunk(self, i: int) -> dict:
        """Embed chunk i and write its outcome; returns its summary."""
        inp = await self.store.aread_json(self._path("inputs", f"{i}.json"))
        spec = self.spec
        query = EmbedQuery(
            inputs=inp["seqs"],
            dimensions=spec.dimensions,
            pooling=spec.pooling,
            policy=spec.policy,
            normalize=spec.normalize,
            value_bytes=2.0 if spec.dtype == "float16" else 4.0,
            encoding=f"binary {spec.dtype}",
        )
        t0, backoff = time.monotonic(), 1.0
        while True:
            try:
                part = await self.ctx.service.embed_items(query, f"{spec.id}:{i}", bulk=True)
                error = None
                break
            except APIError as e:
                if e.status not in TRANSIENT_STATUS:
                    part, error = None, e  # the chunk's own fault: every record fails with it
                    break
                self.waiting = f"{e.code}: {e.message}"
                await asyncio.sleep(backoff)
                backoff = min(2 * backoff, MAX_BACKOFF_S)
        self.waiting = None
        ids, vectors, failures, tiers, residues = [], [], [], {}, 0
        for j, (number, name) in enumerate(zip(inp["numbers"], inp["ids"], strict=True)):
            item = part.items[j] if part is not None else None
            if item is None:
                why = error if error is not None else part.failures[j]  # type: ignore[union-attr]
                msg = why.message if isinstance(why, APIError) else why.error
                failures.append(Failure(number, name, msg or "failed", why.code or "failed"))
                continue
            ids.append(name)
            vectors.append(item.vector)
            tiers[item.tier] = tiers.get(item.tier, 0) + 1
            residues += item.residues
        summary = {
            "records": len(ids),
            "residues": residues,
            "cache": tiers,
            "failures": [asdict(f) for f in failures],
            "seconds": round(time.monotonic() - t0, 3),
        }
        await asyncio.to_thread(
            write_chunk, self.store, self.dir, i, ids, vectors, self.pooled, spec.dtype, summary
        )
        return summary

    def _recount(self, done: dict[int, dict]) -> None:
        """Progress from the chunks already done (a driver taking the job over)."""
        st = self.state
        st.records_done = st.residues_done = st.chunks_done = st.failures_total = 0
        st.cache, st.failures = {}, []
        for i in sorted(done):
            self._count(done[i], here=False)

    def _count(self, summary: dict, here: bool = True) -> None:
        st = self.state
        st.chunks_done += 1
        st.records_done += summary["records"]
        st.residues_done += summary["residues"]
        for tier, n in summary["cache"].items():
            st.cache[tier] = st.cache.get(tier, 0) + n
        st.failures_total += len(summary["failures"])
        room = MAX_LISTED_FAILURES - len(st.failures)
        st.failures += [Failure(**f) for f in summary["failures"][: max(0, room)]]
        if here:
            self._residues_here += summary["residues"]
            m.JOB_RESIDUES.inc(summary["residues"])
            for tier, n in summary["cache"].items():
                m.JOB_RECORDS.labels(tier).inc(n)
            m.JOB_RECORDS.labels("failed").inc(len(summary["failures"]))

    async def _save(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._written < STATE_EVERY_S:
            return
        self._written = now
        st = self.state
        elapsed = now - self._t0
        rate = self._residues_here / elapsed if elapsed > 0 and self._residues_here else None
        st.residues_per_s = round(rate, 1) if rate else None
        left = self.spec.residues - st.residues_done
        st.eta_s = round(left / rate, 1) if rate and not st.status.ended else None
        st.waiting, st.updated_at = self.waiting, time.time()
        await self.store.awrite_json(self._path("state.json"), st.to_json())

    async def _finish(self) -> JobStatus:
        st, spec = self.state, self.spec
        if not st.records_done:
            st.error = "no record could be embedded (see failures)"
            st.error_code = "all_records_failed"
            return await self._end(JobStatus.failed)
        st.result_bytes = await asyncio.to_thread(
            assemble,
            self.store,
            self.dir,
            spec.chunks,
            self.pooled,
            spec.dimensions,
            spec.dtype,
            st.records_done,
        )
        return await self._end(JobStatus.succeeded)

    async def _end(self, status: JobStatus) -> JobStatus:
        """Record the end; a cancelled job keeps nothing half-done, a finished one drops the
        chunk files it was assembled from."""
        for folder in ("inputs", "chunks"):
            await self.store.aremove(self._path(folder))
        self.state.status, self.state.ended_at = status, time.time()
        self.waiting = None
        await self._save(force=True)
        m.JOBS.labels(status.value).inc()
        log.info("job ended", extra={"job": self.spec.id, "status": status.value})
        return status
