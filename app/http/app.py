"""The FastAPI application: the routers, the gate, the error shape, and the lifespan of the
dispatcher and cache."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import APIRouter, FastAPI
from starlette.middleware.cors import CORSMiddleware
from starlette.middleware.gzip import DEFAULT_EXCLUDED_CONTENT_TYPES, GZipMiddleware

from app import metrics as m
from app.core.heap import freeze_heap
from app.core.jobs.manager import JobManager
from app.core.service import EmbeddingService
from app.http.encoding import NPY, NPZ
from app.http.errors import install_handlers
from app.http.middleware import Gate
from app.http.openapi import document_gate
from app.http.routes import embeddings, health, jobs, metrics, models
from app.http.routing import route_table
from models import __version__

#: Every router of the API; routes of PUBLIC routers need no API key.
ROUTERS: tuple[APIRouter, ...] = (
    embeddings.router,
    jobs.router,
    models.router,
    health.router,
    metrics.router,
)
PUBLIC: tuple[APIRouter, ...] = (health.router,)


def create_app(service: EmbeddingService, job_manager: JobManager | None = None) -> FastAPI:
    """Build the ASGI app around a ready EmbeddingService (mode-agnostic); bulk jobs run
    through it (``job_manager``, by default the one the settings describe)."""
    art = service.artifact
    settings = service.settings
    job_manager = job_manager or JobManager.create(service)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        m.export("api", art, sorted({r.path for r in route_table(app.router.routes)}))
        await service.dispatcher.start()
        await job_manager.start()
        freeze_heap()  # the API's own start-up objects; the worker freezes again after warm-up
        try:
            yield
        finally:
            await job_manager.stop()  # before the dispatcher: their chunks in flight withdraw
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
    # Outside the gate, so it compresses what the gate sends. Float arrays gain little from
    # gzip: binary bodies go as they are; level 5 keeps JSON compression cheap on small CPUs.
    app.add_middleware(
        GZipMiddleware,
        minimum_size=1024,
        compresslevel=5,
        exclude_content_types=(*DEFAULT_EXCLUDED_CONTENT_TYPES, NPY, NPZ),
    )
    if origins := settings.cors_origin_list:
        # Outermost: a preflight (OPTIONS, no credentials) is answered before the key check.
        app.add_middleware(
            CORSMiddleware,
            allow_origins=origins,
            allow_methods=["GET", "POST", "DELETE"],
            allow_headers=["Authorization", "Content-Type", "Accept", "X-Request-ID"],
            expose_headers=["X-Request-ID", "Retry-After", "Content-Disposition", "Location"],
            max_age=600,
        )
    generate_openapi = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            app.openapi_schema = document_gate(generate_openapi(), bool(keys), public)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    app.state.service = service
    app.state.jobs = job_manager
    return app
