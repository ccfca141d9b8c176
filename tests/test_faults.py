"""Faults: batch failures and device OOM, worker crashes, Redis outages, graceful shutdown.

Real processes (API, workers), a private redis-server that the tests stop and restart, real
HTTP and the tiny random-weight ESM-2 chain.  Only the GPU's out-of-memory error is simulated
(there is no GPU here): a wrapped forward raises torch.OutOfMemoryError.
"""

from __future__ import annotations

import signal
import time

import httpx
import numpy as np
import pytest
import torch

from app.core.tasks import WorkItem
from app.core.worker import Worker
from app.transport.keys import GROUP, tasks_key, worker_key
from models.artifact import load_artifact
from models.blocks import ItemFailure
from models.embedder import Embedder, EmbeddingError
from models.families import build_chain
from tests.harness import Cluster, Request, cluster_env, scrape
from tests.helpers import make_task, metric, wait_ready
from tests.procs import RedisServer, free_port, rdserve, wait_http

AA = list("ACDEFGHIKLMNPQRSTVWY")
PREFIX = "rdserve-faults"


def proteins(seed: int, n: int, lo: int, hi: int) -> list[str]:
    rng = np.random.default_rng(seed)
    return ["".join(rng.choice(AA, int(rng.integers(lo, hi + 1)))) for _ in range(n)]


# ---- batch failures and out-of-memory (in-process, real model code) --------------------------


@pytest.fixture
def faulty_embedder(tiny_artifact):
    """An Embedder whose forward raises CUDA-style OOM for batches over `max_rows` rows or
    holding a sequence longer than `poison_len` (the one thing here that cannot be real)."""
    art = load_artifact(tiny_artifact)
    family = build_chain("esm2", levels=list(art.levels), device="cpu")
    inner = family.forward
    limits = {"max_rows": 10**9, "poison_len": 10**9}
    calls: list[int] = []

    def forward(level, batch):
        rows, width = batch.input_ids.shape
        calls.append(rows)
        if rows > limits["max_rows"] or width - 2 > limits["poison_len"]:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return inner(level, batch)

    family.forward = forward
    return Embedder(family, art, token_budget=4096), limits, calls


def test_an_oom_batch_is_split_until_it_fits(faulty_embedder, tiny_artifact):
    embedder, limits, calls = faulty_embedder
    seqs = proteins(1, 24, 20, 40)
    want = embedder.compute(seqs, stop=2)
    assert max(calls) > 3  # without a limit the plan has big batches
    calls.clear()
    limits["max_rows"] = 3
    got = embedder.compute(seqs, stop=2)
    assert max(calls) > 3 and calls.count(3) + calls.count(2) + calls.count(1) > 0
    for a, b in zip(got, want, strict=True):
        assert a.residues == b.residues
        for x, y in zip(a.blocks, b.blocks, strict=True):
            np.testing.assert_allclose(x, y, atol=1e-5)


def test_a_sequence_failing_alone_fails_only_itself(faulty_embedder):
    embedder, limits, _ = faulty_embedder
    seqs = proteins(2, 12, 20, 40)
    seqs[5] = proteins(3, 1, 90, 90)[0]
    limits["poison_len"] = 60
    out = {}
    for done in embedder.iter_compute(seqs, stop=2):
        out.update(done)
    assert sorted(out) == list(range(12))
    assert isinstance(out[5], ItemFailure) and out[5].out_of_memory
    assert "out of memory" in out[5].message
    assert all(not isinstance(out[i], ItemFailure) for i in range(12) if i != 5)
    with pytest.raises(EmbeddingError, match="sequence 5: OutOfMemoryError"):
        embedder.compute(seqs, stop=2)


def test_worker_answers_other_items_and_jobs_and_keeps_serving(faulty_embedder, tiny_artifact):
    embedder, limits, _ = faulty_embedder
    art = embedder.artifact
    limits["poison_len"] = 60
    good, poison = proteins(4, 3, 20, 40), proteins(5, 1, 90, 90)[0]
    replies = {}

    class Source:
        def take(self, budget, wait_s):
            return []

        def reply(self, job, result):
            replies[job.id] = result

    worker = Worker(embedder, Source(), "w", 0.0)
    deadline = time.time() + 60
    mixed = make_task("a", art.sha256, [], deadline)
    mixed.items = [WorkItem(s, 0, 2) for s in [good[0], poison, good[1]]]
    clean = make_task("b", art.sha256, [WorkItem(good[2], 0, 2)], deadline)
    worker.process([mixed, clean])
    a, b = replies["a"], replies["b"]
    assert a.error is None and [it.error is None for it in a.items] == [True, False, True]
    assert a.items[1].code == "out_of_memory" and "out of memory" in a.items[1].error
    assert len(a.items[0].blocks) == 3 and b.error is None and len(b.items[0].blocks) == 3
    worker.process([make_task("c", art.sha256, [WorkItem(good[0], 0, 0)], deadline)])
    assert replies["c"].error is None  # the worker keeps serving


