"""Bulk jobs on the fleet: real API and worker processes over a private Redis with the shipped
ACL users, the tiny real models, and crashes — a worker SIGKILLed and restarted, the API that
accepted the job SIGKILLed (another replica takes the job over and answers for it), Redis
restarted without persistence. Every record must come back exactly once and equal to an
in-process embedding. Also: interactive tasks go before queued bulk chunks, and a turn of
chunks lets requests that arrive meanwhile run between its batches."""

from __future__ import annotations

import asyncio
import io
import signal
import threading
import time

import httpx
import numpy as np
import pytest

from app import metrics as m
from app.core.dispatch import LocalQueue
from app.core.tasks import WorkItem
from app.core.worker import Worker
from app.transport.consumer import RedisTaskSource
from app.transport.keys import bulk_key, tasks_key
from app.transport.wire import task_to_wire
from models.artifact import load_artifact
from models.blocks import assemble
from models.embedder import Embedder
from tests.harness import Cluster, SecuredRedis, cluster_env, scrape
from tests.helpers import make_task
from tests.procs import free_port, rdserve, wait_http

PREFIX = "rdserve-jobs"
AA = list("ACDEFGHIKLMNPQRSTVWY")
#: Fast takeover: a dead API's jobs are picked up ~3 s after its last lease renewal.
FAST = {
    "RDSERVE_JOB_LEASE_S": "3",
    "RDSERVE_JOB_POLL_S": "0.5",
    "RDSERVE_JOB_CHUNK_RESIDUES": "2048",
    "RDSERVE_TOKEN_BUDGET": "2048",
}


def records(seed: int, n: int, lo: int = 60, hi: int = 140) -> list[tuple[str, str]]:
    rng = np.random.default_rng(seed)
    return [(f"r{i}", "".join(rng.choice(AA, int(rng.integers(lo, hi + 1))))) for i in range(n)]


def fasta(recs: list[tuple[str, str]]) -> bytes:
    return "".join(f">{name}\n{seq}\n" for name, seq in recs).encode()


@pytest.fixture
def redis_server(tmp_path):
    server = SecuredRedis(tmp_path, PREFIX).start()
    yield server
    server.stop()


@pytest.fixture
def fleet(redis_server, tiny_artifact, tmp_path):
    """A cluster (one API, workers on demand) and extra API replicas sharing its job store."""
    logs = tmp_path / "cluster"
    logs.mkdir()
    env = cluster_env(redis_server.url, tiny_artifact, PREFIX, **FAST)
    c = Cluster(env, logs, redis_server.role_env)
    replicas = []

    def replica() -> str:
        port = free_port()
        p = rdserve(
            "serve",
            "--port",
            str(port),
            env={**c.env, **redis_server.role_env("api")},
            log=logs / f"api{len(replicas) + 2}.log",
        )
        replicas.append(p)
        wait_http(f"http://127.0.0.1:{port}/health/live", p)
        return f"http://127.0.0.1:{port}"

    c.replica = replica
    c.replicas = replicas
    yield c
    for p in replicas:
        p.stop()
    c.close()


def reference(artifact, recs, k: int) -> dict[str, np.ndarray]:
    emb = Embedder.from_artifact(artifact, device="cpu")
    stop = emb.artifact.level_for_dim(k)
    out = emb.compute([s for _, s in recs], stop=stop)
    return {name: assemble(r.blocks, k, False) for (name, _), r in zip(recs, out, strict=True)}


def status(base: str, job_id: str) -> dict:
    return httpx.get(f"{base}/v1/jobs/{job_id}", timeout=10).json()


