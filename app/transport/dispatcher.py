"""API side of distributed mode: queue tasks on the stream, resolve replies by task id, and
watch the fleet's heartbeats.

Failures, and what recovers from them:
  * two workers computed the same task: the first reply is delivered, the other discarded;
  * Redis restarts and loses the streams (no persistence): the API notices the new server
    (its run_id) and queues its in-flight tasks again;
  * Redis is unreachable: new requests get 503 (queue_unavailable), in-flight ones 503 once no
    worker has been seen for a few seconds; everything reconnects on its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass

import redis.asyncio as aioredis

from app import metrics as m
from app.core.dispatch import FleetStatus, NoWorkerError, QueueFullError, QueueUnavailableError
from app.core.tasks import Task, TaskResult
from app.transport.keys import new_reply_key, tasks_key, text, worker_key
from app.transport.wire import result_from_wire, task_to_wire

log = logging.getLogger(__name__)

#: XADD only while the stream is shorter than ARGV[1]; returns {added 0/1, length, entry id}.
BOUNDED_XADD = """
local n = redis.call('XLEN', KEYS[1])
if n >= tonumber(ARGV[1]) then return {0, n, ''} end
local id = redis.call('XADD', KEYS[1], '*', 'd', ARGV[2])
return {1, n + 1, id}
"""
#: In-flight requests give up (503) after the fleet has shown no live worker for this long.
NO_WORKER_GRACE_S = 5.0


@dataclass(slots=True)
class _InFlight:
    """A task the API queued and still waits for."""

    task: Task  # what was queued (kept to queue it again if Redis loses it)
    entry: str  # its stream entry id
    reply: asyncio.Future[TaskResult]  # resolved by the reply reader


class RedisDispatcher:
    """API side of distributed mode: XADD tasks, one reader task resolves replies by task id."""

    mode = "distributed"

    def __init__(
        self, client: aioredis.Redis, prefix: str, artifact_sha: str, n_levels: int, max_queue: int
    ) -> None:
        self.r = client
        self.prefix = prefix
        self.stream = tasks_key(prefix)
        self.artifact_sha = artifact_sha
        self.n_levels = n_levels
        self.max_queue = max_queue
        self.reply_key = new_reply_key(prefix)
        self._inflight: dict[str, _InFlight] = {}
        self._delivered: OrderedDict[str, None] = OrderedDict()  # recent ids: spot duplicates
        self._reader: asyncio.Task | None = None
        self._status: tuple[float, FleetStatus] | None = None
        self._depth = 0
        self._run_id: str | None = None  # identity of the Redis server our tasks are queued in
        self._enqueue = client.register_script(BOUNDED_XADD)

    async def start(self) -> None:
        self._reader = asyncio.create_task(self._read_replies(), name="rdserve-replies")

    async def stop(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
        with contextlib.suppress(Exception):
            await self.r.delete(self.reply_key)

    # -- replies --------------------------------------------------------------------------------
    async def _read_replies(self) -> None:
        last = "0-0"
        checked = 0.0
        while True:
            try:
                if time.monotonic() - checked >= 1.0:
                    checked = time.monotonic()
                    if await self._server_restarted():
                        last = "0-0"  # the reply stream was recreated
                        await self._requeue_lost()
                resp = await self.r.xread({self.reply_key: last}, count=100, block=1000)
                ids = []
                for _, msgs in resp or []:
                    for msg_id, fields in msgs:
                        last = msg_id
                        ids.append(msg_id)
                        self._deliver(result_from_wire(fields[b"d"]))
                if ids:
                    await self.r.xdel(self.reply_key, *ids)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 — keep listening through Redis hiccups
                log.warning("reply reader error", extra={"error": repr(e)})
                await asyncio.sleep(0.5)

    def _deliver(self, res: TaskResult) -> None:
        """Resolve the waiting request, once: a second reply (two workers computed the task) or a
        reply to a request that has ended is discarded."""
        flight = self._inflight.get(res.id)
        if flight is None or flight.reply.done():
            reason = "duplicate" if res.id in self._delivered else "expired"
            m.REPLIES_DISCARDED.labels(reason).inc()
            return
        flight.reply.set_result(res)
        self._delivered[res.id] = None
        if len(self._delivered) > 10_000:
            self._delivered.popitem(last=False)

    async def _server_restarted(self) -> bool:
        """True when Redis is a different server than before (restart or failover): its run_id
        changed, so streams without persistence, our queued tasks among them, are gone."""
        run_id = (await self.r.info("server"))["run_id"]
        restarted = self._run_id is not None and run_id != self._run_id
        self._run_id = run_id
        if restarted:
            log.warning(
                "redis restarted; checking in-flight tasks", extra={"tasks": len(self._inflight)}
            )
        return restarted

    async def _requeue_lost(self) -> None:
        """Queue again every in-flight task whose stream entry no longer exists."""
        now = time.time()
        for f in list(self._inflight.values()):
            if f.reply.done() or f.task.deadline < now or not f.entry:  # "": being queued now
                continue
            if not await self.r.xrange(self.stream, f.entry, f.entry):
                f.entry = text(await self.r.xadd(self.stream, {"d": task_to_wire(f.task)}))
                m.TASKS_RESUBMITTED.inc()
                log.warning("task lost by redis; queued again", extra={"task": f.task.id})

    # -- fleet ----------------------------------------------------------------------------------
    async def queue_depth(self) -> int:
        """Tasks in the stream now (asked at every scrape: the value seen at the last enqueue
        would stay high after a burst until the next request)."""
        try:
            self._depth = int(await self.r.xlen(self.stream))
        except Exception as e:  # noqa: BLE001 — a scrape must not fail on a Redis hiccup
            log.warning("queue length unavailable", extra={"error": repr(e)})
        return self._depth

    async def status(self) -> FleetStatus:
        """Aggregate live heartbeats of workers serving this artifact (cached for 1 s)."""
        now = time.monotonic()
        if self._status is not None and now - self._status[0] < 1.0:
            return self._status[1]
        loaded = [False] * self.n_levels
        ready = [False] * self.n_levels
        workers, errors = 0, []
        try:
            keys = [
                k async for k in self.r.scan_iter(match=worker_key(self.prefix, "*"), count=100)
            ]
            beats = await self.r.mget(keys) if keys else []
        except Exception as e:  # noqa: BLE001
            st = FleetStatus(0, loaded, ready, f"redis unavailable: {e}", queue_ok=False)
            self._status = (now, st)
            m.WORKERS_LIVE.set(0)
            return st
        for raw in beats:
            if raw is None:
                continue
            hb = json.loads(raw)
            if hb.get("artifact") != self.artifact_sha:
                continue
            if hb.get("error"):
                errors.append(f"{hb['id']}: {hb['error']}")
            if not hb.get("running"):
                continue
            workers += 1
            loaded = [a or b for a, b in zip(loaded, hb["loaded"], strict=True)]
            ready = [a or b for a, b in zip(ready, hb["ready"], strict=True)]
        st = FleetStatus(workers, loaded, ready, "; ".join(errors) or None)
        m.WORKERS_LIVE.set(workers)
        self._status = (now, st)
        return st

    # -- tasks ----------------------------------------------------------------------------------
    async def submit(self, task: Task, timeout_s: float) -> TaskResult:
        st = await self.status()
        if not st.queue_ok:
            raise QueueUnavailableError(st.error or "redis unavailable")
        if st.workers == 0:
            raise NoWorkerError(st.error or "no live worker serves this artifact")
        task.reply_to = self.reply_key
        flight = _InFlight(task, "", asyncio.get_running_loop().create_future())
        # Registered before the XADD: a worker may answer before the XADD's own reply reaches
        # us, and the reader must then find the request (or it discards the answer).
        self._inflight[task.id] = flight
        try:
            try:
                # One round trip: the length check and the XADD happen atomically in Redis.
                added, self._depth, entry = await self._enqueue(
                    keys=[self.stream], args=[self.max_queue, task_to_wire(task)]
                )
            except Exception as e:  # noqa: BLE001 — any Redis failure here means "not queued"
                raise QueueUnavailableError(f"redis unavailable: {e}") from None
            m.QUEUE_DEPTH.set(self._depth)
            if not added:
                raise QueueFullError()
            flight.entry = text(entry)
        except BaseException:
            self._inflight.pop(task.id, None)
            raise
        try:
            return await self._wait(flight, timeout_s)
        except BaseException:
            # The request ends without an answer (timeout, no worker, client gone): delete the
            # task so that no worker starts it for nobody (one already computing it finishes).
            with contextlib.suppress(Exception):
                await self.r.xdel(self.stream, flight.entry)
            raise
        finally:
            self._inflight.pop(task.id, None)

    async def _wait(self, flight: _InFlight, timeout_s: float) -> TaskResult:
        """The reply; NoWorkerError once no worker has been alive for NO_WORKER_GRACE_S (the one
        computing it died and nobody can take it over), TimeoutError after timeout_s."""
        deadline = time.monotonic() + timeout_s
        no_worker_since: float | None = None
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError
            done, _ = await asyncio.wait({flight.reply}, timeout=min(1.0, left))
            if done:
                return flight.reply.result()
            st = await self.status()
            if st.workers:
                no_worker_since = None
                continue
            no_worker_since = no_worker_since or time.monotonic()
            if time.monotonic() - no_worker_since >= NO_WORKER_GRACE_S:
                raise NoWorkerError(
                    "no worker has been alive for "
                    f"{NO_WORKER_GRACE_S:g} s while this request waited"
                    + (f" ({st.error})" if st.error else "")
                )
