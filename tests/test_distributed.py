"""Distributed mode: real Redis, the API and workers as separate OS processes, real HTTP."""

from __future__ import annotations

import io
import socket
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
import redis

from app.core.tasks import Task, TaskResult, WorkItem
from app.transport.consumer import RedisTaskSource
from app.transport.keys import GROUP, tasks_key
from app.transport.wire import task_to_wire
from models.sequences import LongSequencePolicy, Pooling
from tests.harness import Cluster, cluster_env
from tests.helpers import make_task, metric, wait_ready
from tests.procs import RedisServer, clear_prefix, free_port, rdserve, wait_http

PREFIX = "rdserve-dist"
SEQS = ["MKTAYIAKQRQISFVKSHFSRQ", "GSHMLEDPVDAFQ", "MVLSPADKTNVKAAWGKVGAHAGEYGAEAL", "MKV"]


@pytest.fixture(scope="module")
def private_redis(tmp_path_factory):
    """This module's own redis-server on a free port (never the machine's shared one)."""
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def cluster(tiny_artifact, private_redis, tmp_path_factory):
    """An API process and one worker process (metrics on) over the private Redis."""
    c = Cluster(
        cluster_env(private_redis.url, tiny_artifact, PREFIX), tmp_path_factory.mktemp("logs")
    )
    c.worker("w1", metrics=True)
    try:
        c.wait_workers(1)
        yield c
    finally:
        c.close()


