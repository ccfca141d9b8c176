"""Worker side of distributed mode: read tasks of the served artifact through the consumer group,
reply, acknowledge, and publish heartbeats (sync redis-py client; the worker loop runs in its own
process).

Failures, and what recovers from them:
  * a worker dies (SIGKILL, OOM-killer, lost host): its heartbeat expires, and another worker
    claims the tasks it left pending (XPENDING of that consumer + XCLAIM) within a few seconds;
    tasks pending longer than ``claim_idle_s`` are claimed from any consumer (a stuck one). A
    worker restarted under the same id is a new consumer (``keys.new_consumer``), so the old
    process counts as dead and the new one (or any other) claims what it left;
  * Redis restarts and loses the streams (no persistence): workers recreate the consumer group,
    and the heartbeat is retried every quarter second until it is back;
  * Redis is unreachable: reads back off and retry; replies are retried until the deadline;
  * Redis refuses to store a result (OOM at maxmemory): a short error result is sent instead,
    so the request fails at once (503) instead of waiting for its deadline.
Tasks past their deadline are answered with a timeout instead of computed, and tasks withdrawn
by their API (``keys.cancelled_key``) are dropped between batches (``Worker.process``).
"""

from __future__ import annotations

import contextlib
import logging
import time
from typing import TYPE_CHECKING

import redis

from app import metrics as m
from app.core.tasks import Task, TaskResult
from app.core.worker import gather
from app.transport.connect import SyncClient
from app.transport.keys import (
    GROUP,
    REPLY_TTL_S,
    bulk_key,
    cancelled_key,
    deadcheck_key,
    tasks_key,
    text,
    worker_key,
)
from app.transport.wire import result_to_wire, task_from_wire

if TYPE_CHECKING:
    pass

log = logging.getLogger(__name__)

READ_COUNT = 32
#: A dead worker's task is claimed only if nobody touched it for this long: when two workers
#: notice the same dead consumer, the first XCLAIM resets the idle time and the second gets none.
DEAD_CLAIM_MIN_IDLE_MS = 1000
#: Consumers with no heartbeat, nothing pending and idle this long are removed from the group.
FORGET_CONSUMER_IDLE_MS = 10 * 60 * 1000
#: How long a worker keeps trying to send the short error result when Redis refuses the real one
#: (a refused large command frees its query buffer within ~0.1 s; then small writes pass again).
ERROR_REPLY_RETRY_S = 2.0

Message = tuple[str, bytes, dict]  # stream, entry id, fields


