"""One cluster harness for the distributed, fault and security tests (and the benchmarks): an API
process and worker processes over one Redis — a private redis-server on a free port."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import httpx

from tests.helpers import metric
from tests.procs import Proc, free_port, rdserve


def cluster_env(redis_url: str, artifact: Path | str, prefix: str, **extra: str) -> dict[str, str]:
    """The environment of every process of a test cluster (fast heartbeats, no metrics port)."""
    return {
        "RDSERVE_REDIS_URL": redis_url,
        "RDSERVE_REDIS_PREFIX": prefix,
        "RDSERVE_ARTIFACT": str(artifact),
        "RDSERVE_DEVICE": "cpu",
        "RDSERVE_HEARTBEAT_S": "0.5",  # a dead worker's heartbeat expires after 2 s
        "RDSERVE_METRICS_PORT": "0",
        **extra,
    }


class Cluster:
    """An API process (started at once) and named worker processes; close() stops them all."""

    def __init__(self, env: dict[str, str], logs: Path) -> None:
        self.env, self.logs = env, logs
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.api = rdserve("serve", "--port", str(self.port), env=env, log=logs / "api.log")
        self.workers: dict[str, Proc] = {}
        self.metrics: dict[str, str] = {}  # worker name → base URL of its metrics port

    def worker(self, name: str, metrics: bool = False, **extra: str) -> Proc:
        """Start a worker named ``name`` (its consumer id), with extra environment; with
        ``metrics`` it serves /metrics on a free port (``self.metrics[name]``)."""
        env = {**self.env, **extra}
        if metrics:
            port = free_port()
            env["RDSERVE_METRICS_PORT"] = str(port)
            self.metrics[name] = f"http://127.0.0.1:{port}"
        w = rdserve("worker", "--worker-id", name, env=env, log=self.logs / f"{name}.log")
        self.workers[name] = w
        return w

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
        for w in self.workers.values():
            w.stop()
        self.api.stop()


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
