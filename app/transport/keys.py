"""The Redis key layout both sides of distributed mode share (all under the configured prefix).

Queue Redis (``redis_url``; must never evict: ``maxmemory-policy noeviction``):

<p>:tasks:<sha12>          stream of packed Tasks for one artifact (the first 12 hex digits of its
                           sha256), read through the consumer group "workers": a worker only ever
                           reads the stream of the artifact it serves; an entry is deleted once
                           answered, or by its API when the request gives up
<p>:bulk:<sha12>           the same for bulk-job chunks (same group): workers read it only when the
                           tasks stream has nothing for them, so requests never queue behind a job
<p>:cancelled:<task>       "withdrawn" mark of a task whose request gave up (expires with the task's
                           deadline): a worker already holding the task skips what is left of it
<p>:replies:<api>          stream of packed TaskResults for one API process (expires when idle)
<p>:worker:<consumer>      heartbeat JSON of one worker process (expires after 3 missed beats)

A worker process's consumer name is ``<worker id>/<start nonce>``: fresh at every start, so a
worker restarted under the same id (a container's PID 1 under ``restart: unless-stopped``) is a
new consumer; the old one's heartbeat expires and its pending tasks are claimed like any dead
worker's. Two live processes given one id never share a heartbeat key.

Cache Redis (``cache_redis_url``, default the queue Redis; an LRU instance is right for it):

<p>:emb:<key>              nested-cache entries (``app.core.cache.RedisCache``)
"""

from __future__ import annotations

import os
import secrets
import socket
import uuid

GROUP = "workers"
#: Reply streams expire when their API process has been gone this long.
REPLY_TTL_S = 3600
#: Hex digits of the artifact's sha256 that name its task stream.
ARTIFACT_TAG_LEN = 12


def tasks_key(prefix: str, artifact_sha: str) -> str:
    """The task stream of one artifact."""
    return f"{prefix}:tasks:{artifact_sha[:ARTIFACT_TAG_LEN]}"


def bulk_key(prefix: str, artifact_sha: str) -> str:
    """The bulk-job chunk stream of one artifact (read only when its task stream is empty)."""
    return f"{prefix}:bulk:{artifact_sha[:ARTIFACT_TAG_LEN]}"


def cancelled_key(prefix: str, task_id: str) -> str:
    return f"{prefix}:cancelled:{task_id}"


def worker_key(prefix: str, consumer: str) -> str:
    return f"{prefix}:worker:{consumer}"


def new_reply_key(prefix: str) -> str:
    """A fresh reply stream for one API process."""
    return f"{prefix}:replies:{uuid.uuid4().hex[:16]}"


def default_worker_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


def new_consumer(worker_id: str) -> str:
    """This process's consumer name: the configured worker id and a nonce drawn at start."""
    return f"{worker_id}/{secrets.token_hex(4)}"


def worker_id_of(consumer: str) -> str:
    """The configured worker id inside a consumer name."""
    return consumer.rsplit("/", 1)[0]


def text(v: bytes | str) -> str:
    """A Redis reply value as str (clients here do not decode responses)."""
    return v.decode() if isinstance(v, bytes) else v
