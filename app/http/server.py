"""The API's HTTP server process: uvicorn on a socket bound before anything loads, with request
header and body timeouts, a connection cap, and the drain at the end of the shutdown window.

uvicorn itself times out only idle keep-alive connections: a client that opens a connection and
sends its headers (or body) a byte at a time holds it, and its file descriptor, forever. The
protocol here closes it after ``http_header_timeout_s`` (408 in the error shape) or a pause of
``http_body_timeout_s`` in the body, and answers connections past ``http_max_connections`` with
503 at once. On SIGTERM uvicorn stops accepting and waits ``shutdown_timeout_s`` for open
requests, then cancels them (a plain-text 500): just before that, the dispatcher's drain answers
every request still waiting with 503 + Retry-After and withdraws its task.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Callable
from types import FrameType
from typing import Any

import uvicorn
from uvicorn.protocols.http.auto import AutoHTTPProtocol

from app.http.errors import error_body
from app.settings import Settings

#: The drain answers waiting requests this long before uvicorn's own cut (at most 1 s, at most a
#: fifth of the window), so that their 503s are sent before uvicorn cancels what is left.
DRAIN_MARGIN_S = 1.0


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on host:port (OSError when the address is taken or invalid)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # restarts: TIME_WAIT is fine
        sock.bind((host, port))
        sock.listen(2048)
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


def _raw_response(status: int, reason: str, message: str, code: str, extra: str = "") -> bytes:
    kind = "invalid_request_error" if status < 500 else "server_error"
    body = error_body(message, kind, None, code)
    head = (
        f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\nconnection: close\r\n{extra}\r\n"
    )
    return head.encode("ascii") + body


def guarded_protocol(header_s: float, body_s: float, max_connections: int) -> type:
    """uvicorn's HTTP protocol with a deadline for each request's headers, a limit on pauses
    in its body, and a cap on open connections."""
    base: Any = AutoHTTPProtocol

    class Guarded(base):  # type: ignore[misc,valid-type]
        _timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            if len(self.connections) > max_connections:
                transport.write(
                    _raw_response(
                        503,
                        "Service Unavailable",
                        f"the server has {max_connections} open connections, its limit; retry",
                        "too_many_connections",
                        "retry-after: 1\r\n",
                    )
                )
                transport.close()
                return
            self._arm(header_s)  # the first request's headers are due

        def data_received(self, data: bytes) -> None:
            if self.transport.is_closing():  # refused or timed out: read nothing more
                return
            super().data_received(data)
            if self.transport.is_closing():
                self._cancel()
            elif self.cycle is None or self.cycle.response_complete:
                if self._timer is None:  # headers of a new request: due from its first byte
                    self._arm(header_s)
            elif self.cycle.more_body:
                self._arm(body_s)  # a pause between body chunks
            else:
                self._cancel()  # read in full: the app's own deadlines govern

        def on_response_complete(self) -> None:
            self._cancel()  # idle until the next request: uvicorn's keep-alive timer
            super().on_response_complete()

        def connection_lost(self, exc: Exception | None) -> None:
            self._cancel()
            super().connection_lost(exc)

        def _arm(self, seconds: float) -> None:
            self._cancel()
            self._timer = self.loop.call_later(seconds, self._expired)

        def _cancel(self) -> None:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None

        def _expired(self) -> None:
            self._timer = None
            if self.transport.is_closing():
                return
            if self.cycle is None or self.cycle.response_complete:
                self.transport.write(
                    _raw_response(
                        408,
                        "Request Timeout",
                        f"the request's headers did not arrive within {header_s:g} s",
                        "request_timeout",
                    )
                )
            elif self.flow.read_paused:  # we stopped reading, not the client: wait on
                self._arm(body_s)
                return
            self.transport.close()  # a stalled body: the app sees the client leave

    return Guarded


class DrainingServer(uvicorn.Server):
    """uvicorn's server that, on the first exit signal, tells the app when to stop waiting."""

    def __init__(self, config: uvicorn.Config, on_exit: Callable[[], None]) -> None:
        super().__init__(config)
        self._on_exit = on_exit

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if not self.should_exit:
            self._on_exit()
        super().handle_exit(sig, frame)


def serve(
    app: Any, sock: socket.socket, settings: Settings, drain: Callable[[float, float], None]
) -> None:
    """Run uvicorn on the bound socket until a signal, then drain and shut down.

    ``drain(cut_at, window_s)`` is the dispatcher's: requests still waiting at ``cut_at``
    (monotonic) are answered 503 before uvicorn's graceful-shutdown timeout cancels them.
    """
    window = settings.shutdown_timeout_s
    margin = min(DRAIN_MARGIN_S, window / 5)
    config = uvicorn.Config(
        app,
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=window,
        timeout_keep_alive=settings.http_keep_alive_s,  # type: ignore[arg-type]
        http=guarded_protocol(
            settings.http_header_timeout_s,
            settings.http_body_timeout_s,
            settings.http_max_connections,
        ),
    )
    server = DrainingServer(config, lambda: drain(time.monotonic() + window - margin, window))
    server.run(sockets=[sock])
