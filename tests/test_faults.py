"""Faults: batch failures and device OOM, worker crashes and restarts, Redis outages and memory
limits, two artifacts on one Redis, graceful shutdown, slow and greedy HTTP clients.

Real processes (API, workers), a private redis-server with the shipped ACL users that the tests
stop and restart, real HTTP and the tiny random-weight ESM-2 chain.  Only the GPU's
out-of-memory error is simulated (there is no GPU here): a wrapped forward raises
torch.OutOfMemoryError.
"""

from __future__ import annotations

import signal
import socket
import threading
import time
from collections import Counter
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import numpy as np
import pytest
import torch

from app.core.tasks import WorkItem
from app.core.worker import Worker
from app.transport.keys import GROUP, tasks_key
from models.artifact import load_artifact
from models.blocks import ItemFailure
from models.embedder import Embedder, EmbeddingError
from models.families import build_chain
from tests.harness import Cluster, Request, SecuredRedis, cluster_env, holder, scrape
from tests.helpers import make_task, metric, wait_ready
from tests.procs import REPO, free_port, rdserve, wait_http

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

        def withdrawn(self, tasks):
            return set()

        def skip(self, task):
            raise AssertionError("nothing is withdrawn here")

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

DOCKER = REPO / "docker"


@pytest.fixture
def redis_server(tmp_path):
    """This module's private Redis runs with the shipped ACL users (docker/redis-start.sh): every
    fault path below runs as rdserve-api and rdserve-worker, so a command a role may not send
    fails its test."""
    server = SecuredRedis(tmp_path, PREFIX).start()
    yield server
    server.stop()


@pytest.fixture
def cluster(redis_server, tiny_artifact, tmp_path):
    made: list[Cluster] = []

    def make(artifact: Path | None = None, redis: SecuredRedis | None = None, **extra: str):
        logs = tmp_path / f"cluster{len(made)}"
        logs.mkdir()
        redis = redis or redis_server
        env = cluster_env(redis.url, artifact or tiny_artifact, PREFIX, **extra)
        c = Cluster(env, logs, redis.role_env)
        made.append(c)
        return c

    yield make
    for c in made:
        c.close()


@pytest.fixture(scope="module")
def sha(tiny_artifact) -> str:
    return load_artifact(tiny_artifact).sha256


def big_body(seed: int, n: int = 256) -> dict:
    """Seconds of tiny-model compute: long enough to crash a worker in the middle of it."""
    return {"input": proteins(seed, n, 300, 400), "dimensions": 64}


def reference(artifact) -> Embedder:
    art = load_artifact(artifact)
    return Embedder(build_chain("esm2", levels=list(art.levels), device="cpu"), art)


def check_values(artifact, body: dict, resp: httpx.Response, sample: int = 8) -> None:
    """Response order and values equal an in-process computation (a sample of the items)."""
    assert resp.status_code == 200, resp.text
    emb = reference(artifact)
    data = resp.json()["data"]
    assert resp.json()["artifact_sha256"] == emb.artifact.sha256
    assert [d["index"] for d in data] == list(range(len(body["input"])))
    idx = np.linspace(0, len(data) - 1, min(sample, len(data))).astype(int)
    want, _ = emb.embed([body["input"][i] for i in idx], body["dimensions"])
    for i, w in zip(idx, want, strict=True):
        np.testing.assert_allclose(data[i]["embedding"], w, atol=1e-5)


def assert_error(resp: httpx.Response, status: int, code: str) -> dict:
    """The one error shape, with Retry-After on 503s."""
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["code"] == code, err
    if status == 503:
        assert int(resp.headers["retry-after"]) >= 1
    return err