def test_api_names_the_failed_item_and_caches_the_rest(make_app):
    c, service = make_app()
    family = service.dispatcher.worker.embedder.family
    inner = family.forward

    def forward(level, batch):
        if batch.input_ids.shape[1] - 2 > 60:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return inner(level, batch)

    family.forward = forward
    good, poison = proteins(6, 2, 20, 40), proteins(7, 1, 90, 90)[0]
    with c:
        wait_ready(c)
        failures = metric(c, "rdserve_item_failures_total", reason="out_of_memory")
        r = c.post("/v1/embeddings", json={"input": [good[0], poison, good[1]]})
        err = r.json()["error"]
        assert r.status_code == 500 and err["param"] == "input[1]"
        assert err["code"] == "out_of_memory" and "long_sequence_policy" in err["message"]
        assert metric(c, "rdserve_item_failures_total", reason="out_of_memory") == failures + 1
        again = c.post("/v1/embeddings", json={"input": good})
        assert [d["cache"] for d in again.json()["data"]] == ["full_hit", "full_hit"]


# ---- distributed mode: real processes and a private Redis ------------------------------------


@pytest.fixture
def cluster(redis_server, tiny_artifact, tmp_path):
    made: list[Cluster] = []

    def make(**extra: str) -> Cluster:
        c = Cluster(cluster_env(redis_server.url, tiny_artifact, PREFIX, **extra), tmp_path)
        made.append(c)
        return c

    yield make
    for c in made:
        c.close()


def big_body(seed: int, n: int = 256) -> dict:
    """Seconds of tiny-model compute: long enough to crash a worker in the middle of it."""
    return {"input": proteins(seed, n, 300, 400), "dimensions": 64}


