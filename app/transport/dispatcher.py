"""API side of distributed mode: queue tasks on the artifact's streams, resolve replies by task
id (the fleet's heartbeats are read by ``app.transport.fleet``). Longer than most modules: a
request's path and every way it can fail (below) belong together.

Failures, and what recovers from them:
  * two workers computed the same task: the first reply is delivered, the other discarded;
  * Redis restarts and loses the streams (no persistence): the API notices the new server
    (its run_id, ``app.transport.fleet``) and queues its in-flight tasks again;
  * Redis is unreachable: new requests get 503 (queue_unavailable), in-flight ones 503 once no
    worker has been seen for a few seconds; everything reconnects on its own;
  * a result never arrives although its task is gone from the stream (Redis refused or lost the
    reply): the request fails with 503 within about two seconds instead of at its deadline;
  * the API shuts down: requests still waiting when the shutdown window ends get 503 and their
    tasks are withdrawn (deleted, and marked so that a worker holding one drops it).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass

from app import metrics as m
from app.core.dispatch import (
    Drain,
    FleetStatus,
    NoWorkerError,
    QueueFullError,
    QueueUnavailableError,
    ReplyLostError,
)
from app.core.tasks import Task, TaskResult
from app.transport.connect import AsyncClient, server_info
from app.transport.fleet import FleetView
from app.transport.keys import (
    GROUP,
    REPLY_TTL_S,
    bulk_key,
    cancelled_key,
    new_reply_key,
    tasks_key,
    text,
)
from app.transport.wire import result_from_wire, task_to_wire

log = logging.getLogger(__name__)

#: XADD only while the stream is shorter than ARGV[1]; returns {added 0/1, length, entry id}.
BOUNDED_XADD = """
local n = redis.call('XLEN', KEYS[1])
if n >= tonumber(ARGV[1]) then return {0, n, ''} end
local id = redis.call('XADD', KEYS[1], '*', 'd', ARGV[2])
return {1, n + 1, id}
"""
#: Most bulk-job chunks queued per artifact (each job keeps only a few in flight).
MAX_BULK_QUEUE = 100_000
#: In-flight requests give up (503) after the fleet has shown no live worker for this long.
NO_WORKER_GRACE_S = 5.0
#: A request waiting this long has its task entry checked: gone with no reply (at two checks a
#: second apart, the reply reader running in between) means its result was lost.
LOST_CHECK_AFTER_S = 2.0
#: Eviction policies that can drop heartbeats, task streams and reply streams.
EVICTING = ("allkeys-", "volatile-")


@dataclass(slots=True)
class _InFlight:
    """A task the API queued and still waits for."""

    task: Task  # what was queued (kept to queue it again if Redis loses it)
    stream: str  # the stream it was queued on (tasks, or bulk for a job's chunk)
    entry: str  # its stream entry id
    reply: asyncio.Future[TaskResult]  # resolved by the reply reader
    since: float  # monotonic time it was queued
    missing: bool = False  # its entry was gone at the last lost-reply check
    requeued: bool = False  # queued again after a Redis restart (two copies may be computed)


class RedisDispatcher:
    """API side of distributed mode: XADD tasks, one reader task resolves replies by task id."""

    mode = "distributed"

    def __init__(
        self,
        client: AsyncClient,
        prefix: str,
        artifact_sha: str,
        n_levels: int,
        max_queue: int,
        reply_ttl_s: float = REPLY_TTL_S,
        wake_s: float = 0.0,
    ) -> None:
        self.r = client
        self.prefix = prefix
        self.stream = tasks_key(prefix, artifact_sha)
        self.bulk_stream = bulk_key(prefix, artifact_sha)
        self.artifact_sha = artifact_sha
        self.n_levels = n_levels
        self.max_queue = max_queue
        self.reply_key = new_reply_key(prefix)
        self.reply_ttl_s = reply_ttl_s  # our reply stream outlives us by this much at most
        # Scale to zero: with no live worker a task is queued anyway (its backlog is what wakes
        # the autoscaler) and waits this long for a worker to come up; 0 refuses it at once.
        self.wake_s = wake_s
        self._inflight: dict[str, _InFlight] = {}
        self._delivered: OrderedDict[str, None] = OrderedDict()  # recent ids: spot duplicates
        self._reader: asyncio.Task | None = None
        self._depth = 0
        self.fleet = FleetView(client, prefix, artifact_sha, n_levels, self.stream)
        self._drain = Drain()
        self._enqueue = client.register_script(BOUNDED_XADD)

    async def start(self) -> None:
        log.info("reply stream", extra={"key": self.reply_key})
        await self._warn_if_evicting()
        self._reader = asyncio.create_task(self._read_replies(), name="rdserve-replies")

    async def stop(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
        with contextlib.suppress(Exception):
            await self.r.delete(self.reply_key)
        with contextlib.suppress(Exception):  # also the job leases' client (app.bootstrap)
            await self.r.aclose()

    def drain(self, cut_at: float, window_s: float) -> None:
        self._drain.begin(cut_at, window_s)

    async def _warn_if_evicting(self) -> None:
        """Say so at start when the queue Redis may evict keys: heartbeats and streams would
        vanish under memory pressure (false 503s, lost replies)."""
        try:
            policy = (await server_info(self.r, self.stream, "memory")).get("maxmemory_policy", "")
        except Exception:  # noqa: BLE001 — Redis not up yet: nothing to say
            return
        if str(policy).startswith(EVICTING):
            log.warning(
                "the queue Redis evicts keys under memory pressure; use maxmemory-policy "
                "noeviction there and put the cache on its own LRU Redis (cache_redis_url)",
                extra={"maxmemory_policy": policy},
            )

    # -- replies --------------------------------------------------------------------------------
    async def _read_replies(self) -> None:
        last = "0-0"
        checked = renewed = 0.0
        handled = 0  # restarts whose lost tasks were queued again
        while True:
            try:
                if time.monotonic() - renewed >= self.reply_ttl_s / 4:
                    # Our reply stream lives while we do: a dead API's expires (with nothing
                    # else of it; its tasks' marks expire with their deadlines).
                    renewed = time.monotonic()
                    await self.r.expire(self.reply_key, max(1, int(self.reply_ttl_s)))
                if time.monotonic() - checked >= 1.0:
                    checked = time.monotonic()
                    # The fleet every second, requests or not: after a Redis restart the workers
                    # seen just before are known (and the restart itself, from the run_id).
                    await self.fleet.refresh(len(self._inflight))
                    if self.fleet.restarts != handled:
                        handled = self.fleet.restarts
                        last = "0-0"  # the reply stream was recreated
                        await self._requeue_lost()
                    else:
                        await self._fail_lost_replies()
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

    async def _requeue_lost(self) -> None:
        """Queue again every in-flight task whose stream entry no longer exists."""
        now = time.time()
        for f in list(self._inflight.values()):
            if f.reply.done() or f.task.deadline < now or not f.entry:  # "": being queued now
                continue
            if not await self.r.xrange(f.stream, f.entry, f.entry):
                f.entry = text(await self.r.xadd(f.stream, {"d": task_to_wire(f.task)}))
                f.missing, f.requeued = False, True
                m.TASKS_RESUBMITTED.inc()
                log.warning("task lost by redis; queued again", extra={"task": f.task.id})

    async def _fail_lost_replies(self) -> None:
        """Fail requests whose task entry is gone (a worker answered and deleted it, or dropped
        it) while no reply came, at two consecutive checks: the result will never arrive."""
        now = time.monotonic()
        flights = [
            f
            for f in self._inflight.values()
            if f.entry and not f.reply.done() and now - f.since >= LOST_CHECK_AFTER_S
        ]
        if not flights:
            return
        pipe = self.r.pipeline(transaction=False)
        for f in flights:
            pipe.xrange(f.stream, f.entry, f.entry)
        for f, found in zip(flights, await pipe.execute(), strict=True):
            if found or f.reply.done():
                f.missing = False
            elif not f.missing:
                f.missing = True  # the reply may still be in the reply stream: read it first
            else:
                m.REPLIES_LOST.inc()
                log.error("task gone without a reply", extra={"task": f.task.id})
                f.reply.set_exception(
                    ReplyLostError(
                        "the task was answered or dropped, but no result reached this API "
                        "(the queue Redis refused or lost it)"
                    )
                )

    # -- fleet ----------------------------------------------------------------------------------
    async def queue_depth(self) -> int:
        """Tasks in the stream now, and the queue gauges refreshed from Redis (asked at every
        scrape: the value seen at the last enqueue would stay high after a burst)."""
        try:
            pipe = self.r.pipeline(transaction=False)
            for stream in (self.stream, self.bulk_stream):
                pipe.xlen(stream)
                pipe.xinfo_groups(stream)
            depth, groups, bulk_depth, bulk_groups = await pipe.execute(raise_on_error=False)
        except Exception as e:  # noqa: BLE001 — a scrape must not fail on a Redis hiccup
            log.warning("queue length unavailable", extra={"error": repr(e)})
            return self._depth
        for queue, n, info in (("tasks", depth, groups), ("bulk", bulk_depth, bulk_groups)):
            n = n if isinstance(n, int) else 0
            m.set_queue(queue, n, _group_lag(info, n))
        self._depth = depth if isinstance(depth, int) else self._depth
        return self._depth

    async def status(self) -> FleetStatus:
        """Readiness of the workers serving this artifact (cached for 1 s)."""
        return await self.fleet.status()

    # -- tasks ----------------------------------------------------------------------------------
    async def submit(self, task: Task, timeout_s: float) -> TaskResult:
        deadline = time.monotonic() + timeout_s
        self._drain.next_wait(deadline)  # past the shutdown cut: refused
        st = await self.status()
        if not st.queue_ok:
            raise QueueUnavailableError(st.error or "redis unavailable")
        # With wake_s a fleet at zero is expected to start one; a known fatal error is not.
        if st.workers == 0 and (not self.wake_s or (st.error and not st.starting)):
            raise NoWorkerError(st.error or "no live worker serves this artifact")
        task.reply_to = self.reply_key
        stream = self.bulk_stream if task.bulk else self.stream
        flight = _InFlight(
            task, stream, "", asyncio.get_running_loop().create_future(), time.monotonic()
        )
        # Registered before the XADD: a worker may answer before the XADD's own reply reaches
        # us, and the reader must then find the request (or it discards the answer).
        self._inflight[task.id] = flight
        try:
            try:
                # One round trip: the length check and the XADD happen atomically in Redis.
                # Bulk chunks are bounded by their jobs' windows; only requests meet 429.
                bound = MAX_BULK_QUEUE if task.bulk else self.max_queue
                added, depth, entry = await self._enqueue(
                    keys=[stream], args=[bound, task_to_wire(task)]
                )
            except Exception as e:  # noqa: BLE001 — any Redis failure here means "not queued"
                raise QueueUnavailableError(f"redis unavailable: {e}") from None
            (m.BULK_QUEUE_DEPTH if task.bulk else m.QUEUE_DEPTH).set(depth)
            if not task.bulk:
                self._depth = depth
            if not added:
                raise QueueFullError()
            flight.entry = text(entry)
        except BaseException:
            self._inflight.pop(task.id, None)
            raise
        try:
            res = await self._wait(flight, deadline)
            if res.code == "result_undeliverable":  # the worker's stand-in for a refused result
                raise ReplyLostError(res.error)
            if flight.requeued:  # answered by the first copy: nobody needs the second
                with contextlib.suppress(Exception):
                    await self._withdraw(flight)
            return res
        except BaseException:
            # The request ends without an answer (timeout, no worker, client gone, shutdown):
            # withdraw the task so that no worker starts it for nobody, and mark it so that one
            # already holding it drops what is left of it.
            with contextlib.suppress(Exception):
                await self._withdraw(flight)
            raise
        finally:
            self._inflight.pop(task.id, None)

    async def _withdraw(self, flight: _InFlight) -> None:
        ttl = max(1, int(flight.task.deadline - time.time()) + 1)
        pipe = self.r.pipeline(transaction=False)
        pipe.xdel(flight.stream, flight.entry)
        pipe.set(cancelled_key(self.prefix, self.artifact_sha, flight.task.id), 1, ex=ttl)
        await pipe.execute()

    async def _wait(self, flight: _InFlight, deadline: float) -> TaskResult:
        """The reply; NoWorkerError once no worker has been alive or loading for
        NO_WORKER_GRACE_S, or wake_s when longer (the one computing it died and nobody can take
        it over; one that is loading, e.g. the dead one restarted, will), TimeoutError at the
        deadline, ShuttingDownError at the shutdown cut."""
        grace = max(NO_WORKER_GRACE_S, self.wake_s)
        no_worker_since: float | None = None
        while True:
            if not flight.reply.done():
                await asyncio.wait({flight.reply}, timeout=self._drain.next_wait(deadline))
            if flight.reply.done():
                return flight.reply.result()
            st = await self.status()
            if st.workers or st.starting:
                no_worker_since = None
                continue
            no_worker_since = no_worker_since or time.monotonic()
            if time.monotonic() - no_worker_since >= grace:
                raise NoWorkerError(
                    f"no worker has been alive for {grace:g} s while this request waited"
                    + (f" ({st.error})" if st.error else "")
                )


def _group_lag(groups: object, length: int) -> int:
    """Entries of a stream its workers' group has not been handed yet (XINFO GROUPS ``lag``,
    Redis ≥ 7; the stream's length when the group is missing or the lag unknown)."""
    if not isinstance(groups, list):  # no stream yet (an error reply): nothing queued
        return 0
    for g in groups:
        if text(g.get("name", b"")) == GROUP:
            lag = g.get("lag")
            return int(lag) if lag is not None else length
    return length
