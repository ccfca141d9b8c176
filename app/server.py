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
    LevelInfo,
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


def _errors(*codes: int) -> dict:
    return {
        c: {"description": "Error", "content": {"application/json": {"example": ERROR_EXAMPLE}}}
        for c in codes
    }


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
            200: {"model": EmbeddingResponse, "content": {NPY: {}, "application/x-npz": {}}},
            **_errors(401, 404, 413, 422, 429, 503, 504),
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

    @app.get("/health/live", summary="The process is up.")
    async def live() -> dict:
        return {"status": "live"}

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

    @app.get("/metrics", summary="Prometheus metrics.", response_class=Response)
    async def metrics() -> Response:
        m.QUEUE_DEPTH.set(await service.dispatcher.queue_depth())
        m.WORKERS_LIVE.set((await service.dispatcher.status()).workers)  # both modes
        return Response(generate_latest(m.REGISTRY), media_type=CONTENT_TYPE_LATEST)

    app.add_middleware(Gate, api_keys=settings.keys(), max_body_bytes=settings.max_body_bytes)
    app.state.service = service
    return app