class RedisTaskSource:
    """A TaskSource over the consumer group of the artifact's two streams: interactive tasks,
    and bulk-job chunks read only when no interactive task is queued (one chunk per turn, so
    that the others stay for the rest of the fleet)."""

    def __init__(
        self,
        client: SyncClient,
        prefix: str,
        artifact_sha: str,
        consumer: str,
        claim_idle_s: float,
        dead_check_s: float = 2.0,
        reply_ttl_s: float = REPLY_TTL_S,
    ) -> None:
        self.r = client
        self.prefix = prefix
        self.artifact_sha = artifact_sha
        self.stream = tasks_key(prefix, artifact_sha)  # only this artifact's tasks
        self.bulk_stream = bulk_key(prefix, artifact_sha)
        self.streams = (self.stream, self.bulk_stream)
        self.consumer = consumer
        self.claim_idle_ms = int(claim_idle_s * 1000)
        self.dead_check_s = dead_check_s  # how often to look for consumers without a heartbeat
        self.reply_ttl_s = max(1, int(reply_ttl_s))  # a reply stream nobody renews expires
        self._msg_ids: dict[str, tuple[str, bytes]] = {}  # task id → (stream, entry id)
        self._last_claim = 0.0
        self._last_dead_check = 0.0
        self._ensure_group()

    def _ensure_group(self) -> None:
        for stream in self.streams:
            try:
                self.r.xgroup_create(stream, GROUP, id="0", mkstream=True)
            except redis.ResponseError as e:
                if "BUSYGROUP" not in str(e):
                    raise

    def _read(
        self, block_s: float, streams: tuple[str, ...], count: int = READ_COUNT
    ) -> list[Message]:
        """New entries of ``streams`` (at most ``count`` of each); blocks up to block_s for the
        first (0: only what is queued now)."""
        block = max(1, int(block_s * 1000)) if block_s > 0 else None
        resp = self.r.xreadgroup(
            GROUP, self.consumer, dict.fromkeys(streams, ">"), count=count, block=block
        )
        return [(text(key), *msg) for key, msgs in (resp or []) for msg in msgs]

    def _claim(self) -> list[Message]:
        """Take over tasks of dead workers (no heartbeat) and tasks pending over claim_idle_s."""
        now = time.monotonic()
        msgs: list[Message] = []
        if now - self._last_dead_check >= self.dead_check_s:
            self._last_dead_check = now
            # One worker of the fleet per interval looks (a short lock): N workers cost N
            # checks an interval, not N², and a dead worker's tasks are still taken within it.
            lock = deadcheck_key(self.prefix, self.artifact_sha)
            ttl_ms = max(100, int(self.dead_check_s * 1000))
            if self.r.set(lock, self.consumer, nx=True, px=ttl_ms):
                for stream in self.streams:
                    msgs += self._claim_from_dead(stream)
        if not msgs and now - self._last_claim >= self.claim_idle_ms / 4000:
            self._last_claim = now
            for stream in self.streams:
                _, stale, *_ = self.r.xautoclaim(
                    stream,
                    GROUP,
                    self.consumer,
                    self.claim_idle_ms,
                    start_id="0-0",
                    count=READ_COUNT,
                )
                stale = [(stream, *msg) for msg in stale if msg[1]]  # deleted ones come back empty
                if stale:
                    m.TASKS_RECLAIMED.labels("idle").inc(len(stale))
                    log.warning("claimed tasks pending too long", extra={"count": len(stale)})
                msgs += stale
        return msgs

    def _claim_from_dead(self, stream: str) -> list[Message]:
        """Tasks pending at consumers whose heartbeat expired: their worker is gone. Liveness of
        every consumer that matters (tasks pending, or idle long enough to forget) in one MGET
        of their heartbeats (one hash slot)."""
        msgs: list[Message] = []
        others = [
            c
            for c in self.r.xinfo_consumers(stream, GROUP)
            if text(c["name"]) != self.consumer
            and (c["pending"] or c["idle"] > FORGET_CONSUMER_IDLE_MS)
        ]
        if not others:
            return msgs
        beats = self.r.mget(
            [worker_key(self.prefix, self.artifact_sha, text(c["name"])) for c in others]
        )
        for c, beat in zip(others, beats, strict=True):
            if beat is not None:
                continue
            name = text(c["name"])
            if not c["pending"]:  # keep XINFO short on long-lived groups
                self.r.xgroup_delconsumer(stream, GROUP, name)
                continue
            pending = self.r.xpending_range(stream, GROUP, "-", "+", READ_COUNT, consumername=name)
            ids = [p["message_id"] for p in pending]
            claimed = self.r.xclaim(stream, GROUP, self.consumer, DEAD_CLAIM_MIN_IDLE_MS, ids)
            claimed = [(stream, *msg) for msg in claimed if msg[1]]
            if claimed:
                m.TASKS_RECLAIMED.labels("dead").inc(len(claimed))
                log.warning(
                    "claimed tasks of a dead worker", extra={"dead": name, "count": len(claimed)}
                )
            msgs += claimed
        return msgs

    def _decode(self, msgs: list[Message]) -> list[Task]:
        tasks = []
        for stream, msg_id, fields in msgs:
            try:
                task = task_from_wire(fields[b"d"])
            except Exception:
                log.exception("dropping undecodable task message")
                self.r.xack(stream, GROUP, msg_id)
                self.r.xdel(stream, msg_id)
                continue
            self._msg_ids[task.id] = (stream, msg_id)
            tasks.append(task)
        return tasks

    def take(self, budget: int, wait_s: float) -> list[Task]:
        try:
            first = self._decode(self._claim())
            if not first:  # interactive tasks queued now, else one bulk chunk, else wait for either
                first = self._decode(self._read(0, (self.stream,)))
                first = first or self._decode(self._read(0, (self.bulk_stream,), count=1))
                first = first or self._decode(self._read(0.5, self.streams, count=1))
            if not first or any(t.bulk for t in first):
                return first
            more = lambda t: self._decode(self._read(t, (self.stream,)))  # noqa: E731
            return gather(first, more, budget, wait_s)
        except redis.ResponseError as e:
            # Redis restarted without persistence: the streams and their group are gone.
            if "NOGROUP" in str(e) or "no such key" in str(e):
                self._ensure_group()
                return []
            raise
        except (redis.ConnectionError, redis.TimeoutError) as e:
            log.warning("redis unavailable; retrying", extra={"error": repr(e)})
            time.sleep(1.0)
            return []

    def urgent(self, budget: int) -> list[Task]:
        """Interactive tasks queued now (for a turn of bulk chunks to run first)."""
        more = lambda t: self._decode(self._read(0, (self.stream,)))  # noqa: E731
        return gather(more(0), more, budget, 0)

    def reply(self, task: Task, result: TaskResult) -> None:
        """Send the result, then acknowledge and delete the task; retried while Redis is
        unreachable (until the task's deadline), so a computed result survives a Redis blip.
        A result Redis refuses to store (OOM at maxmemory) is replaced by a short error result,
        so that its request fails at once rather than at its deadline."""
        entry = self._msg_ids.pop(task.id, None)
        data = result_to_wire(result)
        refused = self._send(task, data, entry)
        if refused is None:
            return
        m.REPLIES_FAILED.inc()
        log.error(
            "result refused by redis; answering with an error",
            extra={"task": task.id, "bytes": len(data), "error": str(refused)},
        )
        failure = TaskResult(
            task.id,
            error=f"the result ({len(data) / 2**20:.1f} MiB) could not be stored in the task "
            f"queue (Redis: {refused}); ask for fewer sequences per request, or retry later",
            code="result_undeliverable",
            worker=result.worker,
        )
        deadline = time.monotonic() + ERROR_REPLY_RETRY_S
        while self._send(task, result_to_wire(failure), None) is not None:
            if time.monotonic() > deadline:  # the API's lost-reply check answers it
                log.error("error result refused too", extra={"task": task.id})
                return
            time.sleep(0.1)

    def _send(
        self, task: Task, data: bytes, entry: tuple[str, bytes] | None
    ) -> redis.ResponseError | None:
        """XADD the reply, XACK + XDEL the task (one round trip); the error if Redis refused
        the reply itself. Connection failures are retried until the task's deadline."""
        delay = 0.2
        while True:
            try:
                pipe = self.r.pipeline(transaction=False)
                if task.reply_to:
                    pipe.xadd(task.reply_to, {"d": data}, maxlen=10_000, approximate=True)
                    # NX: the API renews its own stream's TTL; a late reply to a dead API's
                    # stream must not keep it alive.
                    pipe.expire(task.reply_to, self.reply_ttl_s, nx=True)
                if entry is not None:
                    pipe.xack(entry[0], GROUP, entry[1])
                    pipe.xdel(entry[0], entry[1])
                res = pipe.execute(raise_on_error=False)
                if task.reply_to and isinstance(res[0], redis.ResponseError):
                    return res[0]
                # XACK fails with NOGROUP after a Redis restart; the reply itself went through.
                for r in res:
                    if isinstance(r, Exception) and "NOGROUP" not in str(r):
                        raise r
                return None
            except (redis.ConnectionError, redis.TimeoutError) as e:
                if time.time() + delay > task.deadline:
                    raise
                log.warning("reply failed; retrying", extra={"task": task.id, "error": repr(e)})
                time.sleep(delay)
                delay = min(2 * delay, 2.0)

    def withdrawn(self, tasks: list[Task]) -> set[str]:
        """Tasks whose API withdrew them (a cancellation mark exists): one round trip."""
        if not tasks:
            return set()
        marks = self.r.mget([cancelled_key(self.prefix, self.artifact_sha, t.id) for t in tasks])
        return {t.id for t, mark in zip(tasks, marks, strict=True) if mark is not None}

    def skip(self, task: Task) -> None:
        """Acknowledge a withdrawn task (its API already deleted the entry)."""
        entry = self._msg_ids.pop(task.id, None)
        if entry is not None:
            with contextlib.suppress(redis.RedisError):
                self.r.xack(entry[0], GROUP, entry[1])

    def close(self) -> None:
        """Leave the group on a clean stop, when nothing is pending here any more (a consumer
        name is used by one process only, so it would otherwise linger until forgotten)."""
        with contextlib.suppress(redis.RedisError):
            for stream in self.streams:
                mine = self.r.xpending_range(stream, GROUP, "-", "+", 1, consumername=self.consumer)
                if not mine:
                    self.r.xgroup_delconsumer(stream, GROUP, self.consumer)