def post(base, **body):
    r = httpx.post(f"{base}/v1/embeddings", json=body, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def worker_forwards(url, level):
    text = httpx.get(url, timeout=5).text
    for line in text.splitlines():
        if line.startswith(f'rdserve_forward_duration_seconds_count{{level="{level}"}}'):
            return float(line.split()[-1])
    return 0.0


def test_results_equal_embedded_mode(cluster, make_app):
    c, _ = make_app()
    with c:
        wait_ready(c)
        for pooling, k in (("mean", 64), ("per_residue", 48), ("bos", 20)):
            body = {"input": SEQS, "dimensions": k, "pooling": pooling}
            emb = c.post("/v1/embeddings", json=body).json()
            dist = post(cluster.base, **body)
            assert dist["artifact_sha256"] == emb["artifact_sha256"]
            for a, b in zip(emb["data"], dist["data"], strict=True):
                np.testing.assert_allclose(
                    np.array(a["embedding"]), np.array(b["embedding"]), rtol=0, atol=1e-6
                )


def test_shared_nested_cache_in_redis(cluster, private_redis):
    seqs = ["MKWVTFISLLFLFSSAYS", "MDSKGSSQKGSRLLLLLVVSNLLLCQGVVS"]
    w = f"{cluster.metrics['w1']}/metrics"
    before = [worker_forwards(w, lv) for lv in ("tiny32", "tiny48", "tiny64")]
    low = post(cluster.base, input=seqs, dimensions=16)
    assert [d["cache"] for d in low["data"]] == ["miss", "miss"]
    high = post(cluster.base, input=seqs, dimensions=64)
    assert [d["cache"] for d in high["data"]] == ["partial", "partial"]
    after = [worker_forwards(w, lv) for lv in ("tiny32", "tiny48", "tiny64")]
    assert [b - a for a, b in zip(before, after, strict=True)] == [1, 1, 1]
    again = post(cluster.base, input=seqs, dimensions=50)
    assert [d["cache"] for d in again["data"]] == ["full_hit", "full_hit"]
    assert [worker_forwards(w, lv) for lv in ("tiny32", "tiny48", "tiny64")] == after
    r = private_redis.client()
    keys = list(r.scan_iter(match=f"{PREFIX}:emb:*"))
    assert len(keys) >= 2 and r.ttl(keys[0]) > 0
    assert set(r.hkeys(keys[0])) >= {b"m", b"0"}


def test_binary_output_and_metrics_over_real_http(cluster):
    r = httpx.post(
        f"{cluster.base}/v1/embeddings",
        json={"input": SEQS, "dimensions": 33},
        headers={"accept": "application/x-npy"},
        timeout=60,
    )
    arr = np.load(io.BytesIO(r.content))
    js = post(cluster.base, input=SEQS, dimensions=33)
    np.testing.assert_array_equal(arr, np.array([d["embedding"] for d in js["data"]], np.float32))
    text = httpx.get(f"{cluster.base}/metrics").text
    assert "rdserve_workers_live 1.0" in text
    ready = httpx.get(f"{cluster.base}/health/ready").json()
    assert ready["mode"] == "distributed" and ready["workers"] == 1


def test_second_worker_scales_out_and_survives_a_crash(cluster, tmp_path):
    w2 = rdserve(
        "worker",
        "--worker-id",
        "w2",
        "--metrics-port",
        "0",
        env=cluster.env,
        log=tmp_path / "w2.log",
    )
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            if httpx.get(f"{cluster.base}/health/ready").json()["workers"] == 2:
                break
            time.sleep(0.3)
        else:
            raise AssertionError(w2.output()[-3000:])
        rng = np.random.default_rng(0)
        seqs = ["".join(rng.choice(list("ACDEFGHIKLMNPQRSTVWY"), 40)) for _ in range(30)]
        served = {post(cluster.base, input=[s], dimensions=64)["data"][0]["cache"] for s in seqs}
        assert served == {"miss"}
        w2.stop()  # SIGTERM: the worker deregisters its heartbeat and exits cleanly
        deadline = time.monotonic() + 10
        while httpx.get(f"{cluster.base}/health/ready").json()["workers"] != 1:
            assert time.monotonic() < deadline
            time.sleep(0.3)
        assert post(cluster.base, input=["MKVLAAGG"], dimensions=8)["data"][0]["residues"] == 8
    finally:
        w2.stop()
    assert "worker w2 serving" in w2.output()


def test_more_concurrent_requests_than_redis_connections(cluster, tmp_path):
    """More concurrent requests than Redis connections (and than redis-py's default pool of 100)
    wait for a connection: no false 503s, no cache errors."""
    import asyncio

    port = free_port()
    env = {**cluster.env, "RDSERVE_REDIS_MAX_CONNECTIONS": "4"}
    api = rdserve("serve", "--port", str(port), env=env, log=tmp_path / "api.log")
    base = f"http://127.0.0.1:{port}"
    rng = np.random.default_rng(7)
    seqs = ["".join(rng.choice(list("ACDEFGHIKLMNPQRSTVWY"), 30)) for _ in range(120)]

    async def burst() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=base, timeout=60) as c:
            return await asyncio.gather(
                *(c.post("/v1/embeddings", json={"input": s, "dimensions": 64}) for s in seqs)
            )

    try:
        wait_http(f"{base}/health/ready", api)
        first = asyncio.run(burst())
        assert [r.status_code for r in first] == [200] * len(seqs), first[0].text
        again = asyncio.run(burst())
        assert {r.json()["data"][0]["cache"] for r in again} == {"full_hit"}
        errors = [
            float(line.split()[-1])
            for line in httpx.get(f"{base}/metrics").text.splitlines()
            if line.startswith("rdserve_cache_errors_total{")
        ]
        assert sum(errors) == 0
    finally:
        api.stop()
    assert "cache lookup failed" not in api.output()


def test_requests_sharing_a_client_request_id_get_their_own_results(cluster, make_app):
    """X-Request-ID is the client's label for logs, never the job id: concurrent requests that
    share one each get their own embedding (they used to receive each other's, and cache it)."""
    import asyncio

    rng = np.random.default_rng(11)
    seqs = ["".join(rng.choice(list("ACDEFGHIKLMNPQRSTVWY"), 60)) for _ in range(8)]

    async def burst() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=cluster.base, timeout=30) as c:
            return await asyncio.gather(
                *(
                    c.post(
                        "/v1/embeddings",
                        json={"input": s, "dimensions": 64},
                        headers={"x-request-id": "same-id"},
                    )
                    for s in seqs
                )
            )

    got = asyncio.run(burst())
    assert [r.status_code for r in got] == [200] * len(seqs)
    assert {r.headers["x-request-id"] for r in got} == {"same-id"}
    c, _ = make_app()
    with c:
        wait_ready(c)
        want = c.post("/v1/embeddings", json={"input": seqs, "dimensions": 64}).json()["data"]
    for r, w in zip(got, want, strict=True):
        np.testing.assert_allclose(r.json()["data"][0]["embedding"], w["embedding"], atol=1e-5)


