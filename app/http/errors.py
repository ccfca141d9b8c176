"""The one error shape of the API: {"error": {"message", "type", "param", "code"}}, for every
failure (ours, validation, HTTP, unexpected)."""

from __future__ import annotations

import logging

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response

from app.core.errors import APIError
from app.metrics import ERRORS

log = logging.getLogger(__name__)


def _text(s: str | None) -> str | None:
    """A string JSON can carry: a lone surrogate from a client (valid JSON, not UTF-8) becomes
    its escape, so an error about bad input never fails to be written itself."""
    if s is None:
        return None
    return s.encode("utf-8", "backslashreplace").decode("utf-8")


def error_body(message: str, type_: str, param: str | None, code: str | None) -> bytes:
    return orjson.dumps(
        {
            "error": {
                "message": _text(message),
                "type": type_,
                "param": _text(param),
                "code": _text(code),
            }
        }
    )


def error_response(err: APIError) -> Response:
    ERRORS.labels(err.code or err.type).inc()
    return Response(
        error_body(err.message, err.type, err.param, err.code),
        status_code=err.status,
        media_type="application/json",
        headers=err.headers,
    )


def _loc_to_param(loc: tuple) -> str:
    """('body', 'input', 'list[str]', 3) → 'input[3]'; ('body', 'ids') → 'ids'; ('query',
    'dimensions') → 'dimensions'.

    Requests have no nested objects, so every string after the field name is a union branch
    tag that pydantic adds to the location ('str', 'list[str]'): dropped.
    """
    parts = [p for p in loc if p not in ("body", "query", "path")]
    if not parts or isinstance(parts[0], int):  # invalid JSON: loc is a character offset
        return "body"
    return str(parts[0]) + "".join(f"[{p}]" for p in parts[1:] if isinstance(p, int))


def _most_specific(errors: list[dict]) -> dict:
    """The error that names an item (most indices), else the first: for `input: [.., 7]` the
    `list[str]` branch's error (input[1]) rather than the `str` branch's (input)."""
    return max(errors, key=lambda e: sum(isinstance(p, int) for p in e.get("loc", ())))


def _unparsable_body(cause: BaseException | None) -> str | None:
    """Why the JSON parser gave up on a body, for the errors FastAPI reports as a bare 400."""
    if isinstance(cause, RecursionError):  # json's C scanner stops at the recursion limit
        return "nested too deeply"
    if isinstance(cause, UnicodeDecodeError):
        return "not UTF-8 text"
    if isinstance(cause, ValueError):  # e.g. an integer longer than int's 4300-digit limit
        return "a value cannot be represented (a number too long?)"
    return None


def install_handlers(app: FastAPI) -> None:
    """Map every failure (ours, validation, HTTP, unexpected) onto the one error shape."""

    @app.exception_handler(APIError)
    async def _api(_: Request, exc: APIError) -> Response:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> Response:
        first = _most_specific(list(exc.errors()))
        loc = tuple(first.get("loc", ()))
        param = _loc_to_param(loc)
        msg = first.get("msg", "invalid request")
        if first.get("type") == "extra_forbidden":
            msg = f"unknown field {param!r}"
        elif first.get("type") == "json_invalid":
            at = f" at character {loc[-1]}" if loc and isinstance(loc[-1], int) else ""
            msg = f"request body is not valid JSON{at}: {first.get('ctx', {}).get('error', msg)}"
        else:
            msg = f"{param}: {msg}"
        # 400, not FastAPI's 422: OpenAI's clients raise BadRequestError only for a 400.
        return error_response(APIError(400, msg, param=param, code=first.get("type")))

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> Response:
        if exc.status_code == 400 and (why := _unparsable_body(exc.__cause__)):
            # FastAPI turns every body-parsing failure other than a JSONDecodeError into a bare
            # 400; they are invalid JSON all the same, answered like the rest (json_invalid).
            msg = f"request body is not valid JSON: {why}"
            return error_response(APIError(400, msg, param="body", code="json_invalid"))
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return error_response(
            APIError(exc.status_code, str(exc.detail), code=code, headers=dict(exc.headers or {}))
        )

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> Response:
        log.exception("unhandled error")
        return error_response(APIError(500, "internal error", type="server_error", code="internal"))
