"""The FastAPI application: routes, error shape, lifespan of the dispatcher and cache."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.responses import JSONResponse, Response

from app import metrics as m
from app.dispatch import FleetStatus
from app.encoding import NPY, binary_body, json_body, wants_npy
from app.errors import install_handlers
from app.middleware import Gate
from app.schemas import (
    EmbeddingRequest,
    EmbeddingResponse,
    ErrorResponse,
    LevelInfo,
    Liveness,
    ModelCard,
    ModelList,
    Readiness,
)
from app.service import EmbeddingService
from app.worker import freeze_heap
from models import __version__

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
    503: "No worker or no job queue; retry after `Retry-After` seconds.",
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


def _error(code: int) -> dict:
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


def _errors(*codes: int) -> dict:
    # "model" registers ErrorResponse under components/schemas, where _error's $ref points.
    return {c: {"model": ErrorResponse, **_error(c)} for c in codes}


def _document_gate(schema: dict, keyed: bool) -> dict:
    """Add what the ASGI gate does on every route to the generated OpenAPI document.

    The gate answers before routing (401 without a valid key, 413 for bodies, 500 for anything
    unexpected) and stamps X-Request-ID on every response, so these are documented here for all
    operations rather than repeated on each route.
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
            if keyed and not path.startswith("/health"):
                op["security"] = [{SECURITY_SCHEME: []}]
                gate_codes.append(401)
            if method in ("post", "put", "patch"):
                gate_codes.append(413)
            for code in gate_codes:
                op["responses"].setdefault(str(code), _error(code))
            for response in op["responses"].values():
                response.setdefault("headers", {}).update(REQUEST_ID)
    return schema


def create_app(service: EmbeddingService) -> FastAPI:
    """Build the ASGI app around a ready EmbeddingService (mode-agnostic)."""
    art = service.artifact
    settings = service.settings

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        m.ARTIFACT.info(
            {
                "name": art.name,
                "family": art.family,
                "sha256": art.sha256,
                "levels": ",".join(lv.name for lv in art.levels),
                "dims": ",".join(map(str, art.dims)),
                "regressor": art.regressor,
            }
        )
        await service.dispatcher.start()
        freeze_heap()  # the API's own start-up objects; the worker freezes again after warm-up
        try:
            yield
        finally:
            await service.dispatcher.stop()
            await service.cache.close()

    app = FastAPI(
        title="rdserve",
        version=__version__,
        summary="Reverse-distilled protein language model embeddings.",
        lifespan=lifespan,
    )
    install_handlers(app)

    async def levels_info() -> tuple[list[LevelInfo], int, FleetStatus]:
        st = await service.dispatcher.status()
        infos, ready_dim = [], 0
        for i, lv in enumerate(art.levels):
            infos.append(
                LevelInfo(
                    name=lv.name,
                    dim=lv.dim,
                    model_id=lv.model_id,
                    revision=lv.revision,
                    loaded=st.loaded[i],
                    ready=st.ready[i],
                )
            )
            if all(st.ready[: i + 1]) and st.workers:
                ready_dim = lv.dim
        return infos, ready_dim, st

    @app.post(
        "/v1/embeddings",
        response_model=None,
        responses={
            200: {
                "model": EmbeddingResponse,
                "description": "JSON, or with `Accept: application/x-npy` a .npy (pooled) or "
                ".npz (per residue) array.",
                "content": {NPY: {"schema": BINARY}, "application/x-npz": {"schema": BINARY}},
            },
            **_errors(404, 413, 422, 429, 500, 503, 504),
        },
        summary="Embed protein sequences (OpenAI-compatible).",
    )
    async def embeddings(req: EmbeddingRequest, request: Request) -> Response:
        """k-dim reverse-distilled embeddings; send `Accept: application/x-npy` for binary."""
        out = await service.embed(req, request.scope["state"]["request_id"])
        if wants_npy(request.headers.get("accept")):
            return binary_body(req, out, art)
        return json_body(req, out, art)

    @app.get("/v1/models", response_model=ModelList, summary="The served chain and artifact.")
    async def models() -> ModelList:
        infos, _, _ = await levels_info()
        meta = {**art.metadata(), "sha256": art.sha256, "name": art.name}
        return ModelList(
            data=[
                ModelCard(
                    id=art.name,
                    family=art.family,
                    max_dimensions=art.max_dim,
                    levels=infos,
                    artifact=meta,
                )
            ]
        )

    @app.get("/health/live", response_model=Liveness, summary="The process is up.")
    async def live() -> Liveness:
        return Liveness()

    @app.get(
        "/health/ready",
        response_model=Readiness,
        responses={503: {"model": Readiness}},
        summary="Warm and able to serve.",
    )
    async def ready() -> Response:
        infos, ready_dim, st = await levels_info()
        all_ready = ready_dim == art.max_dim
        status = (
            "ready" if all_ready else ("unavailable" if st.error and not ready_dim else "warming")
        )
        body = Readiness(
            status=status,
            ready_up_to_dimensions=ready_dim,
            levels=infos,
            mode=service.dispatcher.mode,
            workers=st.workers,
        )
        payload = body.model_dump(mode="json")
        if st.error:
            payload["error"] = st.error
        return JSONResponse(payload, status_code=200 if all_ready else 503)

    @app.get(
        "/metrics",
        summary="Prometheus metrics.",
        response_class=Response,
        responses={
            200: {
                "description": "Prometheus text exposition format.",
                "content": {CONTENT_TYPE_LATEST: {"schema": {"type": "string"}}},
            }
        },
    )
    async def metrics() -> Response:
        m.QUEUE_DEPTH.set(await service.dispatcher.queue_depth())
        m.WORKERS_LIVE.set((await service.dispatcher.status()).workers)  # both modes
        return Response(generate_latest(m.REGISTRY), media_type=CONTENT_TYPE_LATEST)

    keys = settings.keys()
    app.add_middleware(
        Gate,
        api_keys=keys,
        max_body_bytes=settings.max_body_bytes,
        # Room for one value per sequence and per id (commas inside ids count too).
        max_json_values=max(2**16, 4 * settings.max_sequences),
    )
    generate_openapi = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            app.openapi_schema = _document_gate(generate_openapi(), keyed=bool(keys))
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    app.state.service = service
    return app
