"""The OpenAPI document: the one error shape per status, and what the ASGI gate adds to every
operation (auth, body limits, request ids)."""

from __future__ import annotations

from collections.abc import Container
from typing import Any

from app.http.schemas import ErrorResponse


def _error(message: str, type_: str, param: str | None, code: str) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


#: One example per status, as that status is really answered.
ERROR_EXAMPLES = {
    400: _error(
        "input[2]: invalid residue 'J' at position 5; allowed: ACDEFGHIKLMNPQRSTVWYXBZUO",
        "invalid_request_error",
        "input[2]",
        "invalid_sequence",
    ),
    401: _error(
        "missing or invalid API key (use 'Authorization: Bearer KEY')",
        "authentication_error",
        None,
        "invalid_api_key",
    ),
    404: _error(
        "model 'esm1b' is not served here; this server serves 'esm2-8M-35M-150M' (family 'esm2')",
        "invalid_request_error",
        "model",
        "model_not_found",
    ),
    413: _error(
        "input has 250000 residues; the limit is 200000 (GET /info lists the limits): split "
        "the request",
        "invalid_request_error",
        "input",
        "too_many_residues",
    ),
    409: _error(
        "job job-20261205T120000-0a1b2c3d4e is running: a result exists only once it has succeeded",
        "invalid_request_error",
        "job_id",
        "job_not_finished",
    ),
    415: _error(
        "a job is a FASTA upload (…) or application/json, not 'image/png'",
        "invalid_request_error",
        "content-type",
        "unsupported_media_type",
    ),
    429: _error("the request queue is full; retry later", "rate_limit_error", None, "queue_full"),
    500: _error("internal error", "server_error", None, "internal"),
    503: _error(
        "no worker available: no live worker serves this artifact",
        "server_error",
        None,
        "no_worker",
    ),
    504: _error("the request did not finish within 120 s", "server_error", None, "timeout"),
}
ERROR_CASES = {
    400: "Invalid request: the field and item are named in `param`.",
    401: "Missing or invalid API key (only when keys are configured).",
    404: "The requested model is not served here, or no job of this key has that id.",
    409: "The job has not succeeded (yet): no result.",
    415: "The body is neither FASTA (plain or gzip) nor JSON.",
    413: "Too many sequences or residues, a response over max_output_bytes, or a body over "
    "max_body_bytes or with too many JSON values.",
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
                "example": ERROR_EXAMPLES[code],
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
    # Invalid requests are answered 400 (what OpenAI clients map to BadRequestError), never
    # FastAPI's 422: its generated validation schemas describe nothing this API sends.
    for name in ("HTTPValidationError", "ValidationError"):
        schema.get("components", {}).get("schemas", {}).pop(name, None)
    for path, ops in schema["paths"].items():
        for method, op in ops.items():
            op["responses"].pop("422", None)
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
