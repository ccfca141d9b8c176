"""The Redis key layout both sides of distributed mode share (all under the configured prefix).

<p>:tasks             stream of packed Tasks; consumer group "workers"
<p>:replies:<api>     stream of packed TaskResults for one API process (expires when idle)
<p>:worker:<id>       heartbeat JSON of one worker (expires after 3 missed beats)
<p>:emb:<key>         nested-cache entries (``app.core.cache.RedisCache``)
"""

from __future__ import annotations

import os
import socket
import uuid

GROUP = "workers"
#: Reply streams expire when their API process has been gone this long.
REPLY_TTL_S = 3600


def tasks_key(prefix: str) -> str:
    return f"{prefix}:tasks"


def worker_key(prefix: str, worker_id: str) -> str:
    return f"{prefix}:worker:{worker_id}"


def new_reply_key(prefix: str) -> str:
    """A fresh reply stream for one API process."""
    return f"{prefix}:replies:{uuid.uuid4().hex[:16]}"


def default_worker_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


def text(v: bytes | str) -> str:
    """A Redis reply value as str (clients here do not decode responses)."""
    return v.decode() if isinstance(v, bytes) else v
