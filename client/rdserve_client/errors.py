"""rdserve's one error shape ({"error": {"message", "type", "param", "code"}}) as exceptions."""

from __future__ import annotations

import re

import httpx


class RdserveError(Exception):
    """An error answer of the server (or a request the client could not get answered)."""

    def __init__(
        self,
        message: str,
        status: int | None = None,
        code: str | None = None,
        param: str | None = None,
        request_id: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message  # what went wrong, naming the field and item
        self.status = status  # HTTP status (None: no answer)
        self.code = code  # machine-readable reason, e.g. "invalid_sequence"
        self.param = param  # the field and item at fault, e.g. "input[1234]"
        self.request_id = request_id  # the server's X-Request-ID (for its logs)

    @property
    def index(self) -> int | None:
        """The item's index in the caller's input, when the error names one."""
        m = re.fullmatch(r"(?:input|ids)\[(\d+)\]", self.param or "")
        return int(m.group(1)) if m else None

    def __str__(self) -> str:
        where = f" [{self.param}]" if self.param else ""
        return f"{self.status or '-'} {self.code or 'error'}{where}: {self.message}"


class BadRequestError(RdserveError):
    """400: the request is invalid (the item is in ``param``)."""


class AuthenticationError(RdserveError):
    """401: missing or invalid API key."""


class NotFoundError(RdserveError):
    """404: no such model or job (jobs of other keys are not found either)."""


class ConflictError(RdserveError):
    """409: e.g. a job's result before it has succeeded."""


class PayloadTooLargeError(RdserveError):
    """413: over a limit of the server (sequences, residues, output, upload)."""


class RateLimitError(RdserveError):
    """429: the queue is full (retried by the client until its retries run out)."""


class ServiceUnavailableError(RdserveError):
    """503: no worker, no queue, shutting down (retried by the client)."""


class ServerError(RdserveError):
    """Another 5xx (500: a sequence could not be embedded even alone; 504: timeout)."""


_BY_STATUS = {
    400: BadRequestError,
    401: AuthenticationError,
    404: NotFoundError,
    409: ConflictError,
    413: PayloadTooLargeError,
    429: RateLimitError,
    503: ServiceUnavailableError,
}


def error_from(resp: httpx.Response, offset: int = 0) -> RdserveError:
    """The exception for an error answer; ``offset``: where the request's items start in the
    caller's input (``input[3]`` of a part starting at 1000 is the caller's ``input[1003]``)."""
    try:
        err = resp.json()["error"]
        message, code, param = err["message"], err.get("code"), err.get("param")
    except (ValueError, KeyError, TypeError):
        message, code, param = resp.text[:500] or resp.reason_phrase, None, None
    if offset and param:
        param = re.sub(r"^(input|ids)\[(\d+)\]", lambda m: f"{m[1]}[{int(m[2]) + offset}]", param)
        message = re.sub(
            r"\b(input|ids)\[(\d+)\]", lambda m: f"{m[1]}[{int(m[2]) + offset}]", message
        )
    cls = _BY_STATUS.get(resp.status_code, ServerError if resp.status_code >= 500 else RdserveError)
    return cls(message, resp.status_code, code, param, resp.headers.get("x-request-id"))