def pending_at(r, consumer: str | None = None, timeout: float = 60) -> str:
    """Wait until a consumer holds a job (it is computing); returns that consumer's name."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        info = r.xpending(tasks_key(PREFIX), GROUP) if r.exists(tasks_key(PREFIX)) else None
        for c in (info or {}).get("consumers", []):
            name = c["name"].decode()
            if c["pending"] and (consumer is None or name == consumer):
                return name
        time.sleep(0.05)
    raise AssertionError("no job became pending")


def check_values(tiny_artifact, body: dict, resp: httpx.Response, sample: int = 8) -> None:
    """Response order and values equal an in-process computation (a sample of the items)."""
    assert resp.status_code == 200, resp.text
    art = load_artifact(tiny_artifact)
    emb = Embedder(build_chain("esm2", levels=list(art.levels), device="cpu"), art)
    data = resp.json()["data"]
    assert [d["index"] for d in data] == list(range(len(body["input"])))
    idx = np.linspace(0, len(data) - 1, sample).astype(int)
    want, _ = emb.embed([body["input"][i] for i in idx], body["dimensions"])
    for i, w in zip(idx, want, strict=True):
        np.testing.assert_allclose(data[i]["embedding"], w, atol=1e-5)


def test_sigkilled_worker_jobs_are_finished_by_another(cluster, redis_server, tiny_artifact):
    """SIGKILL mid-batch: the survivor claims the dead worker's jobs once its heartbeat expires
    (claim_idle_s is 300 s here, so only dead-worker detection can save the requests)."""
    c = cluster(RDSERVE_CLAIM_IDLE_S="300")
    ports = {"w1": str(free_port()), "w2": str(free_port())}
    for name in ("w1", "w2"):
        c.worker(name, RDSERVE_METRICS_PORT=ports[name])
    c.wait_workers(2)
    bodies = [big_body(seed) for seed in (10, 11)]
    reqs = [Request(c.base, b, timeout=60) for b in bodies]
    for q in reqs:
        q.start()
    victim = pending_at(redis_server.client())
    time.sleep(0.3)  # well inside its batch
    c.workers[victim].signal(signal.SIGKILL)
    survivor = "w2" if victim == "w1" else "w1"
    for q, b in zip(reqs, bodies, strict=True):
        check_values(tiny_artifact, b, q.result())
    survivor_metrics = f"http://127.0.0.1:{ports[survivor]}"
    assert scrape(survivor_metrics, "rdserve_tasks_reclaimed_total", reason="dead") >= 1
    r = redis_server.client()
    assert r.xpending(tasks_key(PREFIX), GROUP)["pending"] == 0
    assert r.xlen(tasks_key(PREFIX)) == 0


def test_no_worker_left_gives_503_not_a_hang(cluster, redis_server, tiny_artifact):
    c = cluster(RDSERVE_CLAIM_IDLE_S="300", RDSERVE_REQUEST_TIMEOUT_S="120")
    c.worker("w1")
    c.wait_workers(1)
    q = Request(c.base, big_body(20), timeout=60)
    q.start()
    pending_at(redis_server.client(), "w1")
    c.workers["w1"].signal(signal.SIGKILL)
    r = q.result()  # 503 within seconds, not the 120 s request timeout (the client gives up at 60)
    assert r.status_code == 503 and r.json()["error"]["code"] == "no_worker", r.text
    assert "Retry-After" in r.headers
    # The abandoned job is withdrawn: a new worker serves new requests and never computes it.
    c.worker("w3")
    c.wait_workers(1)
    ok = httpx.post(f"{c.base}/v1/embeddings", json={"input": "MKVLAAGG"}, timeout=60)
    assert ok.status_code == 200, ok.text
    red = redis_server.client()
    assert red.xlen(tasks_key(PREFIX)) == 0
    time.sleep(1.5)  # w3's dead-worker check has run (every heartbeat period)
    assert "claimed tasks" not in c.workers["w3"].output()


def test_a_job_computed_twice_is_delivered_once(cluster, redis_server, tiny_artifact):
    """claim_idle_s shorter than the batch: the idle worker takes the job over while the first
    still computes it; both reply, the request gets exactly one answer."""
    c = cluster(RDSERVE_CLAIM_IDLE_S="0.5")
    c.worker("w1")
    c.worker("w2")
    c.wait_workers(2)  # both ready before the job: the idle one claims it within ~0.6 s
    body = big_body(30)
    q = Request(c.base, body, timeout=90)
    q.start()
    holder = pending_at(redis_server.client())
    idle = "w2" if holder == "w1" else "w1"
    check_values(tiny_artifact, body, q.result())
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if scrape(c.base, "rdserve_replies_discarded_total", reason="duplicate") == 1:
            break
        time.sleep(0.5)
    else:
        raise AssertionError(c.output())
    assert "claimed tasks pending too long" in c.workers[idle].output()


def test_redis_outage_gives_503_and_recovers_without_restarts(cluster, redis_server):
    c = cluster()
    w = c.worker("w1")
    c.wait_workers(1)
    seqs = proteins(40, 3, 20, 40)
    post = lambda body: httpx.post(f"{c.base}/v1/embeddings", json=body, timeout=30)  # noqa: E731
    assert post({"input": seqs[0]}).status_code == 200
    redis_server.stop()
    r = post({"input": seqs[1]})
    assert r.status_code == 503, r.text
    assert r.json()["error"]["code"] == "queue_unavailable" and "Retry-After" in r.headers
    time.sleep(1.1)  # the fleet status is cached for 1 s
    ready = httpx.get(f"{c.base}/health/ready", timeout=10)
    assert ready.status_code == 503 and "redis unavailable" in ready.json()["error"]
    redis_server.start()  # same port, empty (no persistence)
    c.wait_workers(1, timeout=60)
    first = post({"input": seqs[1]})
    assert first.status_code == 200 and first.json()["data"][0]["cache"] == "miss"
    assert post({"input": seqs[1]}).json()["data"][0]["cache"] == "full_hit"
    assert c.api.alive() and w.alive()  # recovered on their own


def test_cache_redis_down_only_costs_recomputes(cluster, redis_server, tmp_path):
    (tmp_path / "cache").mkdir()
    cache_server = RedisServer(tmp_path / "cache")
    c = cluster(RDSERVE_CACHE_REDIS_URL=cache_server.url)  # not started yet: down
    c.worker("w1")
    c.wait_workers(1)
    seq = proteins(50, 1, 30, 30)[0]
    try:
        for _ in range(2):
            r = httpx.post(f"{c.base}/v1/embeddings", json={"input": seq}, timeout=30)
            assert r.status_code == 200 and r.json()["data"][0]["cache"] == "miss"
        assert scrape(c.base, "rdserve_cache_errors_total", op="get") == 2
        cache_server.start()
        deadline = time.monotonic() + 30
        tiers = []
        while time.monotonic() < deadline and tiers[-2:] != ["miss", "full_hit"]:
            r = httpx.post(f"{c.base}/v1/embeddings", json={"input": seq}, timeout=30)
            tiers.append(r.json()["data"][0]["cache"])
            time.sleep(0.2)
        assert tiers[-2:] == ["miss", "full_hit"], tiers
    finally:
        cache_server.stop()


def test_in_flight_requests_survive_a_redis_restart(cluster, redis_server, tiny_artifact):
    """Redis restarts (losing every stream) while a worker computes: the worker's reply waits
    for Redis, the API queues the lost job again, the request gets its answer once."""
    # A task that computes for seconds after Redis is back, so the API notices the restart (and
    # queues the lost task again) before the worker's reply gets through.
    c = cluster(RDSERVE_MAX_SEQUENCES="1024", RDSERVE_MAX_RESIDUES="500000")
    c.worker("w1")
    c.wait_workers(1)
    body = big_body(60, n=1024)
    q = Request(c.base, body, timeout=90)
    q.start()
    pending_at(redis_server.client(), "w1")
    redis_server.stop()
    time.sleep(0.5)
    redis_server.start()
    check_values(tiny_artifact, body, q.result())
    assert scrape(c.base, "rdserve_tasks_resubmitted_total") == 1, c.output()


# ---- graceful shutdown -----------------------------------------------------------------------


def test_sigterm_on_a_worker_finishes_its_batch(cluster, redis_server, tiny_artifact):
    c = cluster(RDSERVE_CLAIM_IDLE_S="300")
    w = c.worker("w1")
    c.wait_workers(1)
    body = big_body(70)
    q = Request(c.base, body, timeout=90)
    q.start()
    pending_at(redis_server.client(), "w1")
    w.signal(signal.SIGTERM)
    check_values(tiny_artifact, body, q.result())  # computed by w1 itself: no other worker
    assert w.wait(30) == 0
    assert "stopping after the current batch" in w.output()
    r = redis_server.client()
    assert r.xpending(tasks_key(PREFIX), GROUP)["pending"] == 0
    assert not r.exists(worker_key(PREFIX, "w1"))  # deregistered: nobody waits for it


@pytest.mark.parametrize("mode", ["embedded", "distributed"])
def test_sigterm_on_the_api_finishes_in_flight_requests(
    mode, cluster, redis_server, tiny_artifact, tmp_path
):
    if mode == "distributed":
        c = cluster(RDSERVE_SHUTDOWN_TIMEOUT_S="60")
        c.worker("w1")
        c.wait_workers(1)
        api, base = c.api, c.base
    else:
        port = free_port()
        env = {
            "RDSERVE_ARTIFACT": str(tiny_artifact),
            "RDSERVE_DEVICE": "cpu",
            "RDSERVE_SHUTDOWN_TIMEOUT_S": "60",  # a busy CI machine computes slowly
        }
        api = rdserve("serve", "--port", str(port), env=env, log=tmp_path / "embedded.log")
        base = f"http://127.0.0.1:{port}"
        wait_http(f"{base}/health/ready", api)
    try:
        body = big_body(80)
        q = Request(base, body, timeout=90)
        q.start()
        deadline = time.monotonic() + 30
        while scrape(base, "rdserve_queue_depth") < 1:  # accepted and queued or computing
            assert time.monotonic() < deadline
            time.sleep(0.05)
        api.signal(signal.SIGTERM)
        check_values(tiny_artifact, body, q.result())
        # uvicorn re-raises the SIGTERM once it has shut down cleanly (exit status -15 / 143).
        assert api.wait(30) in (0, -signal.SIGTERM), api.output()[-3000:]
        assert "Finished server process" in api.output()
        with pytest.raises(httpx.ConnectError):  # no longer accepting
            httpx.get(f"{base}/health/live", timeout=2)
    finally:
        api.stop()
