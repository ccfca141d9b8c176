"""GET /metrics — Prometheus exposition of this API process."""

from __future__ import annotations

from fastapi import APIRouter, Request
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.responses import Response

from app import metrics as m
from app.core.service import EmbeddingService

router = APIRouter(tags=["metrics"])


@router.get(
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
async def metrics(request: Request) -> Response:
    service: EmbeddingService = request.app.state.service
    await service.dispatcher.queue_depth()  # refreshes the queue gauges
    m.WORKERS_LIVE.set((await service.dispatcher.status()).workers)  # both modes
    return Response(generate_latest(m.REGISTRY), media_type=CONTENT_TYPE_LATEST)
