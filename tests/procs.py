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
