"""A worker process's HTTP endpoint: Prometheus ``/metrics`` and a real ``/health/live``; any
other path is 404.

Liveness means the worker loop turns: it takes a new turn at least every ~0.5 s when idle, so a
loop that has not turned for ``stall_s`` (longer than any batch should take) is stuck.

The server is threaded (one daemon thread per connection, at most MAX_CONNECTIONS at once) with
a socket timeout, so an idle or half-sent request never delays a probe: the container health
check gives it 5 s. It binds when created (``WorkerEndpoint(host, port)``), before the models
load, so a port that is taken fails the start at once.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterable
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer

import orjson
from prometheus_client import make_wsgi_app

from app.core.worker import WorkerState
from app.metrics import REGISTRY

StartResponse = Callable[[str, list[tuple[str, str]]], object]
WSGIApp = Callable[[dict, StartResponse], Iterable[bytes]]

#: Seconds a connection may stay silent (while sending its request, or idle) before it is dropped.
SOCKET_TIMEOUT_S = 5.0
#: Connections served at once; more are closed at once (probes and scrapes need one or two).
MAX_CONNECTIONS = 64
PATHS = ("/metrics", "/health/live")


class _Handler(WSGIRequestHandler):
    timeout = SOCKET_TIMEOUT_S  # StreamRequestHandler sets it on the socket

    def log_message(self, *args: object) -> None:  # scrapes every few seconds: not worth a line
        return


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True  # a stuck connection never holds the process at exit
    block_on_close = False

    def __init__(self, address: tuple[str, int]) -> None:
        self._slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        super().__init__(address, _Handler)

    def process_request(self, request: socket.socket, client_address: Any) -> None:  # type: ignore[override]
        if not self._slots.acquire(blocking=False):
            self.shutdown_request(request)
            return
        super().process_request(request, client_address)

    def process_request_thread(self, request: socket.socket, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()


def _json(start_response: StartResponse, status: str, body: dict) -> list[bytes]:
    start_response(status, [("Content-Type", "application/json")])
    return [orjson.dumps(body)]


def _error(start_response: StartResponse, status: str, message: str, code: str) -> list[bytes]:
    error = {"message": message, "type": "invalid_request_error", "param": None, "code": code}
    return _json(start_response, status, {"error": error})


def health_app(state: WorkerState, last_turn: Callable[[], float], stall_s: float) -> WSGIApp:
    """WSGI app: /health/live → 200 while the loop turns, else 503; /metrics; else 404."""
    metrics = make_wsgi_app(REGISTRY)

    def app(environ: dict, start_response: StartResponse) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if path not in PATHS:
            return _error(start_response, "404 Not Found", f"no route {path}", "not_found")
        if environ.get("REQUEST_METHOD") not in ("GET", "HEAD"):
            return _error(
                start_response, "405 Method Not Allowed", f"{path} takes GET", "method_not_allowed"
            )
        if path == "/metrics":
            return metrics(environ, start_response)
        idle = time.time() - last_turn()
        ok = state.error is None and (not state.running or idle < stall_s)
        body = {
            "status": "live" if ok else "stalled",
            "worker": state.name,
            "running": state.running,
            "seconds_since_loop": round(idle, 1),
            "error": state.error,
        }
        return _json(start_response, "200 OK" if ok else "503 Service Unavailable", body)

    return app


class WorkerEndpoint:
    """The endpoint's server: bound at construction (OSError when the port is taken), serving
    in a daemon thread once ``serve`` is given the worker's state."""

    def __init__(self, host: str, port: int) -> None:
        self.server = _Server((host, port))
        self.host, self.port = host, self.server.server_address[1]
        self._serving = False

    def serve(self, state: WorkerState, last_turn: Callable[[], float], stall_s: float) -> None:
        self.server.set_app(health_app(state, last_turn, stall_s))
        self._serving = True
        threading.Thread(
            target=self.server.serve_forever, name="rdserve-worker-http", daemon=True
        ).start()

    def shutdown(self) -> None:
        if self._serving:  # shutdown() waits for serve_forever to return
            self.server.shutdown()
        self.server.server_close()