def test_sigkilled_worker_jobs_are_finished_by_another(cluster, redis_server, tiny_artifact, sha):
    """SIGKILL mid-batch: the survivor claims the dead worker's tasks once its heartbeat expires
    (claim_idle_s is 300 s here, so only dead-worker detection can save the requests)."""
    c = cluster(RDSERVE_CLAIM_IDLE_S="300")
    for name in ("w1", "w2"):
        c.worker(name, metrics=True)
    c.wait_workers(2)
    bodies = [big_body(seed) for seed in (10, 11)]
    reqs = [Request(c.base, b, timeout=60) for b in bodies]
    for q in reqs:
        q.start()
    victim = holder(redis_server.client(), PREFIX, sha)
    time.sleep(0.3)  # well inside its batch
    c.workers[victim].signal(signal.SIGKILL)
    survivor = "w2" if victim == "w1" else "w1"
    for q, b in zip(reqs, bodies, strict=True):
        check_values(tiny_artifact, b, q.result())
    assert scrape(c.metrics[survivor], "rdserve_tasks_reclaimed_total", reason="dead") >= 1
    r = redis_server.client()
    assert r.xpending(tasks_key(PREFIX, sha), GROUP)["pending"] == 0
    assert r.xlen(tasks_key(PREFIX, sha)) == 0


def test_a_worker_restarted_under_its_id_finishes_what_it_held(
    cluster, redis_server, tiny_artifact, sha
):
    """SIGKILL the only worker mid-batch and start it again at once with the same --worker-id
    (a container's restart: same hostname, PID 1): each start is a new consumer, so the old one
    counts as dead once its heartbeat expires and the restarted worker claims what it held. It
    used to take over the old heartbeat key: nobody saw a death, the tasks stayed pending, and
    the requests failed (504 at their deadline, or 503 while the restart loaded)."""
    c = cluster(RDSERVE_CLAIM_IDLE_S="300", RDSERVE_REQUEST_TIMEOUT_S="60")
    c.worker("w1")
    c.wait_workers(1)
    bodies = [big_body(seed, n=48) for seed in (100, 101, 102)]
    reqs = [Request(c.base, b, timeout=75) for b in bodies]
    for q in reqs:
        q.start()
    r = redis_server.client()
    holder(r, PREFIX, sha, "w1")
    time.sleep(0.3)
    restarted = c.restart_worker("w1")
    for q, b in zip(reqs, bodies, strict=True):
        check_values(tiny_artifact, b, q.result())
    assert "claimed tasks of a dead worker" in restarted.output()
    assert r.xpending(tasks_key(PREFIX, sha), GROUP)["pending"] == 0
    assert r.xlen(tasks_key(PREFIX, sha)) == 0


def test_two_live_workers_with_one_id_keep_their_own_heartbeats(cluster, redis_server):
    """Two processes started with one --worker-id are two workers; stopping one leaves the
    other's heartbeat alone (one key used to serve both: the fleet counted one worker, and the
    stopped one's deregistration made a serving fleet look empty: false 503 no_worker)."""
    c = cluster()
    first = c.worker("w1")
    c.worker("w1")
    c.wait_workers(2, timeout=60)
    first.signal(signal.SIGTERM)
    assert first.wait(30) == 0
    r = redis_server.client()
    assert len(list(r.scan_iter(match=f"{PREFIX}:*:worker:w1/*"))) == 1
    time.sleep(1.1)  # the API's fleet view is at most a second old
    ready = httpx.get(f"{c.base}/health/ready", timeout=10).json()
    assert ready["workers"] == 1 and ready["status"] == "ready", ready
    ok = httpx.post(f"{c.base}/v1/embeddings", json={"input": "MKVLAAGG"}, timeout=60)
    assert ok.status_code == 200, ok.text


def test_no_worker_left_gives_503_not_a_hang(cluster, redis_server, tiny_artifact, sha):
    c = cluster(RDSERVE_CLAIM_IDLE_S="300", RDSERVE_REQUEST_TIMEOUT_S="120")
    c.worker("w1")
    c.wait_workers(1)
    q = Request(c.base, big_body(20), timeout=60)
    q.start()
    holder(redis_server.client(), PREFIX, sha, "w1")
    c.workers["w1"].signal(signal.SIGKILL)
    # 503 within seconds, not the 120 s request timeout (the client gives up at 60)
    assert_error(q.result(), 503, "no_worker")
    # The abandoned task is withdrawn: a new worker serves new requests and never computes it.
    c.worker("w3")
    c.wait_workers(1)
    ok = httpx.post(f"{c.base}/v1/embeddings", json={"input": "MKVLAAGG"}, timeout=60)
    assert ok.status_code == 200, ok.text
    red = redis_server.client()
    assert red.xlen(tasks_key(PREFIX, sha)) == 0
    time.sleep(1.5)  # w3's dead-worker check has run (every heartbeat period)
    assert "claimed tasks" not in c.workers["w3"].output()


