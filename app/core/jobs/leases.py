"""Who drives a job: a lease, held by one API process and renewed while it works. A driver that
dies stops renewing; its lease expires and another process (or its own restart) takes over.

Distributed mode keeps leases in the queue Redis (``app.transport.leases``); embedded mode has
one process, so an in-memory table (here) does.
"""

from __future__ import annotations

import time
from typing import Protocol


class Leases(Protocol):
    """Job leases of one API process (``holder``)."""

    async def acquire(self, job_id: str) -> bool:
        """Take the lease if nobody holds it."""
        ...

    async def renew(self, job_id: str) -> bool:
        """Keep the lease; False when another process took it (stop driving the job)."""
        ...

    async def release(self, job_id: str) -> None: ...


class LocalLeases:
    """Leases of a single process (embedded mode): held until released or expired."""

    def __init__(self, ttl_s: float) -> None:
        self.ttl_s = ttl_s
        self._until: dict[str, float] = {}

    async def acquire(self, job_id: str) -> bool:
        if self._until.get(job_id, 0.0) > time.monotonic():
            return False
        self._until[job_id] = time.monotonic() + self.ttl_s
        return True

    async def renew(self, job_id: str) -> bool:
        self._until[job_id] = time.monotonic() + self.ttl_s
        return True

    async def release(self, job_id: str) -> None:
        self._until.pop(job_id, None)