def test_no_worker_gives_503(private_redis, tiny_artifact, tmp_path):
    p = f"rdserve-test-{uuid.uuid4().hex[:8]}"
    port = free_port()
    env = {
        "RDSERVE_REDIS_URL": private_redis.url,
        "RDSERVE_REDIS_PREFIX": p,
        "RDSERVE_ARTIFACT": str(tiny_artifact),
    }
    api = rdserve("serve", "--port", str(port), env=env, log=tmp_path / "api.log")
    try:
        ready = wait_http(f"http://127.0.0.1:{port}/health/ready", api, status=503).json()
        assert ready["workers"] == 0 and ready["status"] != "ready"
        r = httpx.post(f"http://127.0.0.1:{port}/v1/embeddings", json={"input": "MKV"}, timeout=10)
        assert r.status_code == 503 and r.json()["error"]["code"] == "no_worker"
    finally:
        api.stop()
        clear_prefix(private_redis.url, p)


def test_scale_to_zero_queues_a_request_until_a_worker_starts(
    private_redis, tiny_artifact, tmp_path, make_app
):
    """RDSERVE_WORKER_WAKE_S: with no worker the API is idle (200), queues the request (the
    backlog KEDA reads) and answers it once a worker has started."""
    p = f"rdserve-test-{uuid.uuid4().hex[:8]}"
    c = Cluster(
        cluster_env(private_redis.url, tiny_artifact, p, RDSERVE_WORKER_WAKE_S="60"), tmp_path
    )
    try:
        ready = wait_http(f"{c.base}/health/ready", c.api).json()
        assert (ready["status"], ready["reason"], ready["workers"]) == ("idle", "no_worker", 0)
        sha = httpx.get(f"{c.base}/info", timeout=5).json()["artifact_sha256"]
        with ThreadPoolExecutor(1) as pool:
            answer = pool.submit(
                httpx.post,
                f"{c.base}/v1/embeddings",
                json={"input": ["MKTAYIAK", "GSHMLE"], "dimensions": 64},
                timeout=150,
            )
            r = redis.Redis.from_url(private_redis.url)
            deadline = time.monotonic() + 30
            while r.xlen(tasks_key(p, sha)) == 0:  # queued with nobody to take it
                assert time.monotonic() < deadline and not answer.done()
                time.sleep(0.1)
            # What an HPA on Prometheus metrics reads instead of Redis: one task waiting.
            with httpx.Client(base_url=c.base, timeout=5) as api:
                assert metric(api, "rdserve_queue_lag", queue="tasks") == 1
            c.worker("w1")  # what the autoscaler does on seeing the backlog
            got = answer.result()
        assert got.status_code == 200, got.text
        app, _ = make_app()
        with app:
            wait_ready(app)
            want = app.post(
                "/v1/embeddings", json={"input": ["MKTAYIAK", "GSHMLE"], "dimensions": 64}
            ).json()["data"]
        for g, w in zip(got.json()["data"], want, strict=True):
            np.testing.assert_allclose(g["embedding"], w["embedding"], atol=1e-5)
        c.wait_workers(1)
    finally:
        c.close()
        clear_prefix(private_redis.url, p)


def test_a_wake_time_must_fit_in_the_request_deadline():
    """Waiting for a worker past the request's deadline would end in a 504 nobody retries."""
    from app.settings import Settings

    with pytest.raises(ValueError, match=r"worker_wake_s .* must be below request_timeout_s"):
        Settings(worker_wake_s=120, request_timeout_s=120)
    assert Settings(worker_wake_s=60, request_timeout_s=120).worker_wake_s == 60


def test_stale_jobs_of_a_dead_worker_are_claimed(private_redis, tiny_artifact):
    """A job read by a consumer that died (never acked) is taken over after claim_idle_s."""
    p = f"rdserve-test-{uuid.uuid4().hex[:8]}"
    r = redis.Redis.from_url(private_redis.url)
    try:
        dead = RedisTaskSource(r, p, "x", "dead", claim_idle_s=0.2)
        job = Task(
            id="j1",
            artifact="x",
            pooling=Pooling.mean,
            policy=LongSequencePolicy.truncate,
            items=[WorkItem("MKV", 0, 0, None)],
            deadline=time.time() + 60,
            reply_to=f"{p}:replies:test",
        )
        r.xadd(tasks_key(p, "x"), {"d": task_to_wire(job)})
        assert [j.id for j in dead.take(1, 0)] == ["j1"]  # read, then the worker "dies"
        alive = RedisTaskSource(r, p, "x", "alive", claim_idle_s=0.2)
        assert alive.take(1, 0) == []  # nothing new and not yet idle long enough
        time.sleep(0.3)
        alive._last_claim = 0.0
        taken = alive.take(1, 0)
        assert [j.id for j in taken] == ["j1"]
        alive.reply(taken[0], TaskResult("j1", error="x", code="internal"))
        assert r.xpending(tasks_key(p, "x"), GROUP)["pending"] == 0
        assert r.xlen(f"{p}:replies:test") == 1
    finally:
        clear_prefix(private_redis.url, p)
        r.close()