def test_a_job_computed_twice_is_delivered_once(cluster, redis_server, tiny_artifact, sha):
    """claim_idle_s shorter than the batch: the idle worker takes the task over while the first
    still computes it; both reply, the request gets exactly one answer."""
    c = cluster(RDSERVE_CLAIM_IDLE_S="0.5")
    c.worker("w1")
    c.worker("w2")
    c.wait_workers(2)  # both ready before the task: the idle one claims it within ~0.6 s
    body = big_body(30)
    q = Request(c.base, body, timeout=90)
    q.start()
    busy = holder(redis_server.client(), PREFIX, sha)
    idle = "w2" if busy == "w1" else "w1"
    check_values(tiny_artifact, body, q.result())
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if scrape(c.base, "rdserve_replies_discarded_total", reason="duplicate") == 1:
            break
        time.sleep(0.5)
    else:
        raise AssertionError(c.output())
    assert "claimed tasks pending too long" in c.workers[idle].output()


def test_two_artifacts_on_one_redis_and_a_rolling_change_lose_nothing(
    cluster, tiny_artifact, tiny_artifact_b
):
    """A rolling change of artifact on one Redis and prefix: workers of the new artifact start,
    then its API; clients move over; the old API drains and its workers stop. Each artifact's
    tasks have their own stream, so no worker takes a task it cannot serve (they used to: 500
    artifact_mismatch for about half the requests while both ran), and nothing is lost."""
    a = cluster(tiny_artifact)
    a.worker("a1")
    b = cluster(tiny_artifact_b)  # the new fleet loads while the old one serves
    b.worker("b1")
    a.wait_workers(1)
    target = {"base": a.base}
    results: list[tuple[str, dict, httpx.Response | Exception]] = []
    stop = threading.Event()

    def client(seed: int) -> None:
        n = 0
        while not stop.wait(0.05):
            base, body = target["base"], {"input": proteins(seed * 1000 + n, 2, 30, 60)}
            body["dimensions"] = 64
            n += 1
            try:
                resp: httpx.Response | Exception = httpx.post(
                    f"{base}/v1/embeddings", json=body, timeout=60
                )
            except httpx.HTTPError as e:
                resp = e
            results.append((base, body, resp))

    clients = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(3)]
    for t in clients:
        t.start()
    b.wait_workers(1)
    # Both artifacts served side by side: a burst at the old API while b1 idles beside a1.
    burst = [
        Request(a.base, {"input": proteins(500 + i, 2, 30, 60), "dimensions": 64})
        for i in range(12)
    ]
    for q in burst:
        q.start()
    for q in burst:
        results.append((a.base, q.body, q.result()))
    target["base"] = b.base
    time.sleep(0.5)  # clients have moved to the new API
    a.api.signal(signal.SIGTERM)
    assert a.api.wait(60) in (0, -signal.SIGTERM)
    a.workers["a1"].signal(signal.SIGTERM)
    assert a.workers["a1"].wait(60) == 0
    time.sleep(1.0)
    stop.set()
    for t in clients:
        t.join(70)
    by_api = Counter(base for base, _, _ in results)
    assert by_api[a.base] >= 12 and by_api[b.base] >= 1, by_api
    for base, artifact in ((a.base, tiny_artifact), (b.base, tiny_artifact_b)):
        mine = [(body, resp) for at, body, resp in results if at == base]
        ref = reference(artifact)
        want, _ = ref.embed([seq for body, _ in mine for seq in body["input"]], 64)
        got = []
        for _, resp in mine:
            assert isinstance(resp, httpx.Response), resp
            assert resp.status_code == 200, resp.text
            assert resp.json()["artifact_sha256"] == ref.artifact.sha256
            got += [d["embedding"] for d in resp.json()["data"]]
        np.testing.assert_allclose(np.array(got), np.array(want), atol=1e-5)


