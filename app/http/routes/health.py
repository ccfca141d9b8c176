"""Health probes and server info — the only routes open without an API key: /health/live,
/health/ready (also under /v1/health/…, NVIDIA NIM's names) and /info."""

from __future__ import annotations

from fastapi import APIRouter, Request
from starlette.responses import JSONResponse, Response

from app.core.dispatch import FleetStatus
from app.core.service import EmbeddingService
from app.http.levels import levels_info
from app.http.schemas import LevelSummary, Limits, Liveness, Readiness, ServerInfo
from models import __version__
from models.sequences import Pooling

router = APIRouter(tags=["health"])


@router.get("/health/live", response_model=Liveness, summary="The process is up.")
@router.get("/v1/health/live", response_model=Liveness, include_in_schema=False)
async def live() -> Liveness:
    return Liveness()


def _state(all_ready: bool, ready_dim: int, st: FleetStatus, wakes: bool) -> tuple[str, str | None]:
    """(status, reason): why it is not ready, the most specific cause first. ``wakes``: the
    fleet scales to zero, so no worker is a state to serve from (idle), not a failure."""
    if all_ready:
        return "ready", None
    if not st.queue_ok:
        return "unavailable", "queue_unavailable"
    if st.error and not ready_dim:
        return "unavailable", "worker_error"
    if not st.workers:
        return ("idle" if wakes else "unavailable"), "no_worker"
    return "warming", "worker_error" if st.error else "warming"


@router.get(
    "/health/ready",
    response_model=Readiness,
    responses={503: {"model": Readiness, "description": "Not ready; `reason` says why."}},
    summary="Warm and able to serve.",
)
@router.get("/v1/health/ready", response_model=Readiness, include_in_schema=False)
async def ready(request: Request) -> Response:
    """ready: every level is warm in a live worker; warming: a live worker is still loading;
    idle (200): no worker, but requests wait for one to start (RDSERVE_WORKER_WAKE_S);
    unavailable: no live worker, no task queue, or a fatal worker error (``reason``). Model paths
    and error messages (hosts, ports) are shown only with a valid key when keys are set."""
    service: EmbeddingService = request.app.state.service
    infos, ready_dim, st = await levels_info(service)
    all_ready = ready_dim == service.artifact.max_dim
    wakes = service.dispatcher.mode == "distributed" and service.settings.worker_wake_s > 0
    status, reason = _state(all_ready, ready_dim, st, wakes)
    body = Readiness(
        status=status,  # type: ignore[arg-type]
        ready_up_to_dimensions=ready_dim,
        mode=service.dispatcher.mode,
        workers=st.workers,
        reason=reason,
    )
    if request.scope["state"].get("authenticated", True):
        body.levels = infos
        if not all_ready and st.error:
            body.error = st.error
        elif reason == "no_worker":
            body.error = "no live worker serves this artifact"
    payload = body.model_dump(mode="json", exclude_none=True)
    return JSONResponse(payload, status_code=200 if status in ("ready", "idle") else 503)


@router.get("/info", response_model=ServerInfo, summary="What this server serves and accepts.")
@router.get("/v1/info", response_model=ServerInfo, include_in_schema=False)
async def info(request: Request) -> ServerInfo:
    """Version, family, levels and dims, request limits, artifact hash and mode (the
    text-embeddings-inference route): what a client needs to size its batches."""
    service: EmbeddingService = request.app.state.service
    art, s = service.artifact, service.settings
    poolings = [p.value for p in Pooling if p != Pooling.bos or service.family.has_bos]
    return ServerInfo(
        version=__version__,
        model_id=art.name,
        family=art.family,
        family_selection=service.family_selection,
        max_dimensions=art.max_dim,
        levels=[
            LevelSummary(name=lv.name, dim=lv.dim, max_residues=service.family.max_residues)
            for lv in art.levels
        ],
        poolings=poolings,
        artifact_sha256=art.sha256,
        mode=service.dispatcher.mode,
        limits=Limits(
            max_sequences=s.max_sequences,
            max_residues=s.max_residues,
            max_residues_per_sequence=service.family.max_residues,
            max_body_bytes=s.max_body_bytes,
            max_output_bytes=s.max_output_bytes,
            token_budget=service.token_budget,
        ),
    )
