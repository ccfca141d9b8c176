"""Distributed mode over Redis: a job stream with a consumer group, per-API reply streams,
worker heartbeats.

Keys (all under the configured prefix):
    <p>:jobs              stream of packed Jobs; consumer group "workers"
    <p>:replies:<api>     stream of packed JobResults for one API process (expires when idle)
    <p>:worker:<id>       heartbeat JSON of one worker (expires after 3 missed beats)
Failures, and what recovers from them:
  * a worker dies (SIGKILL, OOM-killer, lost host): its heartbeat expires, and another worker
    claims the jobs it left pending (XPENDING of that consumer + XCLAIM) within a few seconds;
    jobs pending longer than ``claim_idle_s`` are claimed from any consumer (a stuck one);
  * two workers computed the same job: the API delivers the first reply, discards the other;
  * Redis restarts and loses the streams (no persistence): the API notices the new server
    (its run_id) and queues its in-flight jobs again; workers recreate the consumer group;
  * Redis is unreachable: new requests get 503 (queue_unavailable), in-flight ones 503 once no
    worker has been seen for a few seconds; everything reconnects on its own.
Jobs past their deadline are answered with a timeout instead of computed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
import socket
import threading
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import redis
import redis.asyncio as aioredis

from app import metrics as m
from app.dispatch import FleetStatus, NoWorkerError, QueueFullError, QueueUnavailableError
from app.jobs import Job, JobResult, job_from_wire, job_to_wire, result_from_wire, result_to_wire

if TYPE_CHECKING:
    from app.worker import WorkerState

log = logging.getLogger(__name__)

GROUP = "workers"
#: XADD only while the stream is shorter than ARGV[1]; returns {added 0/1, length, entry id}.
BOUNDED_XADD = """
local n = redis.call('XLEN', KEYS[1])
if n >= tonumber(ARGV[1]) then return {0, n, ''} end
local id = redis.call('XADD', KEYS[1], '*', 'd', ARGV[2])
return {1, n + 1, id}
"""
REPLY_TTL_S = 3600
READ_COUNT = 32
#: A dead worker's job is claimed only if nobody touched it for this long: when two workers
#: notice the same dead consumer, the first XCLAIM resets the idle time and the second gets none.
DEAD_CLAIM_MIN_IDLE_MS = 1000
#: Consumers with no heartbeat, nothing pending and idle this long are removed from the group.
FORGET_CONSUMER_IDLE_MS = 10 * 60 * 1000
#: In-flight requests give up (503) after the fleet has shown no live worker for this long.
NO_WORKER_GRACE_S = 5.0


def jobs_key(prefix: str) -> str:
    return f"{prefix}:jobs"


def worker_key(prefix: str, worker_id: str) -> str:
    return f"{prefix}:worker:{worker_id}"


def default_worker_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


class RedisJobSource:
    """Worker side: read jobs through the consumer group, reply, acknowledge (sync client)."""

    def __init__(
        self,
        client: redis.Redis,
        prefix: str,
        consumer: str,
        claim_idle_s: float,
        dead_check_s: float = 2.0,
    ) -> None:
        self.r = client
        self.prefix = prefix
        self.stream = jobs_key(prefix)
        self.consumer = consumer
        self.claim_idle_ms = int(claim_idle_s * 1000)
        self.dead_check_s = dead_check_s  # how often to look for consumers without a heartbeat
        self._msg_ids: dict[str, bytes] = {}
        self._last_claim = 0.0
        self._last_dead_check = 0.0
        self._ensure_group()

    def _ensure_group(self) -> None:
        try:
            self.r.xgroup_create(self.stream, GROUP, id="0", mkstream=True)
        except redis.ResponseError as e:
            if "BUSYGROUP" not in str(e):
                raise

    def _read(self, block_ms: int) -> list[tuple[bytes, dict]]:
        resp = self.r.xreadgroup(
            GROUP, self.consumer, {self.stream: ">"}, count=READ_COUNT, block=max(1, block_ms)
        )
        return [msg for _, msgs in (resp or []) for msg in msgs]

    def _claim(self) -> list[tuple[bytes, dict]]:
        """Take over jobs of dead workers (no heartbeat) and jobs pending over claim_idle_s."""
        now = time.monotonic()
        msgs: list[tuple[bytes, dict]] = []
        if now - self._last_dead_check >= self.dead_check_s:
            self._last_dead_check = now
            msgs += self._claim_from_dead()
        if not msgs and now - self._last_claim >= self.claim_idle_ms / 4000:
            self._last_claim = now
            _, stale, *_ = self.r.xautoclaim(
                self.stream,
                GROUP,
                self.consumer,
                self.claim_idle_ms,
                start_id="0-0",
                count=READ_COUNT,
            )
            stale = [msg for msg in stale if msg[1]]  # deleted entries come back empty
            if stale:
                m.JOBS_RECLAIMED.labels("idle").inc(len(stale))
                log.warning("claimed jobs pending too long", extra={"count": len(stale)})
            msgs += stale
        return msgs

    def _claim_from_dead(self) -> list[tuple[bytes, dict]]:
        """Jobs pending at consumers whose heartbeat expired: their worker is gone."""
        msgs: list[tuple[bytes, dict]] = []
        for c in self.r.xinfo_consumers(self.stream, GROUP):
            name = _text(c["name"])
            if name == self.consumer or self.r.exists(worker_key(self.prefix, name)):
                continue
            if not c["pending"]:
                if c["idle"] > FORGET_CONSUMER_IDLE_MS:  # keep XINFO short on long-lived groups
                    self.r.xgroup_delconsumer(self.stream, GROUP, name)
                continue
            pending = self.r.xpending_range(
                self.stream, GROUP, "-", "+", READ_COUNT, consumername=name
            )
            ids = [p["message_id"] for p in pending]
            claimed = self.r.xclaim(self.stream, GROUP, self.consumer, DEAD_CLAIM_MIN_IDLE_MS, ids)
            claimed = [msg for msg in claimed if msg[1]]
            if claimed:
                m.JOBS_RECLAIMED.labels("dead").inc(len(claimed))
                log.warning(
                    "claimed jobs of a dead worker", extra={"dead": name, "count": len(claimed)}
                )
            msgs += claimed
        return msgs

    def _decode(self, msgs: list[tuple[bytes, dict]]) -> list[Job]:
        jobs = []
        for msg_id, fields in msgs:
            try:
                job = job_from_wire(fields[b"d"])
            except Exception:
                log.exception("dropping undecodable job message")
                self.r.xack(self.stream, GROUP, msg_id)
                self.r.xdel(self.stream, msg_id)
                continue
            self._msg_ids[job.id] = msg_id
            jobs.append(job)
        return jobs

    def take(self, budget: int, wait_s: float) -> list[Job]:
        try:
            jobs = self._decode(self._claim() or self._read(500))
            if not jobs:
                return []
            residues = sum(len(it.seq) for j in jobs for it in j.items)
            deadline = time.monotonic() + wait_s
            while residues < budget:
                remaining_ms = int((deadline - time.monotonic()) * 1000)
                if remaining_ms <= 0:
                    break
                more = self._decode(self._read(remaining_ms))
                if not more:
                    break
                jobs += more
                residues += sum(len(it.seq) for j in more for it in j.items)
            return jobs
        except redis.ResponseError as e:
            # Redis restarted without persistence: the stream and its group are gone.
            if "NOGROUP" in str(e) or "no such key" in str(e):
                self._ensure_group()
                return []
            raise
        except (redis.ConnectionError, redis.TimeoutError) as e:
            log.warning("redis unavailable; retrying", extra={"error": repr(e)})
            time.sleep(1.0)
            return []

    def reply(self, job: Job, result: JobResult) -> None:
        """Send the result, then acknowledge; retried while Redis is unreachable (until the job's
        deadline), so a computed result survives a Redis blip."""
        msg_id = self._msg_ids.pop(job.id, None)
        data = result_to_wire(result)
        delay = 0.2
        while True:
            try:
                pipe = self.r.pipeline(transaction=False)
                if job.reply_to:
                    pipe.xadd(job.reply_to, {"d": data}, maxlen=10_000, approximate=True)
                    pipe.expire(job.reply_to, REPLY_TTL_S)
                if msg_id is not None:
                    pipe.xack(self.stream, GROUP, msg_id)
                    pipe.xdel(self.stream, msg_id)
                # XACK fails with NOGROUP after a Redis restart; the reply itself went through.
                for res in pipe.execute(raise_on_error=False):
                    if isinstance(res, Exception) and "NOGROUP" not in str(res):
                        raise res
                return
            except (redis.ConnectionError, redis.TimeoutError) as e:
                if time.time() + delay > job.deadline:
                    raise
                log.warning("reply failed; retrying", extra={"job": job.id, "error": repr(e)})
                time.sleep(delay)
                delay = min(2 * delay, 2.0)


class Heartbeat:
    """Publishes a worker's state every period; the key expires after three missed beats."""

    def __init__(
        self,
        client: redis.Redis,
        prefix: str,
        state: WorkerState,
        artifact_sha: str,
        device: str,
        period_s: float,
    ) -> None:
        self.r, self.state, self.period = client, state, period_s
        self.key = worker_key(prefix, state.name)
        self.base = {
            "id": state.name,
            "artifact": artifact_sha,
            "device": device,
            "host": socket.gethostname(),
            "pid": os.getpid(),
        }
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rdserve-heartbeat", daemon=True)

    def payload(self) -> dict[str, Any]:
        return {
            **self.base,
            "loaded": self.state.loaded,
            "ready": self.state.ready,
            "running": self.state.running,
            "error": self.state.error,
            "ts": time.time(),
        }

    def beat(self) -> None:
        self.r.set(self.key, json.dumps(self.payload()), ex=max(1, math.ceil(3 * self.period)))

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.beat()
            except redis.RedisError as e:
                log.warning("heartbeat failed", extra={"error": repr(e)})
            self._stop.wait(self.period)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)
        with contextlib.suppress(redis.RedisError):
            self.r.delete(self.key)