def test_redis_outage_gives_503_and_recovers_without_restarts(cluster, redis_server):
    c = cluster()
    w = c.worker("w1")
    c.wait_workers(1)
    seqs = proteins(40, 3, 20, 40)
    post = lambda body: httpx.post(f"{c.base}/v1/embeddings", json=body, timeout=30)  # noqa: E731
    assert post({"input": seqs[0]}).status_code == 200
    redis_server.stop()
    r = post({"input": seqs[1]})
    assert_error(r, 503, "queue_unavailable")
    time.sleep(1.1)  # the fleet status is cached for 1 s
    ready = httpx.get(f"{c.base}/health/ready", timeout=10)
    assert ready.status_code == 503 and "redis unavailable" in ready.json()["error"]
    redis_server.start()  # same port, empty (no persistence)
    c.wait_workers(1, timeout=60)
    first = post({"input": seqs[1]})
    assert first.status_code == 200 and first.json()["data"][0]["cache"] == "miss"
    assert post({"input": seqs[1]}).json()["data"][0]["cache"] == "full_hit"
    assert c.api.alive() and w.alive()  # recovered on their own


def test_no_false_no_worker_while_heartbeats_return_after_a_redis_restart(cluster, redis_server):
    """A restarted Redis is empty until each worker's next beat (up to a heartbeat period): the
    API keeps counting the workers it saw just before until their heartbeats would have expired.
    The worker is paused across the restart so its beat cannot come back early; requests used
    to get 503 no_worker (and /health/ready 503) in that gap."""
    c = cluster(RDSERVE_HEARTBEAT_S="3")
    w = c.worker("w1")
    c.wait_workers(1)
    assert httpx.post(f"{c.base}/v1/embeddings", json={"input": "MKVAAG"}, timeout=30).is_success
    w.signal(signal.SIGSTOP)
    try:
        redis_server.stop()
        redis_server.start()
        time.sleep(1.5)  # the API's fleet view (refreshed every second) shows an empty Redis
        assert redis_server.client().keys(f"{PREFIX}:*:worker:*") == []
        ready = httpx.get(f"{c.base}/health/ready", timeout=10)
        assert ready.status_code == 200 and ready.json()["workers"] == 1, ready.text
        q = Request(c.base, {"input": "MKVLAAGGWW"}, timeout=60)
        q.start()
        time.sleep(0.5)
    finally:
        w.signal(signal.SIGCONT)
    resp = q.result()
    assert resp.status_code == 200, resp.text


def test_cache_redis_down_only_costs_recomputes(cluster, redis_server, tmp_path):
    (tmp_path / "cache").mkdir()
    cache_server = SecuredRedis(tmp_path / "cache", PREFIX, like=redis_server)
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


def test_in_flight_requests_survive_a_redis_restart(cluster, redis_server, tiny_artifact, sha):
    """Redis restarts (losing every stream) while a worker computes: the worker's reply waits
    for Redis, the API queues the lost task again, the request gets its answer once."""
    # A task that computes for seconds after Redis is back, so the API notices the restart (and
    # queues the lost task again) before the worker's reply gets through.
    c = cluster(RDSERVE_MAX_SEQUENCES="1024", RDSERVE_MAX_RESIDUES="500000")
    c.worker("w1")
    c.wait_workers(1)
    body = big_body(60, n=1024)
    q = Request(c.base, body, timeout=90)
    q.start()
    holder(redis_server.client(), PREFIX, sha, "w1")
    redis_server.stop()
    time.sleep(0.5)
    redis_server.start()
    check_values(tiny_artifact, body, q.result())
    assert scrape(c.base, "rdserve_tasks_resubmitted_total") == 1, c.output()


# ---- Redis memory limits: the shipped configuration ------------------------------------------


