"""The Redis key layout both sides of distributed mode share (all under the configured prefix).

Queue Redis (``redis_url``; must never evict: ``maxmemory-policy noeviction``). The keys of one
artifact's queue carry the hash tag ``{<sha12>}`` (the first 12 hex digits of the artifact's
sha256): on a Redis Cluster they share one hash slot, so the commands and scripts that touch
several of them (XREADGROUP over both streams, MGET of marks and heartbeats) work there.

<p>:{<sha12>}:tasks            stream of packed Tasks for one artifact, read through the consumer
                               group "workers": a worker only ever reads the streams of the
                               artifact it serves; an entry is deleted once answered, or by its
                               API when the request gives up
<p>:{<sha12>}:bulk             the same for bulk-job chunks (same group): workers read it only when
                               the tasks stream has nothing for them, so requests never queue
                               behind a job
<p>:{<sha12>}:cancelled:<task> "withdrawn" mark of a task whose request gave up (expires with the
                               task's deadline): a worker already holding the task skips the rest
<p>:{<sha12>}:worker:<consumer> heartbeat JSON of one worker process (expires after 3 missed beats)
<p>:{<sha12>}:workers          set of the artifact's worker consumers (each beat adds its own):
                               where heartbeats are found without a SCAN of the keyspace
<p>:{<sha12>}:deadcheck        short lock: one worker of the fleet per interval looks for dead ones
<p>:replies:<api>              stream of packed TaskResults for one API process (its TTL is
                               renewed while the process lives: a dead one's expires)
<p>:joblease:<job>             which API process drives a bulk job (``app.transport.leases``)

A worker process's consumer name is ``<worker id>/<start nonce>``: fresh at every start, so a
worker restarted under the same id (a container's PID 1 under ``restart: unless-stopped``) is a
new consumer; the old one's heartbeat expires and its pending tasks are claimed like any dead
worker's. Two live processes given one id never share a heartbeat key.

Cache Redis (``cache_redis_url``, default the queue Redis; an LRU instance is right for it):

<p>:emb:<key>                  nested-cache entries (``app.core.cache.RedisCache``), no hash tag:
                               on a cluster they spread over every shard
"""

from __future__ import annotations

import os
import secrets
import socket
import uuid

GROUP = "workers"
#: A reply stream lives this long without its API renewing it (a dead API's goes away).
REPLY_TTL_S = 60
#: Hex digits of the artifact's sha256 that name its queue.
ARTIFACT_TAG_LEN = 12


def artifact_tag(artifact_sha: str) -> str:
    """The hash tag of one artifact's queue keys: one slot on a Redis Cluster."""
    return "{" + artifact_sha[:ARTIFACT_TAG_LEN] + "}"


def tasks_key(prefix: str, artifact_sha: str) -> str:
    """The task stream of one artifact."""
    return f"{prefix}:{artifact_tag(artifact_sha)}:tasks"


def bulk_key(prefix: str, artifact_sha: str) -> str:
    """The bulk-job chunk stream of one artifact (read only when its task stream is empty)."""
    return f"{prefix}:{artifact_tag(artifact_sha)}:bulk"


def cancelled_key(prefix: str, artifact_sha: str, task_id: str) -> str:
    return f"{prefix}:{artifact_tag(artifact_sha)}:cancelled:{task_id}"


def worker_key(prefix: str, artifact_sha: str, consumer: str) -> str:
    """The heartbeat of one worker process of an artifact (``consumer`` "*": a SCAN pattern)."""
    return f"{prefix}:{artifact_tag(artifact_sha)}:worker:{consumer}"


def workers_key(prefix: str, artifact_sha: str) -> str:
    """The registry of an artifact's worker consumers (a set; liveness is their heartbeats)."""
    return f"{prefix}:{artifact_tag(artifact_sha)}:workers"


def deadcheck_key(prefix: str, artifact_sha: str) -> str:
    return f"{prefix}:{artifact_tag(artifact_sha)}:deadcheck"


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
