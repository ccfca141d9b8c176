"""Helpers to run rdserve as real OS processes (API, workers, redis-server) in tests."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import httpx

if TYPE_CHECKING:
    import redis

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Proc:
    """A child process with its combined output in a log file (shown when a test fails)."""

    def __init__(self, argv: Sequence[str], env: dict[str, str], log: Path) -> None:
        self.log = log
        self.fh = open(log, "wb")  # noqa: SIM115 — lives as long as the process
        full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", **env}
        self.p = subprocess.Popen(
            list(argv), env=full_env, stdout=self.fh, stderr=subprocess.STDOUT, cwd=REPO
        )

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def alive(self) -> bool:
        return self.p.poll() is None

    def signal(self, sig: int) -> None:
        """Send a signal (e.g. SIGTERM for a graceful stop, SIGKILL for a crash)."""
        self.p.send_signal(sig)

    def wait(self, timeout: float = 60) -> int:
        """Exit code once the process ends on its own."""
        return self.p.wait(timeout)

    def stop(self, timeout: float = 15) -> int:
        if self.alive():
            self.p.terminate()
            try:
                self.p.wait(timeout)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait()
        self.fh.close()
        return self.p.returncode


def rdserve(*args: str, env: dict[str, str], log: Path) -> Proc:
    return Proc([sys.executable, "-m", "app", *args], env, log)


def wait_http(url: str, proc: Proc, timeout: float = 90, status: int = 200) -> httpx.Response:
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        if not proc.alive():
            raise AssertionError(f"process exited:\n{proc.output()[-4000:]}")
        try:
            last = httpx.get(url, timeout=2)
            if last.status_code == status:
                return last
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise AssertionError(
        f"{url} not {status} in {timeout}s (last: {last and last.text})\n{proc.output()[-4000:]}"
    )


def clear_prefix(url: str, prefix: str) -> None:
    import redis

    r = redis.Redis.from_url(url)
    keys = list(r.scan_iter(match=f"{prefix}:*", count=500))
    if keys:
        r.delete(*keys)
    r.close()


class RedisServer:
    """A private redis-server on a free port (no persistence) that tests may stop and restart."""

    def __init__(self, log_dir: Path) -> None:
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.log_dir = log_dir
        self.proc: subprocess.Popen | None = None

    #: What a running server answers to PING (before any AUTH).
    PONG = b"+PONG"

    def argv(self) -> list[str]:
        argv = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", ""]
        return [*argv, "--appendonly", "no", "--dir", str(self.log_dir)]

    def env(self) -> dict[str, str] | None:
        """The server process's environment (None: this process's)."""
        return None

    def start(self) -> RedisServer:
        self.proc = subprocess.Popen(
            self.argv(), env=self.env(), stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as c:
                    c.sendall(b"PING\r\n")
                    if c.recv(16).startswith(self.PONG):
                        return self
            except OSError:
                time.sleep(0.05)
        raise AssertionError(f"redis-server did not start on port {self.port}")

    def stop(self) -> None:
        """Stop it; what it held is gone (it keeps nothing on disk)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
        self.proc = None

    def client(self) -> redis.Redis:
        import redis

        return redis.Redis.from_url(self.url)


def cluster_port() -> int:
    """A free port for a cluster node whose bus port (port + 10000) is free too."""
    while True:
        port = free_port()
        if port + 10000 > 65535:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        return port


class RedisClusterServers:
    """A real Redis Cluster on free ports: ``masters`` masters, each with ``replicas`` replicas
    (redis-server --cluster-enabled yes, joined by redis-cli --cluster create), no persistence;
    a node can be killed (its replica is promoted after ``node_timeout_ms``)."""

    def __init__(
        self, log_dir: Path, masters: int = 3, replicas: int = 1, node_timeout_ms: int = 2000
    ) -> None:
        self.log_dir = log_dir
        self.ports = [cluster_port() for _ in range(masters * (1 + replicas))]
        self.replicas, self.node_timeout_ms = replicas, node_timeout_ms
        self.procs: dict[int, subprocess.Popen] = {}

    @property
    def url(self) -> str:
        """Any node's address: a cluster client finds the others."""
        return f"redis://127.0.0.1:{self.ports[1]}/0"

    def start(self) -> RedisClusterServers:
        for port in self.ports:
            d = self.log_dir / f"node-{port}"
            d.mkdir(parents=True, exist_ok=True)
            argv = ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", ""]
            argv += ["--appendonly", "no", "--dir", str(d), "--cluster-enabled", "yes"]
            argv += ["--cluster-config-file", "nodes.conf"]
            argv += ["--cluster-node-timeout", str(self.node_timeout_ms)]
            self.procs[port] = subprocess.Popen(
                argv, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT
            )
        for port in self.ports:
            self._wait_ping(port)
        nodes = [f"127.0.0.1:{p}" for p in self.ports]
        create = ["redis-cli", "--cluster", "create", *nodes, "--cluster-yes"]
        subprocess.run(
            [*create, "--cluster-replicas", str(self.replicas)],
            check=True,
            capture_output=True,
            timeout=60,
        )
        self.wait_ok()
        return self

    def _wait_ping(self, port: int) -> None:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.2) as c:
                    c.sendall(b"PING\r\n")
                    if c.recv(16).startswith(b"+PONG"):
                        return
            except OSError:
                time.sleep(0.05)
        raise AssertionError(f"cluster node {port} did not start")

    def cluster_info(self, port: int) -> dict[str, str]:
        out = subprocess.run(
            ["redis-cli", "-p", str(port), "cluster", "info"], capture_output=True, text=True
        ).stdout
        return dict(ln.strip().split(":", 1) for ln in out.splitlines() if ":" in ln)

    def wait_ok(self, timeout: float = 60) -> None:
        """Until every live node says cluster_state:ok."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            live = [p for p, proc in self.procs.items() if proc.poll() is None]
            if all(self.cluster_info(p).get("cluster_state") == "ok" for p in live):
                return
            time.sleep(0.2)
        raise AssertionError("redis cluster not ok")

    def masters(self) -> list[int]:
        """Ports of the live nodes that are masters now."""
        out = []
        for port, proc in self.procs.items():
            if proc.poll() is None:
                role = subprocess.run(
                    ["redis-cli", "-p", str(port), "role"], capture_output=True, text=True
                ).stdout.split()
                if role[:1] == ["master"]:
                    out.append(port)
        return out

    def master_of(self, key: str) -> int:
        """The port of the master that holds ``key``'s slot now."""
        import redis

        c = redis.RedisCluster(host="127.0.0.1", port=self.ports[0])
        try:
            return int(c.get_node_from_key(key).port)
        finally:
            c.close()

    def kill(self, port: int) -> None:
        self.procs[port].kill()
        self.procs[port].wait(10)

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.terminate()
                proc.wait(10)