def test_a_result_redis_cannot_store_fails_at_once_with_503(cluster, tmp_path):
    """The queue Redis as shipped (docker/redis.conf: noeviction), too small for one result: the
    worker's reply is refused (OOM), so it sends a short error result instead and the request
    gets 503 at once (it used to wait for its deadline: the refused reply was never retried)."""
    queue = SecuredRedis(
        tmp_path, PREFIX, DOCKER / "redis.conf", ("--maxmemory", "4mb"), like=None
    ).start()
    try:
        c = cluster(redis=queue, RDSERVE_REQUEST_TIMEOUT_S="120")
        c.worker("w1")
        c.wait_workers(1)
        # 24 × 1,000 residues × 64 dims of float32: a 6 MB result, over the 4 MB limit.
        body = {"input": proteins(110, 24, 1000, 1000), "pooling": "per_residue"}
        q = Request(c.base, {**body, "dimensions": 64}, timeout=60)
        q.start()
        err = assert_error(q.result(), 503, "result_undeliverable")
        assert "maxmemory" in err["message"], err
        ok = httpx.post(f"{c.base}/v1/embeddings", json={"input": "MKVLAAGG"}, timeout=60)
        assert ok.status_code == 200, ok.text  # the worker and its heartbeat carry on
        assert "result refused by redis" in c.workers["w1"].output()
    finally:
        queue.stop()


def compose_redis_configs() -> tuple[Path, Path]:
    """From docker-compose.yml: the redis.conf of the Redis the API queues tasks on, and of the
    one it caches in (the same file when both are one instance)."""
    from tests.test_deploy import COMPOSE, env_of, interpolate, mounts

    services = interpolate(__import__("yaml").safe_load(COMPOSE.read_text()), {})["services"]
    argv = services["api"]["command"]
    queue_url = argv[argv.index("--redis-url") + 1]
    cache_url = env_of(services["api"]).get("RDSERVE_CACHE_REDIS_URL") or queue_url

    def config(url: str) -> Path:
        svc = services[urlsplit(url).hostname]
        return REPO / next(src for src in mounts(svc).values() if src.endswith(".conf"))

    return config(queue_url), config(cache_url)


def test_cache_eviction_never_reaches_the_queue_in_the_shipped_topology(
    tiny_artifact, tmp_path, sha
):
    """The compose topology's Redis configs under memory pressure: the cache fills far past its
    limit and evicts, and nothing is ever evicted where the queue, replies and heartbeats live
    (they shared one allkeys-lru instance: heartbeats and streams were evicted, false 503
    no_worker and 504s)."""
    queue_conf, cache_conf = compose_redis_configs()
    (tmp_path / "queue").mkdir()
    (tmp_path / "cache").mkdir()
    queue = SecuredRedis(tmp_path / "queue", PREFIX, queue_conf, ("--maxmemory", "64mb"))
    shared = cache_conf == queue_conf  # one instance: sized for the cache, as compose sized it
    cache = queue if shared else SecuredRedis(tmp_path / "cache", PREFIX, cache_conf, like=queue)
    cache.options = ("--maxmemory", "3mb")
    servers = [queue] if shared else [queue, cache]
    for s in servers:
        s.start()
    env = cluster_env(
        queue.url,
        tiny_artifact,
        PREFIX,
        RDSERVE_CACHE_REDIS_URL=cache.url,
        RDSERVE_REQUEST_TIMEOUT_S="30",
    )
    c = Cluster(env, tmp_path, queue.role_env)
    try:
        c.worker("w1")
        c.wait_workers(1)
        for i in range(12):  # 8 × 600 residues per residue: 1.2 MB of cache entries each
            body = {"input": proteins(120 + i, 8, 600, 600), "pooling": "per_residue"}
            r = httpx.post(f"{c.base}/v1/embeddings", json={**body, "dimensions": 64}, timeout=60)
            assert r.status_code == 200, r.text
            assert len(r.json()["data"][0]["embedding"]) == 600
        stats = {s: s.client().info("stats")["evicted_keys"] for s in servers}
        assert stats[cache] > 0  # the cache was under pressure
        assert stats[queue] == 0 and not shared
        assert queue.client().config_get("maxmemory-policy")["maxmemory-policy"] == "noeviction"
        assert queue.client().exists(tasks_key(PREFIX, sha))
    finally:
        c.close()
        for s in servers:
            s.stop()