def test_cache_failure_never_fails_a_request(tiny_artifact):
    """Redis down for the cache: lookups degrade to misses, stores are skipped, answers flow."""
    import asyncio

    import redis.asyncio as aioredis
    from fastapi.testclient import TestClient

    from app.bootstrap import embedded_service
    from app.core.cache import RedisCache
    from app.http.app import create_app
    from app.settings import Settings
    from models.artifact import load_artifact

    art = load_artifact(tiny_artifact)
    service = embedded_service(Settings(artifact=tiny_artifact, device="cpu"), art)
    dead = aioredis.from_url(
        f"redis://127.0.0.1:{free_port()}/0", socket_connect_timeout=0.2, socket_timeout=0.2
    )
    service.cache = RedisCache(dead, "x", 3, art.dims, 60)
    with TestClient(create_app(service)) as c:
        wait_ready(c)
        errs = metric(c, "rdserve_cache_errors_total", op="get")
        r = c.post("/v1/embeddings", json={"input": ["MKV", "GGG"], "dimensions": 40})
        assert r.status_code == 200 and [d["cache"] for d in r.json()["data"]] == ["miss", "miss"]
        assert metric(c, "rdserve_cache_errors_total", op="get") == errs + 1
        assert metric(c, "rdserve_cache_errors_total", op="put") >= 1
    asyncio.run(dead.aclose())


def test_worker_liveness_endpoint_reports_a_stalled_loop():
    """/health/live on the worker's metrics port: 200 while the loop turns, 503 once it stalls."""
    from app.core.worker import WorkerState
    from app.http.worker_endpoint import WorkerEndpoint

    state = WorkerState("w-test", 2)
    state.running = True
    turn = {"t": time.time()}
    endpoint = WorkerEndpoint("127.0.0.1", 0)  # 0: any free port
    endpoint.serve(state, lambda: turn["t"], stall_s=5)
    base = f"http://127.0.0.1:{endpoint.port}"
    try:
        r = httpx.get(f"{base}/health/live")
        assert r.status_code == 200 and r.json()["status"] == "live"
        turn["t"] -= 10
        r = httpx.get(f"{base}/health/live")
        assert r.status_code == 503 and r.json()["status"] == "stalled"
        assert "rdserve_worker_up" in httpx.get(f"{base}/metrics").text
    finally:
        endpoint.shutdown()


def listening_address(port: int) -> str:
    """The IPv4 address a local TCP socket listens on for this port (from /proc/net/tcp)."""
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        local, state = line.split()[1], line.split()[3]
        addr, _, hexport = local.partition(":")
        if state == "0A" and int(hexport, 16) == port:  # 0A: LISTEN
            return socket.inet_ntoa(bytes.fromhex(addr)[::-1])
    raise AssertionError(f"nothing listens on port {port}")


def test_worker_endpoint_answers_probes_past_idle_connections_and_only_its_paths(cluster):
    """The worker's metrics port is threaded with socket timeouts: connections that never finish
    their request line do not delay /health/live (they made every probe time out: one thread
    served one connection at a time), and are dropped; only /metrics and /health/live exist;
    it binds the configured address (default 127.0.0.1)."""
    base = cluster.metrics["w1"]
    port = int(base.rsplit(":", 1)[1])
    idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(5)]
    try:
        for s in idle:
            s.sendall(b"GET /health/li")  # a request line that never ends
        for _ in range(3):
            r = httpx.get(f"{base}/health/live", timeout=4)
            assert r.status_code == 200 and r.json()["status"] == "live"
        assert "rdserve_worker_up 1.0" in httpx.get(f"{base}/metrics", timeout=4).text
        for path in ("/", "/metrics/x", "/health", "/anything"):
            r = httpx.get(f"{base}{path}", timeout=4)
            assert r.status_code == 404 and r.json()["error"]["code"] == "not_found", path
        assert httpx.post(f"{base}/metrics", timeout=4).status_code == 405
        assert listening_address(port) == "127.0.0.1"
        idle[0].settimeout(30)
        assert idle[0].recv(1024) == b""  # dropped by the server's socket timeout
    finally:
        for s in idle:
            s.close()


