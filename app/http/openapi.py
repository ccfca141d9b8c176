"""The OpenAPI document: the one error shape per status, and what the ASGI gate adds to every
operation (auth, body limits, request ids)."""

from __future__ import annotations

from collections.abc import Container
from typing import Any

from app.http.schemas import ErrorResponse

ERROR_EXAMPLE = {
    "error": {
        "message": "input[2]: invalid residue 'J' at position 5; allowed: …",
        "type": "invalid_request_error",
        "param": "input[2]",
        "code": "invalid_sequence",
    }
}
ERROR_CASES = {
    401: "Missing or invalid API key (only when keys are configured).",
    404: "The requested model is not served here.",
    413: "Body over max_body_bytes, or with too many JSON values.",
    422: "Invalid request: the field and item are named in `param`.",
    429: "The request queue is full; retry after `Retry-After` seconds.",
    500: "Internal error, or a sequence the worker could not embed.",
    503: "No worker or no task queue; retry after `Retry-After` seconds.",
    504: "The request did not finish within request_timeout_s.",
}
RETRY_AFTER = {
    "Retry-After": {
        "description": "Seconds to wait.",
        "schema": {"type": "string", "pattern": "^[0-9]+$"},
        "required": True,
    }
}
# Headers of error responses, by status (documented, and so checked by the API fuzz test).
ERROR_HEADERS = {
    401: {
        "WWW-Authenticate": {
            "description": "The Bearer scheme.",
            "schema": {"type": "string"},
            "required": True,
        }
    },
    429: RETRY_AFTER,
    503: RETRY_AFTER,
}
REQUEST_ID = {
    "X-Request-ID": {
        "description": "The client's X-Request-ID if it is a safe token, else a generated one.",
        "schema": {"type": "string", "pattern": "^[A-Za-z0-9._:-]{1,64}$"},
        "required": True,
    }
}
SECURITY_SCHEME = "apiKey"
BINARY = {"type": "string", "format": "binary"}


def error_doc(code: int) -> dict[str, Any]:
    """The OpenAPI response of one error status: the one error shape, and its headers."""
    return {
        "description": ERROR_CASES[code],
        "content": {
            "application/json": {
                "schema": {"$ref": "#/components/schemas/ErrorResponse"},
                "example": ERROR_EXAMPLE,
            }
        },
        **({"headers": ERROR_HEADERS[code]} if code in ERROR_HEADERS else {}),
    }


def error_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """``responses=`` of a route for these error statuses."""
    # "model" registers ErrorResponse under components/schemas, where error_doc's $ref points.
    return {c: {"model": ErrorResponse, **error_doc(c)} for c in codes}


def document_gate(schema: dict, keyed: bool, public: Container[str]) -> dict:
    """Add what the ASGI gate does on every route to the generated OpenAPI document.

    The gate answers before routing (401 without a valid key outside the ``public`` paths, 413
    for bodies, 500 for anything unexpected) and stamps X-Request-ID on every response, so these
    are documented here for all operations rather than repeated on each route.
    """
    if keyed:
        schema.setdefault("components", {})["securitySchemes"] = {
            SECURITY_SCHEME: {
                "type": "http",
                "scheme": "bearer",
                "description": "One of the configured API keys: `Authorization: Bearer KEY`.",
            }
        }
    for path, ops in schema["paths"].items():
        for method, op in ops.items():
            gate_codes = [500]
            if keyed and path not in public:
                op["security"] = [{SECURITY_SCHEME: []}]
                gate_codes.append(401)
            if method in ("post", "put", "patch"):
                gate_codes.append(413)
            for code in gate_codes:
                op["responses"].setdefault(str(code), error_doc(code))
            for response in op["responses"].values():
                response.setdefault("headers", {}).update(REQUEST_ID)
    return schema
