"""The service's errors: what went wrong, for whom, and the HTTP status it is answered with.

Raised by the core (and the gate); ``app.http.errors`` renders every one in the one error shape
``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations


class APIError(Exception):
    """An error response: HTTP status, message naming the field/item, OpenAI-style type and code."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type = status, message, type
        self.param, self.code, self.headers = param, code, headers or {}
