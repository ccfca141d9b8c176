"""Distributed mode over Redis: a job stream with a consumer group, per-API reply streams,
worker heartbeats.

Keys (all under the configured prefix):
    <p>:jobs              stream of packed Jobs; consumer group "workers"
    <p>:replies:<api>     stream of packed JobResults for one API process (expires when idle)
    <p>:worker:<id>       heartbeat JSON of one worker (expires after 3 missed beats)
A worker that dies leaves its jobs pending; another worker claims them after ``claim_idle_s``.
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
from typing import TYPE_CHECKING, Any

import redis
import redis.asyncio as aioredis

from app import metrics as m
from app.dispatch import FleetStatus, NoWorkerError, QueueFullError
from app.jobs import Job, JobResult, job_from_wire, job_to_wire, result_from_wire, result_to_wire

if TYPE_CHECKING:
    from app.worker import WorkerState

log = logging.getLogger(__name__)

GROUP = "workers"
#: XADD only while the stream is shorter than ARGV[1]; returns {added 0/1, length}.
BOUNDED_XADD = """
local n = redis.call('XLEN', KEYS[1])
if n >= tonumber(ARGV[1]) then return {0, n} end
redis.call('XADD', KEYS[1], '*', 'd', ARGV[2])
return {1, n + 1}
"""
REPLY_TTL_S = 3600
READ_COUNT = 32


def jobs_key(prefix: str) -> str:
    return f"{prefix}:jobs"


def worker_key(prefix: str, worker_id: str) -> str:
    return f"{prefix}:worker:{worker_id}"


def default_worker_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


class RedisJobSource:
    """Worker side: read jobs through the consumer group, reply, acknowledge (sync client)."""

    def __init__(
        self, client: redis.Redis, prefix: str, consumer: str, claim_idle_s: float
    ) -> None:
        self.r = client
        self.stream = jobs_key(prefix)
        self.consumer = consumer
        self.claim_idle_ms = int(claim_idle_s * 1000)
        self._msg_ids: dict[str, bytes] = {}
        self._last_claim = 0.0
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
        """Take over jobs another (dead) worker left pending for longer than claim_idle_s."""
        now = time.monotonic()
        if now - self._last_claim < self.claim_idle_ms / 4000:
            return []
        self._last_claim = now
        _, msgs, *_ = self.r.xautoclaim(
            self.stream, GROUP, self.consumer, self.claim_idle_ms, start_id="0-0", count=READ_COUNT
        )
        if msgs:
            log.warning("claimed stale jobs", extra={"count": len(msgs)})
        return [msg for msg in msgs if msg[1]]

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
            if "NOGROUP" in str(e):  # Redis restarted without persistence: recreate
                self._ensure_group()
                return []
            raise
        except (redis.ConnectionError, redis.TimeoutError) as e:
            log.warning("redis unavailable; retrying", extra={"error": repr(e)})
            time.sleep(1.0)
            return []

    def reply(self, job: Job, result: JobResult) -> None:
        msg_id = self._msg_ids.pop(job.id, None)
        pipe = self.r.pipeline(transaction=False)
        if job.reply_to:
            pipe.xadd(job.reply_to, {"d": result_to_wire(result)}, maxlen=10_000, approximate=True)
            pipe.expire(job.reply_to, REPLY_TTL_S)
        if msg_id is not None:
            pipe.xack(self.stream, GROUP, msg_id)
            pipe.xdel(self.stream, msg_id)
        pipe.execute()


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
        self._waiting: dict[str, asyncio.Future[JobResult]] = {}
        self._reader: asyncio.Task | None = None
        self._status: tuple[float, FleetStatus] | None = None
        self._depth = 0
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

    async def _read_replies(self) -> None:
        last = "0-0"
        while True:
            try:
                resp = await self.r.xread({self.reply_key: last}, count=100, block=1000)
                ids = []
                for _, msgs in resp or []:
                    for msg_id, fields in msgs:
                        last = msg_id
                        ids.append(msg_id)
                        res = result_from_wire(fields[b"d"])
                        fut = self._waiting.pop(res.id, None)
                        if fut is not None and not fut.done():
                            fut.set_result(res)
                if ids:
                    await self.r.xdel(self.reply_key, *ids)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 — keep listening through Redis hiccups
                log.warning("reply reader error", extra={"error": repr(e)})
                await asyncio.sleep(0.5)

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
            st = FleetStatus(0, loaded, ready, f"redis unavailable: {e}")
            self._status = (now, st)
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

    async def submit(self, job: Job, timeout_s: float) -> JobResult:
        st = await self.status()
        if st.workers == 0:
            raise NoWorkerError(st.error or "no live worker serves this artifact")
        job.reply_to = self.reply_key
        fut: asyncio.Future[JobResult] = asyncio.get_running_loop().create_future()
        self._waiting[job.id] = fut
        try:
            # One round trip: the length check and the XADD happen atomically in Redis.
            added, self._depth = await self._enqueue(
                keys=[self.stream], args=[self.max_queue, job_to_wire(job)]
            )
            m.QUEUE_DEPTH.set(self._depth)
            if not added:
                raise QueueFullError()
            return await asyncio.wait_for(fut, timeout_s)
        finally:
            self._waiting.pop(job.id, None)
