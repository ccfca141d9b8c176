"""One cluster harness for the distributed, fault and security tests (and the benchmarks): an API
process and worker processes over one Redis — a private redis-server on a free port, optionally
with the shipped ACL users (``SecuredRedis``)."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import redis

from app.transport.keys import GROUP, tasks_key, worker_id_of
from tests.helpers import metric
from tests.procs import REPO, Proc, RedisServer, free_port, rdserve

REDIS_START = REPO / "docker" / "redis-start.sh"
#: The test's own administrator (inspection, not used by rdserve processes).
ADMIN, ADMIN_PASSWORD = "rdserve-test", "test-admin-password"


class SecuredRedis(RedisServer):
    """A private redis-server started by the shipped docker/redis-start.sh: the default user off,
    rdserve-api and rdserve-worker with passwords from files, plus an admin for the test."""

    PONG = b"-NOAUTH"  # up, and refusing anonymous clients

    def __init__(
        self,
        log_dir: Path,
        prefix: str = "rdserve",
        config: Path | None = None,
        options: tuple[str, ...] = (),
        like: SecuredRedis | None = None,
    ) -> None:
        """``config``: a redis.conf to start from (e.g. docker/redis.conf), ``options`` more
        redis-server options; ``like``: another instance whose passwords to share (the API
        uses one password for the queue and the cache Redis)."""
        super().__init__(log_dir)
        self.prefix, self.config, self.options = prefix, config, options
        self.password_files = dict(like.password_files) if like is not None else {}
        for role in ("api", "worker"):
            if role not in self.password_files:
                path = log_dir / f"redis-{role}-password"
                path.write_text(f"{role}-{free_port()}-secret\n")
                self.password_files[role] = path

    def argv(self) -> list[str]:
        head = ["sh", str(REDIS_START), *([str(self.config)] if self.config else [])]
        admin = ["--user", ADMIN, "on", f">{ADMIN_PASSWORD}", "~*", "&*", "+@all"]
        return [*head, *super().argv()[1:], *self.options, *admin]

    def env(self) -> dict[str, str]:
        return {
            **os.environ,
            "RDSERVE_REDIS_PREFIX": self.prefix,
            "REDIS_API_PASSWORD_FILE": str(self.password_files["api"]),
            "REDIS_WORKER_PASSWORD_FILE": str(self.password_files["worker"]),
        }

    def role_env(self, role: str) -> dict[str, str]:
        """What an rdserve process of this role ('api', 'worker') needs to authenticate."""
        return {
            "RDSERVE_REDIS_USERNAME": f"rdserve-{role}",
            "RDSERVE_REDIS_PASSWORD_FILE": str(self.password_files[role]),
        }

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.url, username=ADMIN, password=ADMIN_PASSWORD)


def cluster_env(redis_url: str, artifact: Path | str, prefix: str, **extra: str) -> dict[str, str]:
    """The environment of every process of a test cluster (fast heartbeats, no metrics port)."""
    return {
        "RDSERVE_REDIS_URL": redis_url,
        "RDSERVE_REDIS_PREFIX": prefix,
        "RDSERVE_ARTIFACT": str(artifact),
        "RDSERVE_DEVICE": "cpu",
        "RDSERVE_HEARTBEAT_S": "0.5",  # a dead worker's heartbeat expires after 2 s
        "RDSERVE_METRICS_PORT": "0",
        # One compute thread per process: on a shared 2-core machine, torch's default threads
        # wait at every barrier behind other processes (tens of times slower).
        "OMP_NUM_THREADS": "1",
        **extra,
    }


class Cluster:
    """An API process (started at once) and named worker processes; close() stops them all.

    ``roles(role)`` adds what an 'api' or 'worker' process needs to authenticate to Redis
    (``SecuredRedis.role_env``)."""

    def __init__(
        self,
        env: dict[str, str],
        logs: Path,
        roles: Callable[[str], dict[str, str]] | None = None,
    ) -> None:
        # Bulk jobs in the test's own folder, shared by the cluster's API processes.
        self.env, self.logs = {"RDSERVE_JOB_STORE": str(logs / "jobs"), **env}, logs
        self.roles = roles or (lambda role: {})
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.api = rdserve(
            "serve",
            "--port",
            str(self.port),
            env={**self.env, **self.roles("api")},
            log=logs / "api.log",
        )
        self.workers: dict[str, Proc] = {}
        self.metrics: dict[str, str] = {}  # worker name → base URL of its metrics port
        self._starts: dict[str, int] = {}  # starts per worker name
        self.started: list[Proc] = []  # every worker process, restarted ones included

    def worker(self, name: str, metrics: bool = False, **extra: str) -> Proc:
        """Start a worker named ``name`` (its worker id), with extra environment; with
        ``metrics`` it serves /metrics on a free port (``self.metrics[name]``). Starting a name
        again (a restart) keeps the earlier process's log beside the new one."""
        env = {**self.env, **self.roles("worker"), **extra}
        if metrics:
            port = free_port()
            env["RDSERVE_METRICS_PORT"] = str(port)
            self.metrics[name] = f"http://127.0.0.1:{port}"
        n = self._starts[name] = self._starts.get(name, 0) + 1
        log = self.logs / (f"{name}.log" if n == 1 else f"{name}.{n}.log")
        w = rdserve("worker", "--worker-id", name, env=env, log=log)
        self.workers[name] = w
        self.started.append(w)
        return w

    def restart_worker(self, name: str, **extra: str) -> Proc:
        """SIGKILL a worker and start it again at once under the same worker id."""
        old = self.workers[name]
        old.signal(signal.SIGKILL)
        old.wait(10)
        return self.worker(name, **extra)

    def wait_workers(self, n: int, timeout: float = 90) -> None:
        """Until /health/ready says ready with exactly n live workers."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                ready = httpx.get(f"{self.base}/health/ready", timeout=2).json()
                if ready.get("workers") == n and ready.get("status") == "ready":
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise AssertionError(self.output())

    def output(self) -> str:
        parts = [f"--- api\n{self.api.output()[-3000:]}"]
        parts += [f"--- {n}\n{w.output()[-3000:]}" for n, w in self.workers.items()]
        return "\n".join(parts)

    def close(self) -> None:
        for w in self.started:
            w.stop()
        self.api.stop()


def holder(
    r: redis.Redis, prefix: str, artifact_sha: str, worker: str | None = None, timeout: float = 60
) -> str:
    """Wait until a worker holds a task of this artifact (it is computing it); returns that
    worker's id (its consumer name without the start nonce)."""
    stream = tasks_key(prefix, artifact_sha)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        info = r.xpending(stream, GROUP) if r.exists(stream) else None
        for c in (info or {}).get("consumers", []):
            name = worker_id_of(c["name"].decode())
            if c["pending"] and (worker is None or name == worker):
                return name
        time.sleep(0.05)
    raise AssertionError("no task became pending")


class Request(threading.Thread):
    """One POST in the background: a test can crash things while it is in flight."""

    def __init__(self, base: str, body: dict, timeout: float = 90) -> None:
        super().__init__(daemon=True)
        self.base, self.body, self.timeout = base, body, timeout
        self.response: httpx.Response | None = None
        self.error: Exception | None = None
        self.seconds = 0.0

    def run(self) -> None:
        t0 = time.monotonic()
        try:
            self.response = httpx.post(
                f"{self.base}/v1/embeddings", json=self.body, timeout=self.timeout
            )
        except Exception as e:  # noqa: BLE001 — reported by result()
            self.error = e
        self.seconds = time.monotonic() - t0

    def result(self) -> httpx.Response:
        self.join(self.timeout + 10)
        assert self.response is not None, f"no response: {self.error!r}"
        return self.response


def scrape(base: str, name: str, **labels: str) -> float:
    """One sample of a process's /metrics (API or worker metrics port)."""
    with httpx.Client(base_url=base, timeout=5) as client:
        return metric(client, name, **labels)