def test_redis_queue_is_bounded_atomically(private_redis):
    """XLEN check and XADD in one Lua call: the (max_queue+1)-th job is refused, not queued."""
    import asyncio
    import json as _json

    import redis.asyncio as aioredis

    from app.core.dispatch import QueueFullError
    from app.transport.dispatcher import RedisDispatcher
    from app.transport.keys import worker_key, workers_key

    p = f"rdserve-test-{uuid.uuid4().hex[:8]}"

    async def scenario():
        r = aioredis.from_url(private_redis.url)
        # A live (but idle) worker heartbeat for this artifact, so jobs are accepted.
        await r.set(
            worker_key(p, "sha", "idle"),
            _json.dumps(
                {
                    "id": "idle",
                    "artifact": "sha",
                    "running": True,
                    "loaded": [True],
                    "ready": [True],
                    "error": None,
                }
            ),
            ex=30,
        )
        await r.sadd(workers_key(p, "sha"), "idle")  # the registry the API reads
        d = RedisDispatcher(r, p, "sha", 1, max_queue=2)
        await d.start()
        jobs = [
            make_task(f"j{i}", "sha", [WorkItem("MKV", 0, 0)], time.time() + 60) for i in range(3)
        ]
        waiting = [asyncio.create_task(d.submit(j, 5)) for j in jobs[:2]]
        await asyncio.sleep(0.2)
        try:
            await d.submit(jobs[2], 5)
            raise AssertionError("expected QueueFullError")
        except QueueFullError:
            pass
        assert await r.xlen(tasks_key(p, "sha")) == 2 and await d.queue_depth() == 2
        await r.xtrim(tasks_key(p, "sha"), maxlen=0)  # workers took everything: the gauge follows
        assert await d.queue_depth() == 0
        for t in waiting:
            t.cancel()
        await d.stop()
        await r.aclose()

    try:
        asyncio.run(scenario())
    finally:
        clear_prefix(private_redis.url, p)


def test_a_reply_faster_than_the_enqueue_round_trip_is_delivered(private_redis):
    """A worker may answer before the XADD's own reply reaches the API: the request must be
    registered by then (it used to be registered after, and such a reply was discarded as
    'expired' while the client waited for a 504 — about 1 in 5,000 jobs under load)."""
    import asyncio
    import json as _json

    import redis.asyncio as aioredis

    from app.transport.dispatcher import RedisDispatcher
    from app.transport.keys import worker_key, workers_key
    from app.transport.wire import result_to_wire

    p = f"rdserve-test-{uuid.uuid4().hex[:8]}"

    async def scenario() -> TaskResult:
        r = aioredis.from_url(private_redis.url)
        beat = {"id": "w", "artifact": "sha", "running": True, "loaded": [True], "ready": [True]}
        await r.set(worker_key(p, "sha", "w"), _json.dumps(beat), ex=30)
        await r.sadd(workers_key(p, "sha"), "w")
        d = RedisDispatcher(r, p, "sha", 1, max_queue=10)
        enqueue = d._enqueue

        async def enqueue_then_answer_at_once(**kw):
            out = await enqueue(**kw)
            # The worker's answer lands and is read before the XADD's result is seen here.
            await r.xadd(d.reply_key, {"d": result_to_wire(TaskResult("j1", error="e"))})
            await asyncio.sleep(1.5)
            return out

        d._enqueue = enqueue_then_answer_at_once
        await d.start()
        job = make_task("j1", "sha", [WorkItem("MKV", 0, 0)], time.time() + 60)
        try:
            return await d.submit(job, 3)
        finally:
            await d.stop()
            await r.aclose()

    try:
        assert asyncio.run(scenario()).id == "j1"
    finally:
        clear_prefix(private_redis.url, p)
