"""API-side job dispatch: the interface, and embedded mode (a worker thread in this process)."""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from app import metrics as m
from app.jobs import Job, JobResult
from app.worker import Worker

log = logging.getLogger(__name__)


class QueueFullError(Exception):
    """Too many queued requests (→ 429)."""


class NoWorkerError(Exception):
    """No worker can take the job (→ 503)."""


class QueueUnavailableError(Exception):
    """The job queue (Redis) cannot be reached (→ 503)."""


@dataclass(frozen=True)
class FleetStatus:
    """Readiness as the API sees it."""

    workers: int  # live workers serving this artifact
    loaded: list[bool]  # per level: resident in at least one worker
    ready: list[bool]  # per level: warmed in at least one worker (a usable prefix)
    error: str | None = None  # fatal worker error, or why the queue is unreachable
    queue_ok: bool = True  # the job queue answers (always, in embedded mode)


class Dispatcher(Protocol):
    """Sends jobs to workers and awaits their results."""

    mode: str  # "embedded" | "distributed"

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    async def submit(self, job: Job, timeout_s: float) -> JobResult:
        """Queue a job and wait for it; raises QueueFullError, NoWorkerError, TimeoutError."""
        ...

    async def status(self) -> FleetStatus: ...

    async def queue_depth(self) -> int: ...


class LocalQueue:
    """Thread-safe job queue between the event loop and the worker thread (a JobSource)."""

    def __init__(self) -> None:
        self._q: queue.Queue[Job] = queue.Queue()
        self._waiting: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Future]] = {}
        self._lock = threading.Lock()

    def put(self, job: Job, loop: asyncio.AbstractEventLoop, fut: asyncio.Future) -> None:
        with self._lock:
            self._waiting[job.id] = (loop, fut)
        self._q.put(job)

    def forget(self, job_id: str) -> None:
        with self._lock:
            self._waiting.pop(job_id, None)

    def outstanding(self) -> int:
        with self._lock:
            return len(self._waiting)

    def take(self, budget: int, wait_s: float) -> list[Job]:
        try:
            first = self._q.get(timeout=0.2)
        except queue.Empty:
            return []
        jobs = [first]
        residues = sum(len(it.seq) for it in first.items)
        deadline = time.monotonic() + wait_s
        while residues < budget:
            remaining = deadline - time.monotonic()
            try:
                job = self._q.get_nowait() if remaining <= 0 else self._q.get(timeout=remaining)
            except queue.Empty:
                break
            jobs.append(job)
            residues += sum(len(it.seq) for it in job.items)
        return jobs

    def reply(self, job: Job, result: JobResult) -> None:
        with self._lock:
            waiter = self._waiting.pop(job.id, None)
        if waiter is None:
            return  # the request gave up (timeout); drop the result
        loop, fut = waiter

        def _set() -> None:
            if not fut.done():
                fut.set_result(result)

        loop.call_soon_threadsafe(_set)


class EmbeddedDispatcher:
    """Embedded mode: the worker runs in a thread of this process, off the event loop."""

    mode = "embedded"

    def __init__(
        self,
        worker: Worker,
        source: LocalQueue,
        max_queue: int,
        warmup: bool = True,
        on_fatal: Callable[[Exception], None] | None = None,
    ) -> None:
        self.worker = worker
        self.source = source
        self.max_queue = max_queue
        self.warmup = warmup
        self.on_fatal = on_fatal  # e.g. stop the server when weights cannot be obtained
        self._thread: threading.Thread | None = None

    async def start(self) -> None:
        def main() -> None:
            try:
                if self.warmup:
                    self.worker.warmup()
                else:
                    for i in range(self.worker.state.levels):
                        self.worker.state.ready[i] = True
            except Exception as e:
                log.exception("warm-up failed")
                self.worker.state.error = str(e)
                if self.on_fatal is not None:
                    self.on_fatal(e)
                return
            self.worker.run()

        self._thread = threading.Thread(target=main, name="rdserve-worker", daemon=True)
        self._thread.start()

    async def stop(self) -> None:
        self.worker.stop()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, 10)

    async def queue_depth(self) -> int:
        return self.source.outstanding()

    async def status(self) -> FleetStatus:
        st = self.worker.state
        alive = self._thread is not None and self._thread.is_alive()
        return FleetStatus(int(alive), list(st.loaded), list(st.ready), st.error)

    async def submit(self, job: Job, timeout_s: float) -> JobResult:
        if self._thread is None or not self._thread.is_alive():
            raise NoWorkerError(self.worker.state.error or "the worker is not running")
        if self.source.outstanding() >= self.max_queue:
            raise QueueFullError()
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[JobResult] = loop.create_future()
        self.source.put(job, loop, fut)
        m.QUEUE_DEPTH.set(self.source.outstanding())
        try:
            return await asyncio.wait_for(fut, timeout_s)
        finally:
            self.source.forget(job.id)
            m.QUEUE_DEPTH.set(self.source.outstanding())
