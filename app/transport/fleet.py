"""The API's view of the fleet: which workers serve its artifact (their heartbeats, found through
the artifact's registry), how ready they are, and whether the Redis holding its queue restarted
(its run_id changed: the streams, without persistence, are gone).

After a restart the workers seen just before count as alive until their heartbeats would have
expired (they come back within one beat), so the empty heartbeat set of a fresh Redis does not
turn into false ``503 no_worker``.
"""

from __future__ import annotations

import json
import logging
import time

from app import metrics as m
from app.core.dispatch import FleetStatus
from app.transport.connect import AsyncClient, server_info
from app.transport.keys import text, worker_key, workers_key

log = logging.getLogger(__name__)

#: Heartbeat period assumed for a heartbeat that does not say (older workers).
DEFAULT_PERIOD_S = 2.0


class FleetView:
    """Heartbeats of one artifact's workers, read at most once a second."""

    def __init__(
        self, client: AsyncClient, prefix: str, artifact_sha: str, n_levels: int, stream: str
    ) -> None:
        self.r, self.prefix, self.artifact_sha = client, prefix, artifact_sha
        self.n_levels, self.stream = n_levels, stream
        self.restarts = 0  # Redis restarts (run_id changes) seen
        self._status: tuple[float, FleetStatus] | None = None
        self._run_id: str | None = None  # identity of the Redis server our tasks are queued in
        # Workers seen running: consumer → (heartbeat, when it would expire unrenewed; monotonic).
        self._seen: dict[str, tuple[dict, float]] = {}
        # After a Redis restart, those workers count until then (their heartbeats come back).
        self._presumed: dict[str, tuple[dict, float]] = {}

    async def _check_server(self, in_flight: int) -> None:
        """Notice a different Redis server than before (restart or failover: its run_id
        changed), whose streams without persistence, our queued tasks among them, are gone."""
        run_id = (await server_info(self.r, self.stream, "server"))["run_id"]
        if self._run_id is not None and run_id != self._run_id:
            self.restarts += 1
            # Heartbeat keys are gone until each worker's next beat: the workers just seen stay
            # counted until their heartbeats would have expired.
            self._presumed = dict(self._seen)
            self._status = None
            log.warning("redis restarted; checking in-flight tasks", extra={"tasks": in_flight})
        self._run_id = run_id

    async def status(self) -> FleetStatus:
        """Aggregate live heartbeats of workers serving this artifact (cached for 1 s)."""
        if self._status is not None and time.monotonic() - self._status[0] < 1.0:
            return self._status[1]
        return await self.refresh()

    async def refresh(self, in_flight: int = 0) -> FleetStatus:
        """Read the heartbeats now (and notice a Redis restart: ``in_flight`` tasks to check)."""
        now = time.monotonic()
        try:
            await self._check_server(in_flight)  # before the heartbeats: a restart shows none
            # The artifact's registry of consumers, then their heartbeats: one slot, no SCAN
            # of the keyspace (which the cache may fill with millions of keys).
            registry = workers_key(self.prefix, self.artifact_sha)
            consumers = sorted(text(c) for c in await self.r.smembers(registry))
            keys = [worker_key(self.prefix, self.artifact_sha, c) for c in consumers]
            beats = await self.r.mget(keys) if keys else []
            gone = [c for c, b in zip(consumers, beats, strict=True) if b is None]
            if gone:  # a worker that beats again is added again
                await self.r.srem(registry, *gone)
        except Exception as e:  # noqa: BLE001
            n = self.n_levels
            st = FleetStatus(0, [False] * n, [False] * n, f"redis unavailable: {e}", queue_ok=False)
            self._status = (now, st)
            m.WORKERS_LIVE.set(0)
            return st
        beats = [json.loads(raw) for raw in beats if raw is not None]
        mine = [hb for hb in beats if hb.get("artifact") == self.artifact_sha]
        seen: dict[str, tuple[dict, float]] = {}
        for hb in mine:
            if hb.get("running"):
                ttl = 3 * float(hb.get("period_s", DEFAULT_PERIOD_S))
                seen[hb.get("consumer", hb["id"])] = (hb, now + ttl)
        # Sightings are kept until they expire (not replaced): a refresh that raced a restart
        # and found the new, empty Redis must not erase what the restart check snapshots.
        self._seen = {c: v for c, v in self._seen.items() if v[1] > now} | seen
        self._presumed = {c: v for c, v in self._presumed.items() if v[1] > now and c not in seen}
        st = self._aggregate(
            [hb for hb, _ in seen.values()] + [hb for hb, _ in self._presumed.values()], mine
        )
        m.WORKERS_LIVE.set(st.workers)
        self._status = (now, st)
        return st

    def _aggregate(self, running: list[dict], mine: list[dict]) -> FleetStatus:
        """Readiness of the running workers; errors and loading ones among all heartbeats of
        this artifact's workers."""
        loaded = [False] * self.n_levels
        ready = [False] * self.n_levels
        for hb in running:
            loaded = [a or b for a, b in zip(loaded, hb["loaded"], strict=True)]
            ready = [a or b for a, b in zip(ready, hb["ready"], strict=True)]
        errors = [f"{hb['id']}: {hb['error']}" for hb in mine if hb.get("error")]
        starting = sum(1 for hb in mine if not hb.get("running") and not hb.get("error"))
        return FleetStatus(len(running), loaded, ready, "; ".join(errors) or None, True, starting)
