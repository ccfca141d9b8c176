"""The FastAPI application: the routers, the gate, the error shape, and the lifespan of the
dispatcher and cache."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import APIRouter, FastAPI

from app import metrics as m
from app.core.heap import freeze_heap
from app.core.service import EmbeddingService
from app.http.errors import install_handlers
from app.http.middleware import Gate
from app.http.openapi import document_gate
from app.http.routes import embeddings, health, metrics, models
from models import __version__

#: Every router of the API; routes of PUBLIC routers need no API key.
ROUTERS: tuple[APIRouter, ...] = (embeddings.router, models.router, health.router, metrics.router)
PUBLIC: tuple[APIRouter, ...] = (health.router,)


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
    for router in ROUTERS:
        app.include_router(router)
    public = frozenset(r.path for router in PUBLIC for r in router.routes)  # type: ignore[attr-defined]
    keys = settings.keys()
    app.add_middleware(
        Gate,
        routes=app.router.routes,
        public_paths=public,
        api_keys=keys,
        max_body_bytes=settings.max_body_bytes,
        # Room for one value per sequence and per id (commas inside ids count too).
        max_json_values=max(2**16, 4 * settings.max_sequences),
    )
    generate_openapi = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            app.openapi_schema = document_gate(generate_openapi(), bool(keys), public)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    app.state.service = service
    return app
