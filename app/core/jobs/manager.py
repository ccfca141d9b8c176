"""Bulk jobs as the API serves them: create (intake), read, list, cancel, open the result — and,
in the background, drive the jobs nobody drives (new ones, or those whose driver died) and
delete ended jobs past their retention.

Every API process runs the same loop over the store's ``_active`` folder; a lease decides which
one drives each job, so any replica answers for any job, and a job outlives the process that
accepted it. (A job's whole life as the API sees it is here, hence the length.)
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass

from app import metrics as m
from app.core.errors import APIError
from app.core.jobs.intake import Intake, IntakeLimits
from app.core.jobs.leases import Leases, LocalLeases
from app.core.jobs.model import JobOptions, JobSpec, JobState, JobStatus, new_job_id
from app.core.jobs.results import FORMATS
from app.core.jobs.runner import JobContext, JobRunner, JobStopped
from app.core.query import check_options
from app.core.service import EmbeddingService
from app.core.store import ResultStore
from models.sequences import Pooling

log = logging.getLogger(__name__)

#: Records per chunk at most (a chunk is also bounded by job_chunk_residues).
CHUNK_RECORDS = 1024
#: A driver that crashes (not a lost lease) this many times in a row fails its job.
MAX_CRASHES = 3
#: How long cancel waits for the job's driver to stop before answering.
CANCEL_WAIT_S = 10.0


@dataclass(slots=True)
class JobView:
    """A job as a client sees it."""

    spec: JobSpec
    state: JobState


@dataclass(slots=True)
class ResultFile:
    """Where a finished job's result is, for streaming it out."""

    path: str
    size: int
    media_type: str
    filename: str


