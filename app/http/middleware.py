"""One pure-ASGI gate per request: request id, API keys, body limit, metrics, access log."""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
import time
import uuid
from collections.abc import Awaitable, Callable, Collection, MutableMapping, Sequence
from typing import Any

from starlette.routing import BaseRoute

from app import metrics as m
from app.http.errors import error_body
from app.http.routing import RouteInfo, route_table

log = logging.getLogger("rdserve.access")
errors_log = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

_SAFE_ID = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")


class Gate:
    """Wraps the app: everything here happens before the body is parsed."""

    def __init__(
        self,
        app: ASGIApp,
        api_keys: list[str],
        max_body_bytes: int,
        max_json_values: int = 2**16,
        *,
        routes: Sequence[BaseRoute] = (),
        public_paths: Collection[str] = (),
    ) -> None:
        self.app = app
        # The app's own route table labels metrics (read at the first request, once every route
        # is in), and the public paths — the health router's — are the only ones without a key.
        self._routes = routes
        self._table: list[RouteInfo] | None = None
        self.public = frozenset(public_paths)
        # Only digests are kept and compared: equal-length inputs to compare_digest, so the time
        # taken reveals neither a key's length nor how much of it a guess got right.
        self.key_digests = [hashlib.sha256(k.encode()).digest() for k in api_keys]
        self.max_body = max_body_bytes
        self.max_json_values = max_json_values

    def _principal(self, header: bytes | None) -> str | None:
        """Who is calling: a prefix of the key's digest (what bulk jobs belong to), "anonymous"
        when no keys are configured; None without a valid key."""
        if not self.key_digests:
            return ANONYMOUS
        if header is None or not header.lower().startswith(b"bearer "):
            return None
        token = hashlib.sha256(header[7:].strip()).digest()
        ok = False
        for key in self.key_digests:  # no early exit: timing does not reveal which key matched
            ok |= hmac.compare_digest(token, key)
        return token.hex()[:32] if ok else None

    def route_of(self, scope: Scope) -> RouteInfo | None:
        """The route that serves this request's path, for any method (None: no route)."""
        if self._table is None:
            self._table = route_table(self._routes)
        path = scope["path"]
        # Any method: a path served for another method is labelled too (answered 405).
        return next((r for r in self._table if r.matches(path)), None)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        headers = dict(scope["headers"])
        rid_in = headers.get(b"x-request-id", b"").decode("latin-1")
        rid = rid_in if _SAFE_ID.match(rid_in) else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = rid
        path = scope["path"]
        info = self.route_of(scope)
        # The path template ("other" for none): a bounded metric label, e.g. "/v1/embeddings".
        route = info.path if info is not None else "other"
        status = {"code": 500, "started": False}

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"], status["started"] = message["status"], True
                message.setdefault("headers", []).append((b"x-request-id", rid.encode()))
            await send(message)

        async def reject(
            code: int, msg: str, type_: str, err: str, extra: list | None = None
        ) -> None:
            m.ERRORS.labels(err).inc()
            await send_with_id(
                {
                    "type": "http.response.start",
                    "status": code,
                    "headers": [(b"content-type", b"application/json"), *(extra or [])],
                }
            )
            await send_with_id(
                {"type": "http.response.body", "body": error_body(msg, type_, None, err)}
            )

        try:
            principal = self._principal(headers.get(b"authorization"))
            authorised = principal is not None
            scope["state"]["authenticated"] = authorised  # public routes show less without
            scope["state"]["principal"] = principal or ANONYMOUS
            if not authorised and route not in self.public:
                await reject(
                    401,
                    "missing or invalid API key (use 'Authorization: Bearer KEY')",
                    "authentication_error",
                    "invalid_api_key",
                    [(b"www-authenticate", b'Bearer realm="rdserve"')],
                )
                return
            method = scope["method"]
            if info is not None and info.methods and method not in info.methods:
                # Answered here, not by the router: Allow must list the methods of every route
                # of the path (GET and POST /v1/jobs are two routes; Starlette names one).
                extra = [(b"allow", ", ".join(sorted(info.methods)).encode())]
                if _has_body(headers):
                    extra.append((b"connection", b"close"))  # its body is never read
                await reject(
                    405, "Method Not Allowed", "invalid_request_error", "method_not_allowed", extra
                )
                return
            takes_body = info is not None and method in info.methods and method in BODY_METHODS
            if not takes_body and _has_body(headers):
                # Only a route that takes a body gets one read: health probes, unknown paths and
                # wrong methods are refused before a byte of it (and the connection closed).
                code, msg, err = (
                    (404, "Not Found", "not_found")
                    if info is None
                    else (400, f"{method} {route} takes no request body", "unexpected_body")
                )
                await reject(code, msg, "invalid_request_error", err, [(b"connection", b"close")])
                return
            if takes_body and info is not None and info.streams_body and not _json(headers):
                pass  # an upload: the route reads it as it arrives, under its own limit
            elif takes_body:
                # A declared length over the limit is refused before a byte of the body is read.
                too_long = _declared_length(headers) > self.max_body
                body = None if too_long else await self._read_body(receive)
                if body is None:
                    await reject(
                        413,
                        f"request body exceeds {self.max_body} bytes",
                        "invalid_request_error",
                        "body_too_large",
                    )
                    return
                if _json_values_bound(body) > self.max_json_values:
                    # Parsed JSON costs up to ~30x its bytes in Python objects ("[]," is 3 bytes,
                    # an empty list ~80), and deep nesting recurses: both are bounded by the count
                    # of values, which real requests keep small (one per sequence and id).
                    await reject(
                        413,
                        f"request body has more than {self.max_json_values} JSON arrays, objects "
                        "or items; a request carries one string per sequence (and per id)",
                        "invalid_request_error",
                        "body_too_complex",
                    )
                    return
                receive = _replay(body, receive)
            try:
                await self.app(scope, receive, send_with_id)
            except Exception:
                # Answered here rather than by Starlette's outermost error middleware, so that
                # a 500 also carries the request id and the one error shape.
                errors_log.exception("unhandled error", extra={"request_id": rid})
                if status["started"]:
                    raise
                await reject(500, "internal error", "server_error", "internal")
        finally:
            took = time.perf_counter() - t0
            m.REQUESTS.labels(route, str(status["code"])).inc()
            m.REQUEST_DURATION.labels(route).observe(took)
            if route != "/metrics" and route not in self.public:  # probes: every few seconds
                log.info(
                    "request",
                    extra={
                        "request_id": rid,
                        "method": scope["method"],
                        "path": path,
                        "status": status["code"],
                        "duration_ms": round(took * 1000, 2),
                    },
                )

    async def _read_body(self, receive: Receive) -> bytes | None:
        """The whole body, or None as soon as it exceeds the limit (nothing gets parsed)."""
        chunks, size = [], 0
        while True:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                break
            chunk = msg.get("body", b"")
            size += len(chunk)
            if size > self.max_body:
                return None
            chunks.append(chunk)
            if not msg.get("more_body", False):
                break
        return b"".join(chunks)


BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})
#: The principal of requests when no API keys are configured.
ANONYMOUS = "anonymous"


def _json(headers: dict[bytes, bytes]) -> bool:
    """Whether the body is declared as JSON (what the gate buffers and bounds)."""
    media = headers.get(b"content-type", b"").split(b";")[0].strip().lower()
    return media == b"application/json"


def _has_body(headers: dict[bytes, bytes]) -> bool:
    """Whether the request declares a body (a non-zero Content-Length, or chunked)."""
    return _declared_length(headers) > 0 or b"transfer-encoding" in headers


def _declared_length(headers: dict[bytes, bytes]) -> int:
    """The Content-Length header's value; -1 when absent or malformed (the body is then read)."""
    try:
        return int(headers.get(b"content-length", b"-1"))
    except ValueError:
        return -1


def _json_values_bound(body: bytes) -> int:
    """An upper bound on the number of values in ``body`` parsed as JSON, in C-speed scans.

    Every value but the first follows a comma or opens a container; bytes inside strings are
    counted too, which only errs towards a larger bound.
    """
    return body.count(b",") + 2 * (body.count(b"[") + body.count(b"{")) + 1


def _replay(body: bytes, upstream: Receive) -> Receive:
    """The body read once, then the connection's own messages: a streamed response listens
    for http.disconnect and must only see a real one."""
    sent = False

    async def receive() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await upstream()

    return receive
