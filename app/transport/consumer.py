"""Worker side of distributed mode: read tasks through the consumer group, reply, acknowledge,
and publish heartbeats (sync redis-py client; the worker loop runs in its own process).

Failures, and what recovers from them:
  * a worker dies (SIGKILL, OOM-killer, lost host): its heartbeat expires, and another worker
    claims the tasks it left pending (XPENDING of that consumer + XCLAIM) within a few seconds;
    tasks pending longer than ``claim_idle_s`` are claimed from any consumer (a stuck one);
  * Redis restarts and loses the streams (no persistence): workers recreate the consumer group;
  * Redis is unreachable: reads back off and retry; replies are retried until the deadline.
Tasks past their deadline are answered with a timeout instead of computed (``Worker.process``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import socket
import threading
import time
from typing import TYPE_CHECKING, Any

import redis

from app import metrics as m
from app.core.tasks import Task, TaskResult
from app.core.worker import gather
from app.transport.keys import GROUP, REPLY_TTL_S, tasks_key, text, worker_key
from app.transport.wire import result_to_wire, task_from_wire

if TYPE_CHECKING:
    from app.core.worker import WorkerState

log = logging.getLogger(__name__)

READ_COUNT = 32
#: A dead worker's task is claimed only if nobody touched it for this long: when two workers
#: notice the same dead consumer, the first XCLAIM resets the idle time and the second gets none.
DEAD_CLAIM_MIN_IDLE_MS = 1000
#: Consumers with no heartbeat, nothing pending and idle this long are removed from the group.
FORGET_CONSUMER_IDLE_MS = 10 * 60 * 1000

Message = tuple[bytes, dict]


class RedisTaskSource:
    """A TaskSource over the tasks stream's consumer group."""

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
        self.stream = tasks_key(prefix)
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

    def _read(self, block_s: float) -> list[Message]:
        """New entries; blocks up to block_s for the first (0: only what is queued now)."""
        block = max(1, int(block_s * 1000)) if block_s > 0 else None
        resp = self.r.xreadgroup(
            GROUP, self.consumer, {self.stream: ">"}, count=READ_COUNT, block=block
        )
        return [msg for _, msgs in (resp or []) for msg in msgs]

    def _claim(self) -> list[Message]:
        """Take over tasks of dead workers (no heartbeat) and tasks pending over claim_idle_s."""
        now = time.monotonic()
        msgs: list[Message] = []
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
                m.TASKS_RECLAIMED.labels("idle").inc(len(stale))
                log.warning("claimed tasks pending too long", extra={"count": len(stale)})
            msgs += stale
        return msgs

    def _claim_from_dead(self) -> list[Message]:
        """Tasks pending at consumers whose heartbeat expired: their worker is gone."""
        msgs: list[Message] = []
        for c in self.r.xinfo_consumers(self.stream, GROUP):
            name = text(c["name"])
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
                m.TASKS_RECLAIMED.labels("dead").inc(len(claimed))
                log.warning(
                    "claimed tasks of a dead worker", extra={"dead": name, "count": len(claimed)}
                )
            msgs += claimed
        return msgs

    def _decode(self, msgs: list[Message]) -> list[Task]:
        tasks = []
        for msg_id, fields in msgs:
            try:
                task = task_from_wire(fields[b"d"])
            except Exception:
                log.exception("dropping undecodable task message")
                self.r.xack(self.stream, GROUP, msg_id)
                self.r.xdel(self.stream, msg_id)
                continue
            self._msg_ids[task.id] = msg_id
            tasks.append(task)
        return tasks

    def take(self, budget: int, wait_s: float) -> list[Task]:
        try:
            first = self._decode(self._claim() or self._read(0.5))
            return gather(first, lambda t: self._decode(self._read(t)), budget, wait_s)
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

    def reply(self, task: Task, result: TaskResult) -> None:
        """Send the result, then acknowledge; retried while Redis is unreachable (until the
        task's deadline), so a computed result survives a Redis blip."""
        msg_id = self._msg_ids.pop(task.id, None)
        data = result_to_wire(result)
        delay = 0.2
        while True:
            try:
                pipe = self.r.pipeline(transaction=False)
                if task.reply_to:
                    pipe.xadd(task.reply_to, {"d": data}, maxlen=10_000, approximate=True)
                    pipe.expire(task.reply_to, REPLY_TTL_S)
                if msg_id is not None:
                    pipe.xack(self.stream, GROUP, msg_id)
                    pipe.xdel(self.stream, msg_id)
                # XACK fails with NOGROUP after a Redis restart; the reply itself went through.
                for res in pipe.execute(raise_on_error=False):
                    if isinstance(res, Exception) and "NOGROUP" not in str(res):
                        raise res
                return
            except (redis.ConnectionError, redis.TimeoutError) as e:
                if time.time() + delay > task.deadline:
                    raise
                log.warning("reply failed; retrying", extra={"task": task.id, "error": repr(e)})
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
