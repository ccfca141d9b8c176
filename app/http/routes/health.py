"""Health probes: /health/live and /health/ready — the only routes open without an API key."""

from __future__ import annotations

from fastapi import APIRouter, Request
from starlette.responses import JSONResponse, Response

from app.core.service import EmbeddingService
from app.http.levels import levels_info
from app.http.schemas import Liveness, Readiness

router = APIRouter(tags=["health"])


@router.get("/health/live", response_model=Liveness, summary="The process is up.")
async def live() -> Liveness:
    return Liveness()


@router.get(
    "/health/ready",
    response_model=Readiness,
    responses={503: {"model": Readiness}},
    summary="Warm and able to serve.",
)
async def ready(request: Request) -> Response:
    service: EmbeddingService = request.app.state.service
    infos, ready_dim, st = await levels_info(service)
    all_ready = ready_dim == service.artifact.max_dim
    status = "ready" if all_ready else ("unavailable" if st.error and not ready_dim else "warming")
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