def wait_until(pred, what: str, timeout: float = 120, every: float = 0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (got := pred()) is not None:
            return got
        time.sleep(every)
    raise AssertionError(f"timed out waiting for {what}")


def check_result(base: str, job_id: str, want: dict[str, np.ndarray]) -> None:
    """Every record exactly once, in order, equal to the in-process embedding."""
    r = httpx.get(f"{base}/v1/jobs/{job_id}/result", timeout=60)
    assert r.status_code == 200, r.text
    with np.load(io.BytesIO(r.content)) as z:
        assert z.files == list(want)
        for name, w in want.items():
            np.testing.assert_allclose(z[name], w, rtol=1e-4, atol=1e-5, err_msg=name)
    ids = httpx.get(f"{base}/v1/jobs/{job_id}/result", params={"format": "ids"}, timeout=60)
    assert ids.text.split() == list(want)


def test_a_job_survives_a_worker_crash_and_the_death_of_its_api(fleet, tiny_artifact):
    """Two workers share the job; one is SIGKILLed and restarted under its id mid-job; then the
    API that accepted the job is SIGKILLed: a second replica takes the job over once its lease
    expires, finishes it, and answers its status and result."""
    c = fleet
    c.worker("w1", metrics=True)
    c.worker("w2", metrics=True)
    c.wait_workers(2)
    other = c.replica()
    # Long enough (~70 chunks) that the job is still running when the API is killed after 8:
    # status reads the store, where chunks land in bursts on a quiet machine.
    recs = records(1, 2000)
    r = httpx.post(
        f"{c.base}/v1/jobs",
        params={"dimensions": 48},
        content=fasta(recs),
        headers={"content-type": "text/x-fasta"},
        timeout=60,
    )
    assert r.status_code == 202, r.text
    job = r.json()["id"]
    total = r.json()["chunks"]["total"]
    assert total >= 60, r.json()

    def chunks_done(n: int):
        return lambda: ((j := status(c.base, job))["chunks"]["done"] >= n and j) or None

    wait_until(chunks_done(3), "3 chunks")
    c.restart_worker("w1", metrics=False)
    j = wait_until(chunks_done(8), "8 chunks")
    assert j["status"] == "running" and j["chunks"]["done"] < total, j
    c.api.signal(signal.SIGKILL)
    c.api.wait(10)
    j = wait_until(
        lambda: ((s := status(other, job))["status"] == "succeeded" and s) or None,
        "the other replica to finish the job",
    )
    assert j["records"] == {"total": 2000, "done": 2000} and j["failed"] == 0, j
    assert "driving job" in c.replicas[0].output()
    check_result(other, job, reference(tiny_artifact, recs, 48))
    assert scrape(c.metrics["w2"], "rdserve_residues_total", level="tiny32") > 0  # both worked
    assert "claimed tasks of a dead worker" in c.output() or j["chunks"]["done"] == total


def test_a_job_survives_a_redis_restart(fleet, redis_server, tiny_artifact):
    c = fleet
    c.worker("w1")
    c.wait_workers(1)
    recs = records(2, 500)
    job = httpx.post(
        f"{c.base}/v1/jobs",
        json={"input": [s for _, s in recs], "ids": [n for n, _ in recs], "dimensions": 64},
        timeout=60,
    ).json()["id"]
    wait_until(lambda: status(c.base, job)["chunks"]["done"] >= 3 or None, "3 chunks")
    redis_server.stop()
    time.sleep(1.0)
    redis_server.start()
    j = wait_until(
        lambda: ((s := status(c.base, job))["status"] in ("succeeded", "failed") and s) or None,
        "the job to end",
    )
    assert j["status"] == "succeeded" and j["records"]["done"] == 500, j
    check_result(c.base, job, reference(tiny_artifact, recs, 64))


# ---- bulk chunks yield to interactive requests (a real worker loop and a real Redis) ---------


def test_a_worker_takes_interactive_tasks_before_queued_bulk_chunks(redis_server, tiny_artifact):
    art = load_artifact(tiny_artifact)
    client = redis_server.client()
    source = RedisTaskSource(client, PREFIX, art.sha256, "w/1", claim_idle_s=300)
    item = [WorkItem("MKV", 0, 0)]
    for i in range(3):
        bulk = make_task(f"b{i}", art.sha256, item)
        bulk.bulk = True
        client.xadd(bulk_key(PREFIX, art.sha256), {"d": task_to_wire(bulk)})
    client.xadd(
        tasks_key(PREFIX, art.sha256), {"d": task_to_wire(make_task("i0", art.sha256, item))}
    )
    assert [t.id for t in source.take(10**6, 0.01)] == ["i0"]  # the request first, alone
    assert [t.id for t in source.take(10**6, 0.01)] == ["b0"]  # then one chunk per turn
    assert source.urgent(10**6) == []
    assert [t.id for t in source.take(10**6, 0.01)] == ["b1"]


def test_a_turn_of_bulk_chunks_serves_requests_between_its_batches(tiny_artifact):
    """A bulk chunk of many batches is being computed when a request arrives: the request is
    answered first, and the chunk still completes."""
    emb = Embedder.from_artifact(tiny_artifact, device="cpu", token_budget=256)
    source = LocalQueue()
    w = Worker(emb, source, "w", 0.001)
    loop_thread = threading.Thread(target=w.run, daemon=True)
    loop_thread.start()

    async def scenario() -> list[str]:
        loop = asyncio.get_running_loop()
        done: list[str] = []
        rng = np.random.default_rng(3)
        seqs = ["".join(rng.choice(AA, 200)) for _ in range(120)]  # ~100 batches of 256 tokens
        bulk = make_task("bulk", emb.artifact.sha256, [WorkItem(s, 0, 2) for s in seqs])
        bulk.bulk = True
        fb, fi = loop.create_future(), loop.create_future()
        fb.add_done_callback(lambda _: done.append("bulk"))
        fi.add_done_callback(lambda _: done.append("request"))
        source.put(bulk, loop, fb)
        while source.queued() != (0, 0):  # the worker holds the chunk
            await asyncio.sleep(0.005)
        await asyncio.sleep(0.05)
        req = make_task("req", emb.artifact.sha256, [WorkItem("MKTAYIAKQRQ", 0, 2)])
        source.put(req, loop, fi)
        await asyncio.gather(fb, fi)
        assert not fb.result().error and len(fb.result().items) == 120
        return done

    before = m.BULK_YIELDS._value.get()
    try:
        assert asyncio.run(scenario()) == ["request", "bulk"]
    finally:
        w.stop()
        loop_thread.join(30)
    assert m.BULK_YIELDS._value.get() == before + 1
