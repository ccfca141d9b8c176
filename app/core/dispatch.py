"""API-side task dispatch: the interface, and embedded mode (a worker thread in this process).

Distributed mode's dispatcher is ``app.transport.dispatcher.RedisDispatcher``.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from app import metrics as m
from app.core.tasks import Task, TaskResult
from app.core.worker import Worker, gather

log = logging.getLogger(__name__)


class DispatchError(Exception):
    """A task could not be handed to a worker; says how the request is answered."""

    status = 503  # HTTP status of the answer
    type = "server_error"  # OpenAI-style error type
    code = "dispatch_failed"  # machine-readable reason
    retry_after_s = 5  # what the client is told to wait
    what = "the task could not be dispatched"  # the message's lead

    def __init__(self, detail: str | None = None) -> None:
        super().__init__(f"{self.what}: {detail}" if detail else self.what)


class QueueFullError(DispatchError):
    """Too many queued requests (→ 429)."""

    status, type, code, retry_after_s = 429, "rate_limit_error", "queue_full", 1
    what = "the request queue is full; retry later"


class NoWorkerError(DispatchError):
    """No worker can take the task (→ 503)."""

    code, what = "no_worker", "no worker available"


class QueueUnavailableError(DispatchError):
    """The task queue (Redis) cannot be reached (→ 503)."""

    code, what = "queue_unavailable", "the task queue is unavailable"


class ShuttingDownError(DispatchError):
    """The API is shutting down and its shutdown window ended before the answer came (→ 503);
    another instance can serve the retry."""

    code, retry_after_s = "shutting_down", 1
    what = "the server is shutting down and this request did not finish in time; retry"


class ReplyLostError(DispatchError):
    """A worker computed the task but its result never reached this API (→ 503): it could not
    be written to Redis (e.g. at maxmemory), or was lost there."""

    code, what = "result_undeliverable", "the result could not be delivered"


def drain_error(window_s: float) -> ShuttingDownError:
    return ShuttingDownError(f"shutdown window of {window_s:g} s ended")


@dataclass(frozen=True)
class FleetStatus:
    """Readiness as the API sees it."""

    workers: int  # live workers serving this artifact
    loaded: list[bool]  # per level: resident in at least one worker
    ready: list[bool]  # per level: warmed in at least one worker (a usable prefix)
    error: str | None = None  # fatal worker error, or why the queue is unreachable
    queue_ok: bool = True  # the task queue answers (always, in embedded mode)
    starting: int = 0  # workers of this artifact still loading (heartbeat up, loop not yet)


class Dispatcher(Protocol):
    """Sends tasks to workers and awaits their results."""

    mode: str  # "embedded" | "distributed"

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    async def submit(self, task: Task, timeout_s: float) -> TaskResult:
        """Queue a task and wait for it; raises QueueFullError, NoWorkerError, TimeoutError."""
        ...

    async def status(self) -> FleetStatus: ...

    async def queue_depth(self) -> int:
        """Interactive tasks queued or in progress now; also refreshes the queue gauges (depth,
        lag and pending of the interactive and bulk queues)."""
        ...

    def drain(self, cut_at: float, window_s: float) -> None:
        """The server is shutting down: requests still waiting at ``cut_at`` (monotonic time)
        give up with ShuttingDownError (and withdraw their tasks); new ones are refused then."""
        ...


class Drain:
    """When a shutting-down API stops waiting for answers (shared by both dispatchers)."""

    def __init__(self) -> None:
        self.cut_at: float | None = None  # monotonic time; None: not shutting down
        self.window_s = 0.0

    def begin(self, cut_at: float, window_s: float) -> None:
        self.cut_at, self.window_s = cut_at, window_s

    def next_wait(self, deadline: float) -> float:
        """Seconds a request with this (monotonic) deadline waits before looking again, at most
        1 s; raises ShuttingDownError past the shutdown cut, TimeoutError past the deadline."""
        now = time.monotonic()
        if self.cut_at is not None and now >= self.cut_at:
            raise drain_error(self.window_s)
        if now >= deadline:
            raise TimeoutError
        end = deadline if self.cut_at is None else min(deadline, self.cut_at)
        return min(1.0, end - now)


class LocalQueue:
    """Thread-safe task queue between the event loop and the worker thread (a TaskSource):
    interactive tasks first, bulk-job chunks only when none is queued."""

    def __init__(self) -> None:
        self._cv = threading.Condition()
        self._tasks: deque[Task] = deque()  # interactive
        self._bulk: deque[Task] = deque()  # bulk-job chunks
        # task id → (loop, future, bulk) of every request still waiting
        self._waiting: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Future, bool]] = {}

    def put(self, task: Task, loop: asyncio.AbstractEventLoop, fut: asyncio.Future) -> None:
        with self._cv:
            self._waiting[task.id] = (loop, fut, task.bulk)
            (self._bulk if task.bulk else self._tasks).append(task)
            self._cv.notify()

    def forget(self, task_id: str) -> None:
        with self._cv:
            self._waiting.pop(task_id, None)

    def outstanding(self, bulk: bool = False) -> int:
        """Interactive (or, with ``bulk``, bulk) tasks queued or in progress."""
        with self._cv:
            return sum(1 for *_, b in self._waiting.values() if b == bulk)

    def queued(self) -> tuple[int, int]:
        """Interactive and bulk tasks not yet taken by the worker."""
        with self._cv:
            return len(self._tasks), len(self._bulk)

    def _pop(self, timeout_s: float, bulk: bool = True) -> list[Task]:
        """The next task within timeout_s (0: only one queued now): interactive first."""
        with self._cv:
            if not self._cv.wait_for(lambda: self._tasks or (bulk and self._bulk), timeout_s):
                return []
            return [self._tasks.popleft() if self._tasks else self._bulk.popleft()]

    def take(self, budget: int, wait_s: float) -> list[Task]:
        return gather(self._pop(0.2), self._pop, budget, wait_s)

    def urgent(self, budget: int) -> list[Task]:
        return gather(self._pop(0, bulk=False), lambda t: self._pop(0, bulk=False), budget, 0)

    def withdrawn(self, tasks: list[Task]) -> set[str]:
        with self._cv:
            return {t.id for t in tasks if t.id not in self._waiting}

    def skip(self, task: Task) -> None:
        return  # nothing to acknowledge in-process

    def reply(self, task: Task, result: TaskResult) -> None:
        with self._cv:
            waiter = self._waiting.pop(task.id, None)
        if waiter is None:
            return  # the request gave up (timeout); drop the result
        loop, fut, _ = waiter

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
        self._drain = Drain()

    def drain(self, cut_at: float, window_s: float) -> None:
        self._drain.begin(cut_at, window_s)

    async def start(self) -> None:
        def main() -> None:
            try:
                self.worker.prepare(self.warmup)
            except Exception as e:
                log.exception("warm-up failed")
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
        depth, bulk = self.source.outstanding(), self.source.outstanding(bulk=True)
        lag, bulk_lag = self.source.queued()
        m.set_queue("tasks", depth, lag)
        m.set_queue("bulk", bulk, bulk_lag)
        return depth

    async def status(self) -> FleetStatus:
        st = self.worker.state
        alive = self._thread is not None and self._thread.is_alive()
        return FleetStatus(int(alive), list(st.loaded), list(st.ready), st.error)

    async def submit(self, task: Task, timeout_s: float) -> TaskResult:
        if self._thread is None or not self._thread.is_alive():
            raise NoWorkerError(self.worker.state.error or "the worker is not running")
        # Bulk chunks are bounded by their jobs' windows; only interactive requests meet 429.
        if not task.bulk and self.source.outstanding() >= self.max_queue:
            raise QueueFullError()
        deadline = time.monotonic() + timeout_s
        self._drain.next_wait(deadline)  # past the shutdown cut: refused
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[TaskResult] = loop.create_future()
        self.source.put(task, loop, fut)
        self._gauge()
        try:
            while True:
                done, _ = await asyncio.wait({fut}, timeout=self._drain.next_wait(deadline))
                if done:
                    return fut.result()
        finally:
            self.source.forget(task.id)
            self._gauge()

    def _gauge(self) -> None:
        m.QUEUE_DEPTH.set(self.source.outstanding())
        m.BULK_QUEUE_DEPTH.set(self.source.outstanding(bulk=True))
