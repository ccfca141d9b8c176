"""Redis as operators run it, with real processes: a Redis Cluster (3 masters, 3 replicas,
started here) found from any node's address, with a master killed mid-load and its replica
promoted; TLS (rediss://, certificates made here) with the ACL users; several API replicas on
one Redis, one killed mid-load, and its keys gone once its reply stream's TTL runs out."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from collections import Counter

import httpx
import numpy as np
import pytest
import redis

from app.transport.keys import tasks_key
from models.artifact import load_artifact
from models.blocks import assemble
from models.embedder import Embedder
from tests.harness import Cluster, Request, SecuredRedis, cluster_env
from tests.procs import RedisClusterServers, free_port, rdserve, wait_http

AA = list("ACDEFGHIKLMNPQRSTVWY")


def proteins(seed: int, n: int, lo: int = 30, hi: int = 120) -> list[str]:
    rng = np.random.default_rng(seed)
    return ["".join(rng.choice(AA, int(rng.integers(lo, hi + 1)))) for _ in range(n)]


@pytest.fixture(scope="module")
def reference(tiny_artifact):
    emb = Embedder.from_artifact(tiny_artifact, device="cpu")

    def check(body: dict, resp: httpx.Response) -> None:
        assert resp.status_code == 200, resp.text
        k = body["dimensions"]
        want = emb.compute(body["input"], stop=emb.artifact.level_for_dim(k))
        for d, w in zip(resp.json()["data"], want, strict=True):
            np.testing.assert_allclose(
                d["embedding"], assemble(w.blocks, k, False), rtol=1e-4, atol=1e-5
            )

    return check


# ---- Redis Cluster ----------------------------------------------------------------------------


def test_a_redis_cluster_from_any_node_with_a_failover(tiny_artifact, tmp_path, reference):
    """The same RDSERVE_REDIS_URL shape, pointing at one node of a cluster: requests and a bulk
    job are served, the cache spreads over the shards; the master holding the artifact's queue
    is SIGKILLed mid-load: requests in flight end (200 with the right values, or 503), none
    hangs; once the replica is promoted, requests are served again."""
    rc = RedisClusterServers(tmp_path / "redis").start()
    prefix = "rdserve-rc"
    env = cluster_env(rc.url, tiny_artifact, prefix, RDSERVE_REQUEST_TIMEOUT_S="60")
    (tmp_path / "logs").mkdir()
    c = Cluster(env, tmp_path / "logs")
    try:
        c.worker("w1")
        c.worker("w2")
        c.wait_workers(2, timeout=120)
        for seed in range(12):
            body = {"input": proteins(seed, 4), "dimensions": 48}
            reference(body, httpx.post(f"{c.base}/v1/embeddings", json=body, timeout=60))
        spread = {p: len(redis.Redis(port=p).keys(f"{prefix}:emb:*")) for p in rc.masters()}
        assert sum(1 for n in spread.values() if n) >= 2, spread  # the cache spans shards
        job = httpx.post(
            f"{c.base}/v1/jobs", json={"input": proteins(99, 40), "dimensions": 32}, timeout=60
        ).json()["id"]
        deadline = time.monotonic() + 120
        while (j := httpx.get(f"{c.base}/v1/jobs/{job}").json())["status"] != "succeeded":
            assert time.monotonic() < deadline and j["status"] in ("queued", "running"), j
            time.sleep(0.2)

        sha = load_artifact(tiny_artifact).sha256
        victim = rc.master_of(tasks_key(prefix, sha))
        bodies = [{"input": proteins(200 + i, 24, 200, 300), "dimensions": 64} for i in range(6)]
        reqs = [Request(c.base, b, timeout=90) for b in bodies]
        for q in reqs:
            q.start()
        time.sleep(1.0)
        rc.kill(victim)
        statuses = Counter()
        for q, b in zip(reqs, bodies, strict=True):
            resp = q.result()  # an answer for every request: nothing hangs
            statuses[resp.status_code] += 1
            if resp.status_code == 200:
                reference(b, resp)
            else:
                assert resp.status_code == 503, resp.text
        assert set(statuses) <= {200, 503}, statuses
        rc.wait_ok()
        body = {"input": proteins(300, 4), "dimensions": 64}
        deadline = time.monotonic() + 60
        while (resp := httpx.post(f"{c.base}/v1/embeddings", json=body, timeout=60)).status_code:
            if resp.status_code == 200 or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        reference(body, resp)
        assert victim not in rc.masters()
    finally:
        c.close()
        rc.stop()


# ---- TLS and ACL users ------------------------------------------------------------------------


class TlsRedis(SecuredRedis):
    """The shipped ACL users on a TLS-only redis-server (certificates from a CA made here)."""

    def __init__(self, log_dir, prefix: str) -> None:
        import trustme

        ca = trustme.CA()
        cert = ca.issue_cert("127.0.0.1", "localhost")
        self.ca_file = log_dir / "ca.pem"
        ca.cert_pem.write_to_path(self.ca_file)
        cert_file, key_file = log_dir / "server.pem", log_dir / "server.key"
        cert.cert_chain_pems[0].write_to_path(cert_file)
        cert.private_key_pem.write_to_path(key_file)
        super().__init__(log_dir, prefix)
        self.tls_port = free_port()
        self.options = (
            *("--port", "0", "--tls-port", str(self.tls_port)),
            *("--tls-cert-file", str(cert_file), "--tls-key-file", str(key_file)),
            *("--tls-ca-cert-file", str(self.ca_file), "--tls-auth-clients", "no"),
        )
        self.url = f"rediss://127.0.0.1:{self.tls_port}/0?ssl_ca_certs={self.ca_file}"

    def start(self) -> TlsRedis:
        self.proc = subprocess.Popen(
            self.argv(), env=self.env(), stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                redis.Redis.from_url(self.url, socket_timeout=1).ping()
            except redis.AuthenticationError:
                return self  # up, over TLS, refusing anonymous clients
            except redis.RedisError:
                time.sleep(0.1)
        raise AssertionError("TLS redis-server did not start")


def test_rediss_with_acl_users(tiny_artifact, tmp_path, reference):
    """The API authenticates with credentials in its URL, the worker with a password file;
    the server trusts TLS only, and a client that does not trust its CA is refused."""
    server = TlsRedis(tmp_path, "rdserve-tls").start()
    api_pw = server.password_files["api"].read_text().strip()
    host = server.url.removeprefix("rediss://")
    try:
        with pytest.raises(redis.ConnectionError):  # the CA is not trusted
            redis.Redis.from_url(f"rediss://{host.split('?')[0]}", socket_timeout=2).ping()
        env = cluster_env(server.url, tiny_artifact, "rdserve-tls")
        roles = {
            "api": {"RDSERVE_REDIS_URL": f"rediss://rdserve-api:{api_pw}@{host}"},
            "worker": server.role_env("worker"),
        }
        (tmp_path / "logs").mkdir()
        c = Cluster(env, tmp_path / "logs", roles.__getitem__)
        try:
            c.worker("w1")
            c.wait_workers(1, timeout=120)
            body = {"input": proteins(1, 3), "dimensions": 48}
            reference(body, httpx.post(f"{c.base}/v1/embeddings", json=body, timeout=60))
            assert api_pw not in c.api.output()
        finally:
            c.close()
    finally:
        server.stop()


# ---- API replicas -----------------------------------------------------------------------------


def test_api_replicas_serve_any_request_and_a_dead_ones_keys_expire(
    redis_server, tiny_artifact, tmp_path, reference
):
    """Two API replicas and a worker on one Redis: either replica answers. One is SIGKILLed
    with requests in flight: they fail (connection error) and succeed when retried on the other.
    Restarting a replica three times leaves no key behind once the reply TTL has passed."""
    prefix = "rdserve-replicas"
    env = cluster_env(redis_server.url, tiny_artifact, prefix, RDSERVE_REDIS_REPLY_TTL_S="3")
    (tmp_path / "logs").mkdir()
    c = Cluster(env, tmp_path / "logs")
    extra = []

    def replica(i: int) -> tuple[str, object]:
        port = free_port()
        p = rdserve("serve", "--port", str(port), env=c.env, log=tmp_path / f"api-r{i}.log")
        extra.append(p)
        wait_http(f"http://127.0.0.1:{port}/health/live", p)
        return f"http://127.0.0.1:{port}", p

    r = redis_server.client()
    try:
        c.worker("w1")
        c.wait_workers(1)
        other, _ = replica(0)
        for base in (c.base, other):
            body = {"input": proteins(7, 3), "dimensions": 32}
            reference(body, httpx.post(f"{base}/v1/embeddings", json=body, timeout=60))
        baseline = set(r.keys(f"{prefix}:*"))
        bodies = [{"input": proteins(50 + i, 16, 200, 300), "dimensions": 64} for i in range(4)]
        reqs = [Request(c.base, b, timeout=60) for b in bodies]
        for q in reqs:
            q.start()
        time.sleep(0.5)
        c.api.signal(signal.SIGKILL)
        for q, b in zip(reqs, bodies, strict=True):
            q.join(70)
            if q.response is None:  # in flight on the dead replica: retried on the other
                assert isinstance(q.error, httpx.TransportError), q.error
                resp = httpx.post(f"{other}/v1/embeddings", json=b, timeout=60)
            else:
                resp = q.response
            reference(b, resp)
        for i in range(3):
            base, p = replica(i + 1)
            body = {"input": proteins(400 + i, 2), "dimensions": 48}
            assert httpx.post(f"{base}/v1/embeddings", json=body, timeout=60).status_code == 200
            p.signal(signal.SIGKILL)
        # The dead replicas' reply streams expire; what is left is the live ones' state.
        dead = [reply_key(c.api), *(reply_key(p) for p in extra[1:])]
        live = {reply_key(extra[0]).encode()}
        deadline = time.monotonic() + 30
        while (left := [k for k in dead if r.exists(k)]) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not left, left
        grown = set(r.keys(f"{prefix}:*")) - baseline - live - _cache_keys(r, prefix)
        grown = {k for k in grown if not k.endswith(b":deadcheck")}  # a lock of 0.5 s
        assert not grown, grown
    finally:
        for p in extra:
            p.stop()
        c.close()


def reply_key(api) -> str:
    """The reply stream an API process says it reads (its start-up log)."""
    line = next(ln for ln in api.output().splitlines() if '"reply stream"' in ln)
    return json.loads(line)["key"]


def _cache_keys(r: redis.Redis, prefix: str) -> set[bytes]:
    """Cache entries (they stay, by design, until their TTL)."""
    return set(r.keys(f"{prefix}:emb:*"))