# ---- graceful shutdown -----------------------------------------------------------------------


def test_sigterm_on_a_worker_finishes_its_batch(cluster, redis_server, tiny_artifact, sha):
    c = cluster(RDSERVE_CLAIM_IDLE_S="300")
    w = c.worker("w1")
    c.wait_workers(1)
    body = big_body(70)
    q = Request(c.base, body, timeout=90)
    q.start()
    holder(redis_server.client(), PREFIX, sha, "w1")
    w.signal(signal.SIGTERM)
    check_values(tiny_artifact, body, q.result())  # computed by w1 itself: no other worker
    assert w.wait(30) == 0
    assert "stopping after the current batch" in w.output()
    r = redis_server.client()
    assert r.xpending(tasks_key(PREFIX, sha), GROUP)["pending"] == 0
    assert not r.keys(f"{PREFIX}:*:worker:w1/*")  # deregistered: nobody waits for it
    assert r.xinfo_consumers(tasks_key(PREFIX, sha), GROUP) == []  # and left the group


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
            "OMP_NUM_THREADS": "1",  # as in cluster_env: no thread contention with neighbours
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


def test_requests_past_the_shutdown_window_get_503_and_their_tasks_are_dropped(
    cluster, redis_server, tiny_artifact, sha
):
    """SIGTERM with far more queued than the shutdown window can finish: at the end of the
    window every request still waiting gets 503 + Retry-After in the error shape (they used to
    get uvicorn's plain-text 500), its task is withdrawn, and the worker drops the withdrawn
    tasks it already held instead of computing them for nobody."""
    c = cluster(RDSERVE_SHUTDOWN_TIMEOUT_S="4", RDSERVE_TOKEN_BUDGET="4096")
    c.worker("w1", metrics=True)
    c.wait_workers(1)
    r = redis_server.client()
    # First a task far longer than the window (~150k residues: a turn of its own, since it
    # exceeds the drain budget), so that the worker is sure to hold it at the cut whatever the
    # machine's speed; then small ones queued behind it.
    big = Request(c.base, {"input": proteins(199, 150, 950, 1000), "dimensions": 64}, timeout=60)
    big.start()
    holder(r, PREFIX, sha)
    bodies = [{"input": proteins(200 + i, 16, 300, 400), "dimensions": 64} for i in range(39)]
    reqs = [big] + [Request(c.base, b, timeout=60) for b in bodies]
    for q in reqs[1:]:
        q.start()
    deadline = time.monotonic() + 60
    while r.xlen(tasks_key(PREFIX, sha)) + sum(q.response is not None for q in reqs) < len(reqs):
        assert time.monotonic() < deadline, c.output()  # every request accepted before SIGTERM
        time.sleep(0.05)
    c.api.signal(signal.SIGTERM)
    statuses = Counter()
    for q in reqs:
        resp = q.result()
        statuses[resp.status_code] += 1
        if resp.status_code == 503:
            assert_error(resp, 503, "shutting_down")
        else:
            assert resp.status_code == 200, resp.text
    assert statuses[503] >= 1 and set(statuses) <= {200, 503}, statuses
    assert c.api.wait(30) in (0, -signal.SIGTERM)
    assert "Cancel" not in c.api.output()  # uvicorn had nothing left to cancel
    deadline = time.monotonic() + 60
    while r.xpending(tasks_key(PREFIX, sha), GROUP)["pending"]:  # the worker is idle again
        assert time.monotonic() < deadline, c.output()
        time.sleep(0.2)
    assert r.xlen(tasks_key(PREFIX, sha)) == 0
    assert scrape(c.metrics["w1"], "rdserve_tasks_skipped_total", reason="withdrawn") >= 1


# ---- HTTP clients that hold connections, ports that are taken --------------------------------


def read_all(sock: socket.socket, timeout: float) -> bytes:
    """Everything the server sends until it closes the connection."""
    sock.settimeout(timeout)
    out = b""
    while chunk := sock.recv(65536):
        out += chunk
    return out


