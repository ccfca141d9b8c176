"""POST /v1/embeddings — OpenAI-compatible embeddings."""

from __future__ import annotations

from fastapi import APIRouter, Request
from starlette.responses import Response

from app.core.service import EmbeddingService, EmbedQuery
from app.http.encoding import NPY, NPZ, binary_body, json_body, wants_npy
from app.http.openapi import BINARY, error_responses
from app.http.schemas import EmbeddingRequest, EmbeddingResponse

router = APIRouter(tags=["embeddings"])


@router.post(
    "/v1/embeddings",
    response_model=None,
    responses={
        200: {
            "model": EmbeddingResponse,
            "description": "JSON, or with `Accept: application/x-npy` a .npy (pooled) or "
            ".npz (per residue) array.",
            "content": {NPY: {"schema": BINARY}, NPZ: {"schema": BINARY}},
        },
        **error_responses(404, 413, 422, 429, 500, 503, 504),
    },
    summary="Embed protein sequences (OpenAI-compatible).",
)
async def embeddings(req: EmbeddingRequest, request: Request) -> Response:
    """k-dim reverse-distilled embeddings; send `Accept: application/x-npy` for binary."""
    service: EmbeddingService = request.app.state.service
    query = EmbedQuery(
        inputs=[req.input] if isinstance(req.input, str) else req.input,
        ids=req.ids,
        model=req.model,
        dimensions=req.dimensions,
        pooling=req.pooling,
        policy=req.long_sequence_policy,
        normalize=req.normalize,
    )
    out = await service.embed(query, request.scope["state"]["request_id"])
    if wants_npy(request.headers.get("accept")):
        return binary_body(req, out, service.artifact)
    return json_body(req, out, service.artifact)