@dataclass(slots=True)
class _InFlight:
    """A job the API queued and still waits for."""

    job: Job  # what was queued (kept to queue it again if Redis loses it)
    entry: str  # its stream entry id
    reply: asyncio.Future[JobResult]  # resolved by the reply reader


class RedisDispatcher:
    """API side of distributed mode: XADD jobs, one reader task resolves replies by job id."""

    mode = "distributed"

    def __init__(
        self, client: aioredis.Redis, prefix: str, artifact_sha: str, n_levels: int, max_queue: int
    ) -> None:
        self.r = client
        self.prefix = prefix
        self.stream = jobs_key(prefix)
        self.artifact_sha = artifact_sha
        self.n_levels = n_levels
        self.max_queue = max_queue
        self.reply_key = f"{prefix}:replies:{uuid.uuid4().hex[:16]}"
        self._inflight: dict[str, _InFlight] = {}
        self._delivered: OrderedDict[str, None] = OrderedDict()  # recent ids: spot duplicates
        self._reader: asyncio.Task | None = None
        self._status: tuple[float, FleetStatus] | None = None
        self._depth = 0
        self._run_id: str | None = None  # identity of the Redis server our jobs are queued in
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

    def _deliver(self, res: JobResult) -> None:
        """Resolve the waiting request, once: a second reply (two workers computed the job) or a
        reply to a request that has ended is discarded."""
        job = self._inflight.get(res.id)
        if job is None or job.reply.done():
            reason = "duplicate" if res.id in self._delivered else "expired"
            m.REPLIES_DISCARDED.labels(reason).inc()
            return
        job.reply.set_result(res)
        self._delivered[res.id] = None
        if len(self._delivered) > 10_000:
            self._delivered.popitem(last=False)

    async def _server_restarted(self) -> bool:
        """True when Redis is a different server than before (restart or failover): its run_id
        changed, so streams without persistence, our queued jobs among them, are gone."""
        run_id = (await self.r.info("server"))["run_id"]
        restarted = self._run_id is not None and run_id != self._run_id
        self._run_id = run_id
        if restarted:
            log.warning(
                "redis restarted; checking in-flight jobs", extra={"jobs": len(self._inflight)}
            )
        return restarted

    async def _requeue_lost(self) -> None:
        """Queue again every in-flight job whose stream entry no longer exists."""
        now = time.time()
        for f in list(self._inflight.values()):
            if f.reply.done() or f.job.deadline < now or not f.entry:  # "": being queued now
                continue
            if not await self.r.xrange(self.stream, f.entry, f.entry):
                f.entry = _text(await self.r.xadd(self.stream, {"d": job_to_wire(f.job)}))
                m.JOBS_RESUBMITTED.inc()
                log.warning("job lost by redis; queued again", extra={"job": f.job.id})

    # -- fleet ----------------------------------------------------------------------------------
    async def queue_depth(self) -> int:
        """Jobs in the stream now (asked at every scrape: the value seen at the last enqueue
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

    # -- jobs -----------------------------------------------------------------------------------
    async def submit(self, job: Job, timeout_s: float) -> JobResult:
        st = await self.status()
        if not st.queue_ok:
            raise QueueUnavailableError(st.error or "redis unavailable")
        if st.workers == 0:
            raise NoWorkerError(st.error or "no live worker serves this artifact")
        job.reply_to = self.reply_key
        flight = _InFlight(job, "", asyncio.get_running_loop().create_future())
        # Registered before the XADD: a worker may answer before the XADD's own reply reaches
        # us, and the reader must then find the request (or it discards the answer).
        self._inflight[job.id] = flight
        try:
            try:
                # One round trip: the length check and the XADD happen atomically in Redis.
                added, self._depth, entry = await self._enqueue(
                    keys=[self.stream], args=[self.max_queue, job_to_wire(job)]
                )
            except Exception as e:  # noqa: BLE001 — any Redis failure here means "not queued"
                raise QueueUnavailableError(f"redis unavailable: {e}") from None
            m.QUEUE_DEPTH.set(self._depth)
            if not added:
                raise QueueFullError()
            flight.entry = _text(entry)
        except BaseException:
            self._inflight.pop(job.id, None)
            raise
        try:
            return await self._wait(flight, timeout_s)
        except BaseException:
            # The request ends without an answer (timeout, no worker, client gone): delete the
            # job so that no worker starts it for nobody (one already computing it finishes).
            with contextlib.suppress(Exception):
                await self.r.xdel(self.stream, flight.entry)
            raise
        finally:
            self._inflight.pop(job.id, None)

    async def _wait(self, flight: _InFlight, timeout_s: float) -> JobResult:
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


def _text(v: bytes | str) -> str:
    return v.decode() if isinstance(v, bytes) else v
