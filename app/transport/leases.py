"""Bulk-job leases in the queue Redis (``<prefix>:joblease:<job>``): the distributed
implementation of :class:`app.core.jobs.leases.Leases`."""

from __future__ import annotations

import logging

import redis.asyncio as aioredis

log = logging.getLogger(__name__)

#: Renew a lease that is ours; take it when nobody holds it (a Redis restart lost it while we
#: worked); refuse when another process holds it. Returns 1 when the lease is ours.
RENEW = """
local v = redis.call('GET', KEYS[1])
if v == ARGV[1] then redis.call('PEXPIRE', KEYS[1], ARGV[2]) return 1 end
if not v then redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2]) return 1 end
return 0
"""
#: Delete the lease only if it is ours.
RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class RedisLeases:
    """Leases in Redis with a time to live; renewed well before it ends."""

    def __init__(
        self, client: aioredis.Redis | aioredis.RedisCluster, prefix: str, holder: str, ttl_s: float
    ) -> None:
        self.r, self.prefix, self.holder = client, prefix, holder
        self.ttl_ms = int(ttl_s * 1000)
        self._renew = client.register_script(RENEW)
        self._release = client.register_script(RELEASE)

    def _key(self, job_id: str) -> str:
        return f"{self.prefix}:joblease:{job_id}"

    async def acquire(self, job_id: str) -> bool:
        return bool(await self.r.set(self._key(job_id), self.holder, nx=True, px=self.ttl_ms))

    async def renew(self, job_id: str) -> bool:
        try:
            ours = await self._renew(keys=[self._key(job_id)], args=[self.holder, self.ttl_ms])
            return bool(ours)
        except Exception as e:  # noqa: BLE001 — Redis down: nobody else can take it either
            log.warning("lease renewal failed; still driving", extra={"job": job_id, "e": repr(e)})
            return True

    async def release(self, job_id: str) -> None:
        try:
            await self._release(keys=[self._key(job_id)], args=[self.holder])
        except Exception as e:  # noqa: BLE001 — it expires on its own
            log.warning("lease release failed", extra={"job": job_id, "error": repr(e)})