class JobManager:
    """Jobs of one API process (either mode)."""

    def __init__(self, service: EmbeddingService, store: ResultStore, leases: Leases) -> None:
        s = service.settings
        self.service, self.store, self.leases, self.settings = service, store, leases, s
        self.ctx = JobContext(service, store, leases, s.job_lease_s, s.job_max_inflight)
        self._running: dict[str, asyncio.Task] = {}
        self._crashes: dict[str, int] = {}
        self._loop: asyncio.Task | None = None
        self._swept = 0.0

    @classmethod
    def create(cls, service: EmbeddingService) -> JobManager:
        """The store the settings name, with the service's leases (Redis leases in distributed
        mode, set up by app.bootstrap)."""
        s = service.settings
        store = ResultStore(s.job_store or str(s.data_dir / "jobs"))
        return cls(service, store, service.job_leases or LocalLeases(s.job_lease_s))

    # -- lifecycle ------------------------------------------------------------------------------
    async def start(self) -> None:
        self._loop = asyncio.create_task(self._supervise(), name="rdserve-jobs")

    async def stop(self) -> None:
        """Stop driving (jobs stay active: another process, or this one restarted, resumes)."""
        tasks = [t for t in (self._loop, *self._running.values()) if t is not None]
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(BaseException):
                await t

    # -- create ---------------------------------------------------------------------------------
    def _limits(self, opt: JobOptions, k: int) -> IntakeLimits:
        s, art = self.settings, self.service.artifact
        residues = min(s.job_chunk_residues, s.max_residues)
        if opt.pooling == Pooling.per_residue:  # a chunk's answer stays under max_output_bytes
            width = art.dims[art.level_for_dim(k)]
            per_residue = max(4 * width, k * (2 if opt.dtype == "float16" else 4))
            residues = max(1, min(residues, s.max_output_bytes // per_residue))
        return IntakeLimits(
            max_records=s.job_max_records,
            max_residues=s.job_max_residues,
            max_bytes=s.job_max_bytes,
            chunk_residues=residues,
            chunk_records=min(CHUNK_RECORDS, s.max_sequences),
        )

    async def create_from_upload(
        self, owner: str, opt: JobOptions, body: AsyncIterator[bytes]
    ) -> JobView:
        """A job from a FASTA upload (plain or gzip), read as it streams in."""

        async def fill(intake: Intake) -> None:
            async for piece in body:
                if piece:
                    await intake.feed(piece)

        return await self._create(owner, opt, fill, fasta=True)

    async def create_from_list(
        self, owner: str, opt: JobOptions, inputs: Sequence[str], ids: Sequence[str] | None
    ) -> JobView:
        """A job from a JSON body's sequences (ids default to their indices)."""
        if ids is not None and len(ids) != len(inputs):
            raise APIError(
                400,
                f"ids has {len(ids)} entries but input has {len(inputs)}",
                param="ids",
                code="ids_length_mismatch",
            )

        async def fill(intake: Intake) -> None:
            names = ids if ids is not None else [str(i) for i in range(len(inputs))]
            await intake.add_records(zip(names, inputs, strict=True))

        return await self._create(owner, opt, fill, fasta=False)

    async def _create(
        self, owner: str, opt: JobOptions, fill: Callable[[Intake], Awaitable[None]], fasta: bool
    ) -> JobView:
        # 400 before any byte of the body is read when an option is invalid.
        k = check_options(opt.dimensions, opt.pooling, self.service.artifact, self.service.family)
        art = self.service.artifact
        job_id = new_job_id()
        job_dir = f"{owner}/{job_id}"
        intake = Intake(self.store, job_dir, opt, self.service.family, self._limits(opt, k), fasta)
        try:
            await fill(intake)
            got = await intake.finish()
        except BaseException:
            await self.store.aremove(self.store.path(job_dir))
            raise
        spec = JobSpec(
            id=job_id,
            owner=owner,
            created_at=time.time(),
            source="fasta" if fasta else "json",
            model=art.name,
            family=art.family,
            artifact_sha256=art.sha256,
            dimensions=k,
            pooling=opt.pooling,
            policy=opt.policy,
            normalize=opt.normalize,
            dtype=opt.dtype,
            on_invalid=opt.on_invalid,
            records=got.records,
            residues=got.residues,
            chunks=got.chunks,
            skipped=got.skipped,
            input_bytes=got.input_bytes,
        )
        state = JobState()
        await self.store.awrite_json(self.store.path(job_dir, "job.json"), spec.to_json())
        await self.store.awrite_json(self.store.path(job_dir, "state.json"), state.to_json())
        await self.store.atouch(self.store.path("_active", f"{owner}.{job_id}"))
        log.info(
            "job accepted",
            extra={"job": job_id, "records": spec.records, "residues": spec.residues},
        )
        if await self.leases.acquire(job_id):  # start at once here (the loop would, later)
            self._drive(job_dir, spec)
        return JobView(spec, state)

    # -- read -----------------------------------------------------------------------------------
    async def get(self, owner: str, job_id: str) -> JobView:
        """The job, if this owner has one by that id (404 otherwise: other keys' jobs are not
        even said to exist)."""
        job_dir = self.store.path(owner, job_id)
        spec = (
            None
            if "/" in job_id or job_id.startswith(".")
            else (await self.store.aread_json(f"{job_dir}/job.json"))
        )
        if spec is None:
            raise APIError(404, f"no job {job_id!r}", param="job_id", code="job_not_found")
        state = await self.store.aread_json(f"{job_dir}/state.json")
        return JobView(JobSpec.from_json(spec), JobState.from_json(state or {"status": "queued"}))

    async def list(self, owner: str, limit: int) -> list[JobView]:
        """This owner's jobs, newest first."""
        names = await self.store.anames(self.store.path(owner))
        out = []
        for job_id in reversed(names):
            if len(out) >= limit:
                break
            with contextlib.suppress(APIError):  # one being deleted right now
                out.append(await self.get(owner, job_id))
        return out

    async def result(self, owner: str, job_id: str, fmt: str) -> ResultFile:
        view = await self.get(owner, job_id)
        if view.state.status != JobStatus.succeeded:
            raise APIError(
                409,
                f"job {job_id} is {view.state.status.value}: a result exists only once it has "
                "succeeded",
                param="job_id",
                code="job_not_finished",
            )
        if fmt not in FORMATS or (fmt != "npz" and view.spec.pooling == Pooling.per_residue):
            raise APIError(
                400,
                f"format {fmt!r}: choose npz"
                + (", npy or ids" if fmt not in FORMATS else "")
                + " (per-residue results are .npz only: one L×k array per id)",
                param="format",
                code="unsupported_format",
            )
        name, media = FORMATS[fmt]
        path = self.store.path(owner, job_id, name)
        size = await self.store.asize(path)
        return ResultFile(path, size, media, f"{job_id}.{name.split('.', 1)[1]}")

    # -- cancel ---------------------------------------------------------------------------------
    async def cancel(self, owner: str, job_id: str) -> JobView:
        """Ask the job to stop (its chunks in flight are withdrawn; nothing partial is kept);
        waits a few seconds for that, then answers its state. An ended job is deleted."""
        view = await self.get(owner, job_id)
        if view.state.status.ended:  # nothing to stop: delete it, result and all
            await self.store.aremove(self.store.path(owner, job_id))
            for marker in await self.store.anames(self.store.path("_done")):
                if marker.endswith(f".{owner}.{job_id}"):
                    await self.store.aremove(self.store.path("_done", marker))
            return view
        await self.store.atouch(self.store.path(owner, job_id, "cancel"))
        if job_id not in self._running and await self.leases.acquire(job_id):
            self._drive(f"{owner}/{job_id}", view.spec)  # nobody drives it: end it here
        deadline = time.monotonic() + CANCEL_WAIT_S
        while not view.state.status.ended and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
            view = await self.get(owner, job_id)
        return view

    # -- driving --------------------------------------------------------------------------------
    def _drive(self, job_dir: str, spec: JobSpec) -> None:
        self._running[spec.id] = asyncio.create_task(self._run(job_dir, spec), name=spec.id)

    async def _run(self, job_dir: str, spec: JobSpec) -> None:
        m.JOBS_RUNNING.inc()
        try:
            status = await JobRunner(self.ctx, job_dir, spec).run()
            if status.ended:
                await self._ended(spec)
            self._crashes.pop(spec.id, None)
        except JobStopped:
            pass
        except asyncio.CancelledError:
            raise
        except Exception as e:
            n = self._crashes[spec.id] = self._crashes.get(spec.id, 0) + 1
            log.exception("job driver failed", extra={"job": spec.id, "crashes": n})
            if n >= MAX_CRASHES:
                await self._fail(job_dir, spec, f"internal error: {e}")
        finally:
            m.JOBS_RUNNING.dec()
            self._running.pop(spec.id, None)
            await self.leases.release(spec.id)

    async def _fail(self, job_dir: str, spec: JobSpec, why: str) -> None:
        state = JobState.from_json(
            await self.store.aread_json(self.store.path(job_dir, "state.json"))
            or {"status": "queued"}
        )
        state.status, state.ended_at = JobStatus.failed, time.time()
        state.error, state.error_code = why, "internal"
        await self.store.awrite_json(self.store.path(job_dir, "state.json"), state.to_json())
        m.JOBS.labels("failed").inc()
        await self._ended(spec)

    async def _ended(self, spec: JobSpec) -> None:
        """Move the job from the active list to the ended one (what retention sweeps)."""
        done = self.store.path("_done", f"{int(time.time()):012d}.{spec.owner}.{spec.id}")
        await self.store.atouch(done)
        await self.store.aremove(self.store.path("_active", f"{spec.owner}.{spec.id}"))

    async def _supervise(self) -> None:
        """Pick up active jobs nobody drives; sweep ended ones past their retention."""
        while True:
            try:
                await self._adopt()
                if time.monotonic() - self._swept > self.settings.job_poll_s * 30:
                    self._swept = time.monotonic()
                    await self._sweep()
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 — the store or Redis hiccups: try again
                log.warning("job supervision failed", extra={"error": repr(e)})
            await asyncio.sleep(self.settings.job_poll_s)

    async def _adopt(self) -> None:
        for marker in await self.store.anames(self.store.path("_active")):
            owner, _, job_id = marker.partition(".")
            if job_id in self._running or self._crashes.get(job_id, 0) >= MAX_CRASHES:
                continue
            raw = await self.store.aread_json(self.store.path(owner, job_id, "job.json"))
            if raw is None:
                continue
            spec = JobSpec.from_json(raw)
            # A job is computed with the artifact it was accepted for (a rolling change of
            # artifact leaves it to the processes that still serve that one).
            if spec.artifact_sha256 != self.service.artifact.sha256:
                continue
            if await self.leases.acquire(job_id):
                log.info("driving job", extra={"job": job_id})
                self._drive(f"{owner}/{job_id}", spec)

    async def _sweep(self) -> None:
        cutoff = time.time() - self.settings.job_retention_s
        for marker in await self.store.anames(self.store.path("_done")):
            ended, owner, job_id = marker.split(".", 2)
            if int(ended) > cutoff:
                break  # sorted by end time
            await self.store.aremove(self.store.path(owner, job_id))
            await self.store.aremove(self.store.path("_done", marker))
            log.info("job deleted (retention)", extra={"job": job_id})
