"""Redis per request: operations, Redis CPU and API CPU, counted on a real cluster; cache bytes per
sequence per level; the fleet's background Redis work as the fleet grows.

An API and a worker process (tiny ESM-2 chain, CPU) run over two private redis-servers — the
queue and the cache, as in docker-compose.yml — and serve 300-residue sequences at full miss,
partial hit and full hit. Each phase reads ``INFO commandstats`` and ``INFO cpu`` before and
after; the background rates (heartbeats, fleet refreshes, blocking reads of an idle worker),
measured over an idle window first, are subtracted. Cache entries of the real ESM-2 widths are
written through ``RedisCache.put_many`` (the service's own code) and sized with ``MEMORY USAGE``
and the ``used_memory`` delta. The fleet part times the commands whose cost grows with the
number of workers (``XINFO CONSUMERS``, the heartbeat ``SCAN``) on synthetic fleets.

    python -m benchmarks.redis_ops [--quick] [--out benchmarks/results/redis_ops.json]

Results feed ``benchmarks/capacity.py`` (docs/scaling.md).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import signal
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import redis

from benchmarks.common import RESULTS, process_cpu_s, save, summary
from benchmarks.service import chains, served_artifact
from tests.harness import Cluster, cluster_env
from tests.procs import RedisServer

PREFIX = "rdserve-ops"
AMINO = "ACDEFGHIKLMNPQRSTVWY"
LENGTH = 300  # residues per sequence
#: Real ESM-2 widths (8M … 3B): the nested cache stores the blocks 320, 160, 160, 640, 1280.
ESM2_DIMS = {"8M": 320, "35M": 480, "150M": 640, "650M": 1280, "3B": 2560}


def sequences(n: int, rng: np.random.Generator) -> list[str]:
    """n distinct random 300-residue sequences (no cache has seen them)."""
    idx = rng.integers(0, len(AMINO), size=(n, LENGTH))
    return ["".join(AMINO[i] for i in row) for row in idx]


# -- Redis counters -------------------------------------------------------------------------------
def snapshot(r: redis.Redis) -> dict[str, Any]:
    """Calls and server µs per command, and the main thread's CPU seconds, now."""
    stats = r.info("commandstats")
    cpu = r.info("cpu")
    return {
        "t": time.monotonic(),
        "calls": {k.removeprefix("cmdstat_"): v["calls"] for k, v in stats.items()},
        "usec": {k.removeprefix("cmdstat_"): v["usec"] for k, v in stats.items()},
        "cpu_s": cpu["used_cpu_user_main_thread"] + cpu["used_cpu_sys_main_thread"],
    }