def test_slow_clients_are_cut_off_and_connections_are_capped(cluster):
    """Slow-loris clients (headers a byte at a time, or a body that stalls) are closed after the
    header / body timeouts, and connections past the cap get 503 at once; others are served.
    (uvicorn kept all of them open, indefinitely.)"""
    c = cluster(
        RDSERVE_HTTP_HEADER_TIMEOUT_S="4",
        RDSERVE_HTTP_BODY_TIMEOUT_S="2",
        RDSERVE_HTTP_MAX_CONNECTIONS="20",
    )
    wait_http(f"{c.base}/health/live", c.api)
    addr = ("127.0.0.1", c.port)
    stalled = socket.create_connection(addr)
    slow = [socket.create_connection(addr) for _ in range(19)]  # 20 open: the cap
    try:
        for s in slow:
            s.sendall(b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nContent-")
        stalled.sendall(b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{")
        extra = [socket.create_connection(addr) for _ in range(4)]  # over the cap
        for s in extra:
            answer = read_all(s, 10)
            assert answer.startswith(b"HTTP/1.1 503 "), answer
            assert b"retry-after: 1" in answer and b'"code":"too_many_connections"' in answer
            s.close()
        for s in slow:
            answer = read_all(s, 30)  # closed by the server, not by this timeout
            assert answer.startswith(b"HTTP/1.1 408 "), answer
            assert b'"code":"request_timeout"' in answer
        assert read_all(stalled, 30) == b""  # a stalled body: closed
        ok = httpx.get(f"{c.base}/health/live", timeout=10)
        assert ok.status_code == 200
    finally:
        for s in [*slow, stalled]:
            s.close()


def test_a_taken_port_stops_the_start_with_one_line_naming_the_setting(
    redis_server, tiny_artifact, tmp_path
):
    """A worker whose metrics port is taken (two workers on one host with default settings) and
    an API whose port is taken exit at once with one line naming the setting (the worker used
    to die with a traceback after loading its models)."""
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = str(taken.getsockname()[1])
    env = cluster_env(redis_server.url, tiny_artifact, PREFIX, RDSERVE_METRICS_PORT=port)
    try:
        worker = rdserve(
            "worker", env={**env, **redis_server.role_env("worker")}, log=tmp_path / "w.log"
        )
        api = rdserve("serve", "--port", port, env=env, log=tmp_path / "api.log")
        for proc, setting in ((worker, "RDSERVE_METRICS_PORT"), (api, "RDSERVE_PORT")):
            assert proc.wait(60) == 2, proc.output()
            out = proc.output()
            assert "Traceback" not in out and setting in out and f"127.0.0.1:{port}" in out, out
            assert len([ln for ln in out.splitlines() if ln.startswith("error:")]) == 1, out
    finally:
        taken.close()


def test_redis_roles_may_do_only_their_part(redis_server):
    """The shipped ACL users: no anonymous access; the API only under the prefix; workers not
    even the cache; neither may run administrative commands."""
    import redis

    url = redis_server.url
    with pytest.raises(redis.AuthenticationError):
        redis.Redis.from_url(url).ping()

    def user(role: str) -> redis.Redis:
        password = redis_server.password_files[role].read_text().strip()
        return redis.Redis.from_url(url, username=f"rdserve-{role}", password=password)

    api, worker = user("api"), user("worker")
    assert api.set(f"{PREFIX}:emb:k", 1) and api.delete(f"{PREFIX}:emb:k") == 1
    assert worker.set(f"{PREFIX}:{{0123456789ab}}:worker:w/1", 1, ex=5)
    for call in (
        lambda: api.set("elsewhere", 1),
        lambda: api.flushall(),
        lambda: api.config_get("maxmemory"),
        lambda: api.keys("*"),
        lambda: worker.hset(f"{PREFIX}:emb:k", "0", b"x"),
        lambda: worker.info(),
        lambda: worker.flushdb(),
    ):
        with pytest.raises(redis.exceptions.NoPermissionError):
            call()
