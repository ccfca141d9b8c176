"""GET /v1/models — the served chain and its artifact."""

from __future__ import annotations

from fastapi import APIRouter, Request

from app.core.service import EmbeddingService
from app.http.levels import levels_info
from app.http.schemas import ModelCard, ModelList

router = APIRouter(tags=["models"])


@router.get("/v1/models", response_model=ModelList, summary="The served chain and artifact.")
async def models(request: Request) -> ModelList:
    service: EmbeddingService = request.app.state.service
    art = service.artifact
    infos, _, _ = await levels_info(service)
    meta = {**art.metadata(), "sha256": art.sha256, "name": art.name}
    return ModelList(
        data=[
            ModelCard(
                id=art.name,
                family=art.family,
                max_dimensions=art.max_dim,
                family_selection=service.family_selection,
                levels=infos,
                artifact=meta,
            )
        ]
    )
