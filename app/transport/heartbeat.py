"""A worker process's heartbeat in Redis: its state under its consumer name, renewed every period
and expiring after three missed beats (the API counts only workers whose heartbeat it sees)."""

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

from app.transport.connect import SyncClient
from app.transport.keys import worker_id_of, worker_key, workers_key

if TYPE_CHECKING:
    from app.core.worker import WorkerState

log = logging.getLogger(__name__)


class Heartbeat:
    """Publishes a worker's state every period under its consumer name; the key expires after
    three missed beats. A failed beat is retried every quarter second (after a Redis restart
    the key is gone until the next beat, and the API counts only workers it can see)."""

    def __init__(
        self,
        client: SyncClient,
        prefix: str,
        consumer: str,
        state: WorkerState,
        artifact_sha: str,
        device: str,
        period_s: float,
    ) -> None:
        self.r, self.state, self.period = client, state, period_s
        self.key = worker_key(prefix, artifact_sha, consumer)
        self.registry = workers_key(prefix, artifact_sha)
        self.consumer = consumer
        self.base = {
            "id": worker_id_of(consumer),
            "consumer": consumer,
            "artifact": artifact_sha,
            "device": device,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "period_s": period_s,
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
        """The heartbeat, and this consumer in the artifact's registry (again after a Redis
        restart lost it): one round trip."""
        pipe = self.r.pipeline(transaction=False)
        pipe.set(self.key, json.dumps(self.payload()), ex=max(1, math.ceil(3 * self.period)))
        pipe.sadd(self.registry, self.consumer)
        pipe.execute()

    def _run(self) -> None:
        while not self._stop.is_set():
            wait = self.period
            try:
                self.beat()
            except redis.RedisError as e:
                log.warning("heartbeat failed", extra={"error": repr(e)})
                wait = min(self.period, 0.25)
            self._stop.wait(wait)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)
        with contextlib.suppress(redis.RedisError):
            self.r.delete(self.key)
            self.r.srem(self.registry, self.consumer)