def delta(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """Counters from snapshot a to b (INFO and the snapshots' own commands excluded)."""
    calls = {k: b["calls"][k] - a["calls"].get(k, 0) for k in b["calls"]}
    usec = {k: b["usec"][k] - a["usec"].get(k, 0) for k in b["usec"]}
    for own in ("info",):  # our two INFOs per snapshot; the API's INFO server is background
        calls[own] = calls.get(own, 0) - 2
        usec[own] = max(0, usec.get(own, 0))
    return {
        "seconds": b["t"] - a["t"],
        "calls": {k: v for k, v in calls.items() if v > 0},
        "usec": {k: v for k, v in usec.items() if calls.get(k, 0) > 0},
        "cpu_s": b["cpu_s"] - a["cpu_s"],
    }


def per_unit(d: dict[str, Any], bg: dict[str, Any], units: int) -> dict[str, Any]:
    """Calls and CPU per unit (request) of a phase, the idle background rates subtracted."""
    s = d["seconds"]
    calls = {}
    for k, v in d["calls"].items():
        # Blocking reads loop while idle; under load each of them carries tasks or replies.
        idle = 0.0 if k in ("xreadgroup", "xread") else bg["calls_per_s"].get(k, 0.0)
        net = v - idle * s
        if net > 0.5:  # below half a call in the whole phase: background jitter
            calls[k] = round(net / units, 3)
    cpu_us = max(0.0, d["cpu_s"] - bg["cpu_s_per_s"] * s) / units * 1e6
    usec = {k: d["usec"][k] / d["calls"][k] for k in calls if d["calls"].get(k)}
    return {"calls": calls, "total": round(sum(calls.values()), 2), "cpu_us": cpu_us, "usec": usec}


def background(rs: dict[str, redis.Redis], seconds: float) -> dict[str, dict[str, Any]]:
    """Per-second call rates and CPU of an idle cluster (1 API, 1 worker)."""
    before = {n: snapshot(r) for n, r in rs.items()}
    time.sleep(seconds)
    out = {}
    for n, r in rs.items():
        d = delta(before[n], snapshot(r))
        out[n] = {
            "calls_per_s": {k: v / d["seconds"] for k, v in d["calls"].items()},
            "cpu_s_per_s": d["cpu_s"] / d["seconds"],
        }
    return out


# -- load ---------------------------------------------------------------------------------------
async def _load(base: str, bodies: list[dict], concurrency: int) -> list[int]:
    """POST every body with ``concurrency`` clients; the status codes."""
    statuses: list[int] = []
    queue: asyncio.Queue[dict] = asyncio.Queue()
    for b in bodies:
        queue.put_nowait(b)
    async with httpx.AsyncClient(base_url=base, timeout=120) as client:

        async def one() -> None:
            while not queue.empty():
                body = queue.get_nowait()
                r = await client.post("/v1/embeddings", json=body)
                statuses.append(r.status_code)

        await asyncio.gather(*(one() for _ in range(concurrency)))
    return statuses


def phase(
    cluster: Cluster,
    rs: dict[str, redis.Redis],
    bg: dict[str, dict[str, Any]],
    bodies: list[dict],
    concurrency: int,
    pids: dict[str, int],
) -> dict[str, Any]:
    """Serve ``bodies``; per request: Redis calls and CPU per instance, process CPU."""
    cpu0 = {n: process_cpu_s(p) for n, p in pids.items()}
    before = {n: snapshot(r) for n, r in rs.items()}
    t0 = time.perf_counter()
    statuses = asyncio.run(_load(cluster.base, bodies, concurrency))
    wall = time.perf_counter() - t0
    time.sleep(0.3)  # the last cache stores land
    after = {n: snapshot(r) for n, r in rs.items()}
    n = len(bodies)
    assert statuses.count(200) == n, f"not all 200: {sorted(set(statuses))}\n{cluster.output()}"
    out: dict[str, Any] = {
        "requests": n,
        "sequences_per_request": len(bodies[0]["input"]),
        "concurrency": concurrency,
        "requests_per_s": n / wall,
    }
    for name in rs:
        d = delta(before[name], after[name])
        out[name] = per_unit(d, bg[name], n) | {"raw": d}
    for name, pid in pids.items():
        out[f"{name}_cpu_ms"] = (process_cpu_s(pid) - cpu0[name]) / n * 1e3
    return out


def serve_phases(artifact: Path, logs: Path, quick: bool) -> dict[str, Any]:
    """Miss, partial and full-hit phases at 1 and 32 sequences per request."""
    rng = np.random.default_rng(16)
    with tempfile.TemporaryDirectory() as tmp:
        queue_redis = RedisServer(Path(tmp)).start()
        cache_redis = RedisServer(Path(tmp)).start()
        rs = {"queue": queue_redis.client(), "cache": cache_redis.client()}
        env = cluster_env(
            queue_redis.url,
            artifact,
            PREFIX,
            RDSERVE_CACHE_REDIS_URL=cache_redis.url,
            RDSERVE_HEARTBEAT_S="2",  # the default: background rates as deployed
            RDSERVE_LOG_LEVEL="warning",
        )
        cluster = Cluster(env, logs)
        try:
            cluster.worker("w1")
            cluster.wait_workers(1)
            pids = {"api": cluster.api.p.pid, "worker": cluster.workers["w1"].p.pid}
            dims = httpx.get(f"{cluster.base}/info", timeout=10).json()
            k_max = max(lv["dim"] for lv in dims["levels"])
            k_first = min(lv["dim"] for lv in dims["levels"])
            asyncio.run(  # warm-up: connections, first forwards
                _load(cluster.base, [{"input": sequences(4, rng), "dimensions": k_max}], 1)
            )
            bg = background(rs, 4 if quick else 10)
            configs = [(1, 1, 40 if quick else 200), (1, 16, 40 if quick else 400)]
            configs += [(32, 1, 4 if quick else 20), (32, 8, 8 if quick else 48)]
            results = []
            for seqs, conc, n in configs:
                batch = [sequences(seqs, rng) for _ in range(n)]
                miss = [{"input": b, "dimensions": k_max} for b in batch]
                row = {"miss": phase(cluster, rs, bg, miss, conc, pids)}
                row["full_hit"] = phase(cluster, rs, bg, miss, conc, pids)
                fresh = [sequences(seqs, rng) for _ in range(n)]
                first = [{"input": b, "dimensions": k_first} for b in fresh]
                asyncio.run(_load(cluster.base, first, conc))  # level 1 cached only
                partial = [{"input": b, "dimensions": k_max} for b in fresh]
                row["partial"] = phase(cluster, rs, bg, partial, conc, pids)
                results.append(row)
                print(
                    f"  {seqs} seq x {n} req, {conc} clients: "
                    + ", ".join(
                        f"{tier} queue {r['queue']['total']:.1f} + cache {r['cache']['total']:.1f}"
                        f" ops/req, {(r['queue']['cpu_us'] + r['cache']['cpu_us']) / 1e3:.3f}"
                        " ms Redis CPU"
                        for tier, r in row.items()
                    ),
                    flush=True,
                )
            return {"background_1api_1worker": bg, "phases": results, "k": [k_first, k_max]}
        finally:
            cluster.close()
            for r in rs.values():
                r.close()
            queue_redis.stop()
            cache_redis.stop()


# -- worker stop time ---------------------------------------------------------------------------
def worker_exit_s(artifact: Path, logs: Path, reps: int) -> dict[str, float]:
    """SIGTERM to exit of an idle worker (ready, nothing in flight): what a stop costs beyond
    the turn it finishes (part of the grace-period derivation)."""
    times = []
    with tempfile.TemporaryDirectory() as tmp:
        server = RedisServer(Path(tmp)).start()
        cluster = Cluster(cluster_env(server.url, artifact, PREFIX + "-exit"), logs)
        try:
            r = server.client()
            for i in range(reps):
                w = cluster.worker(f"x{i}")
                _wait_running(r, PREFIX + "-exit", f"x{i}", w)
                t0 = time.perf_counter()
                w.signal(signal.SIGTERM)
                w.wait(60)
                times.append(time.perf_counter() - t0)
        finally:
            r.close()
            cluster.close()
            server.stop()
    return summary(times)


def _wait_running(r: redis.Redis, prefix: str, worker_id: str, proc: Any) -> None:
    """Until this worker's own heartbeat says its loop runs (the API's view may still hold an
    earlier worker's sighting)."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        for key in r.scan_iter(match=f"{prefix}:worker:{worker_id}/*"):
            beat = r.get(key)
            if beat and json.loads(beat).get("running"):
                return
        time.sleep(0.1)
    raise AssertionError(f"worker {worker_id} not running\n{proc.output()[-3000:]}")


# -- cache memory -------------------------------------------------------------------------------
def cache_memory(n_keys: int) -> dict[str, Any]:
    """Bytes per cached sequence in Redis for each k of the ESM-2 chain, pooled and per residue
    (300 residues), written through the service's RedisCache."""
    import redis.asyncio as aioredis

    from app.core.cache import CacheEntry, RedisCache
    from models.sequences import Handling

    names = list(ESM2_DIMS)
    dims = list(ESM2_DIMS.values())
    widths = [dims[0]] + [b - a for a, b in itertools.pairwise(dims)]
    rng = np.random.default_rng(0)
    out: dict[str, Any] = {"residues": LENGTH, "keys_per_point": n_keys, "levels": {}}
    with tempfile.TemporaryDirectory() as tmp:
        server = RedisServer(Path(tmp)).start()
        sync = server.client()

        async def fill(levels: int, per_residue: bool, n: int) -> list[str]:
            client = aioredis.Redis.from_url(server.url)
            cache = RedisCache(client, "rdserve", len(dims), dims, ttl_s=7 * 24 * 3600)
            keys = [uuid.uuid4().hex + uuid.uuid4().hex for _ in range(n)]  # sha256-long
            rows = LENGTH if per_residue else 0
            for i in range(0, n, 200):
                entries = []
                for key in keys[i : i + 200]:
                    blocks = [
                        rng.standard_normal((rows, w) if rows else w).astype("<f4")
                        for w in widths[:levels]
                    ]
                    entries.append((key, 0, CacheEntry(blocks, LENGTH, Handling.full)))
                await cache.put_many(entries)
            await cache.close()
            return keys

        try:
            for j, name in enumerate(names):
                row: dict[str, Any] = {"k": dims[j]}
                for mode, per_residue in (("pooled", False), ("per_residue", True)):
                    n = n_keys if not per_residue else max(20, n_keys // 50)
                    sync.flushall()
                    base = sync.info("memory")["used_memory"]
                    keys = asyncio.run(fill(j + 1, per_residue, n))
                    used = sync.info("memory")["used_memory"] - base
                    usage = [sync.memory_usage(f"rdserve:emb:{k}", samples=0) for k in keys[:20]]
                    payload = 4 * dims[j] * (LENGTH if per_residue else 1)
                    row[mode] = {
                        "keys": n,
                        "payload_bytes": payload,
                        "memory_usage_bytes": float(np.median(usage)),
                        "used_memory_bytes_per_key": used / n,
                        "overhead_ratio": used / n / payload,
                    }
                out["levels"][name] = row
                print(
                    f"  k={dims[j]}: pooled {row['pooled']['used_memory_bytes_per_key']:.0f} B, "
                    f"per residue {row['per_residue']['used_memory_bytes_per_key'] / 1e6:.2f} MB",
                    flush=True,
                )
        finally:
            sync.close()
            server.stop()
    return out


# -- what grows with the fleet ------------------------------------------------------------------
def fleet_costs(sizes: list[int], filler_keys: int) -> dict[str, Any]:
    """Server µs of the commands whose cost grows with the fleet, on synthetic fleets of N
    consumers and heartbeat keys: XINFO CONSUMERS (each worker's dead-worker check), EXISTS
    (one per other consumer in that check), SCAN + MGET of heartbeats (each API, every second)
    in a queue Redis alone and in one shared with ``filler_keys`` cache entries."""
    out: dict[str, Any] = {"sizes": sizes, "filler_keys": filler_keys, "rows": []}
    with tempfile.TemporaryDirectory() as tmp:
        server = RedisServer(Path(tmp)).start()
        r = server.client()
        try:
            for n in sizes:
                r.flushall()
                stream = f"{PREFIX}:tasks:000000000000"
                r.xgroup_create(stream, "workers", id="0", mkstream=True)
                pipe = r.pipeline(transaction=False)
                for i in range(n):
                    pipe.xgroup_createconsumer(stream, "workers", f"w{i}/0000")
                    pipe.set(f"{PREFIX}:worker:w{i}/0000", "x" * 300, ex=600)
                pipe.execute()
                row: dict[str, Any] = {"workers": n}
                row["xinfo_consumers_us"] = _timed_cmd(
                    r, "xinfo|consumers", lambda s=stream: r.xinfo_consumers(s, "workers"), 20
                )
                row["exists_us"] = _timed_cmd(
                    r, "exists", lambda: r.exists(f"{PREFIX}:worker:w1/0000"), 200
                )

                def scan_heartbeats() -> None:
                    keys = list(r.scan_iter(match=f"{PREFIX}:worker:*", count=100))
                    r.mget(keys)

                row["scan_calls"], row["scan_refresh_us"] = _timed_refresh(r, scan_heartbeats)
                pipe = r.pipeline(transaction=False)
                for i in range(filler_keys):
                    pipe.set(f"rdserve:emb:{i:064x}", b"x" * 64)
                    if i % 10_000 == 9_999:
                        pipe.execute()
                pipe.execute()
                calls, us = _timed_refresh(r, scan_heartbeats)
                row["scan_calls_shared"], row["scan_refresh_us_shared"] = calls, us
                out["rows"].append(row)
                print(
                    f"  {n} workers: XINFO CONSUMERS {row['xinfo_consumers_us']:.0f} us, "
                    f"heartbeat SCAN+MGET {row['scan_refresh_us']:.0f} us "
                    f"({row['scan_refresh_us_shared']:.0f} us beside {filler_keys} cache keys)",
                    flush=True,
                )
        finally:
            r.close()
            server.stop()
    return out


def _timed_cmd(r: redis.Redis, name: str, fn: Callable[[], object], reps: int) -> float:
    """Server µs per call of one command (commandstats)."""
    r.config_resetstat()
    for _ in range(reps):
        fn()
    stat = r.info("commandstats")[f"cmdstat_{name}"]
    return stat["usec"] / stat["calls"]


def _timed_refresh(r: redis.Redis, fn: Callable[[], object]) -> tuple[int, float]:
    """Calls and server µs of one heartbeat refresh (SCAN pages + MGET), averaged over 5."""
    r.config_resetstat()
    for _ in range(5):
        fn()
    stats = r.info("commandstats")
    scan, mget = stats.get("cmdstat_scan", {}), stats.get("cmdstat_mget", {})
    calls = (scan.get("calls", 0) + mget.get("calls", 0)) / 5
    return round(calls), (scan.get("usec", 0) + mget.get("usec", 0)) / 5


def calibration(requests: int) -> dict[str, Any]:
    """This machine's Redis speed for plain commands: redis-benchmark (50 clients, no
    pipelining) SET and GET, and the server main thread's CPU µs per command — the unit that
    carries the per-request counts over to other machines."""
    import subprocess

    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        server = RedisServer(Path(tmp)).start()
        r = server.client()
        try:
            for cmd in ("set", "get"):
                before = snapshot(r)
                argv = ["redis-benchmark", "-p", str(server.port), "-n", str(requests)]
                p = subprocess.run(
                    [*argv, "-c", "50", "-t", cmd, "--csv"],
                    capture_output=True,
                    text=True,
                    check=True,
                    timeout=300,
                )
                d = delta(before, snapshot(r))
                row = [
                    ln for ln in p.stdout.splitlines() if ln.upper().startswith(f'"{cmd.upper()}')
                ]
                rps = float(row[0].split(",")[1].strip('"'))
                out[cmd] = {
                    "requests_per_s": rps,
                    "cpu_us_per_call": d["cpu_s"] / d["calls"][cmd] * 1e6,
                    "server_usec_per_call": d["usec"][cmd] / d["calls"][cmd],
                }
                print(
                    f"  redis-benchmark {cmd}: {rps:,.0f}/s, "
                    f"{out[cmd]['cpu_us_per_call']:.1f} us CPU per call",
                    flush=True,
                )
        finally:
            r.close()
            server.stop()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small counts (smoke test)")
    ap.add_argument("--out", type=Path, default=RESULTS / "redis_ops.json")
    args = ap.parse_args()
    t0 = time.perf_counter()
    refs, _ = chains(True)["tiny"]
    _, _, artifact = served_artifact(refs)
    logs = Path(tempfile.mkdtemp(prefix="rdserve-ops-logs-"))
    print("serving (tiny chain, CPU): Redis operations and CPU per request", flush=True)
    data: dict[str, Any] = {"serve": serve_phases(artifact, logs, args.quick)}
    print("Redis speed of this machine (redis-benchmark)", flush=True)
    data["calibration"] = calibration(20_000 if args.quick else 200_000)
    print("worker stop (SIGTERM -> exit, idle)", flush=True)
    data["worker_exit_s"] = worker_exit_s(artifact, logs, 1 if args.quick else 5)
    print("cache bytes per sequence (ESM-2 widths)", flush=True)
    data["cache_memory"] = cache_memory(200 if args.quick else 5000)
    print("what grows with the fleet", flush=True)
    sizes = [10, 100] if args.quick else [10, 100, 1000]
    data["fleet"] = fleet_costs(sizes, 10_000 if args.quick else 1_000_000)
    data["wall_s"] = round(time.perf_counter() - t0, 1)
    command = "python -m benchmarks.redis_ops" + (" --quick" if args.quick else "")
    out = args.out
    path = save(out.stem, data, command, results=out.parent)
    print(f"wrote {path}")
    json.loads(path.read_text())  # well-formed


if __name__ == "__main__":
    main()
