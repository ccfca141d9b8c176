"""A worker process's HTTP endpoint: Prometheus ``/metrics`` and a real ``/health/live``.

Liveness means the worker loop turns: it takes a new turn at least every ~0.5 s when idle, so a
loop that has not turned for ``stall_s`` (longer than any batch should take) is stuck.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import orjson
from prometheus_client import make_wsgi_app

from app.core.worker import WorkerState
from app.metrics import REGISTRY

StartResponse = Callable[[str, list[tuple[str, str]]], object]


class _Quiet(WSGIRequestHandler):
    def log_message(self, *args: object) -> None:  # scrapes every few seconds: not worth a line
        return


def health_app(state: WorkerState, last_turn: Callable[[], float], stall_s: float) -> Callable:
    """WSGI app: /health/live → 200 while the loop turns, else 503; anything else → metrics."""
    metrics = make_wsgi_app(REGISTRY)

    def app(environ: dict, start_response: StartResponse) -> Iterable[bytes]:
        if environ.get("PATH_INFO") != "/health/live":
            return metrics(environ, start_response)
        idle = time.time() - last_turn()
        ok = state.error is None and (not state.running or idle < stall_s)
        body = orjson.dumps(
            {
                "status": "live" if ok else "stalled",
                "worker": state.name,
                "running": state.running,
                "seconds_since_loop": round(idle, 1),
                "error": state.error,
            }
        )
        start_response(
            "200 OK" if ok else "503 Service Unavailable", [("Content-Type", "application/json")]
        )
        return [body]

    return app


def serve_worker_http(
    port: int,
    state: WorkerState,
    last_turn: Callable[[], float],
    stall_s: float,
    host: str = "0.0.0.0",  # Prometheus scrapes it from other containers  # nosec B104
) -> WSGIServer:
    """Start the endpoint in a daemon thread; returns the server (``shutdown()`` stops it)."""
    server = make_server(host, port, health_app(state, last_turn, stall_s), handler_class=_Quiet)
    threading.Thread(target=server.serve_forever, name="rdserve-worker-http", daemon=True).start()
    return server
