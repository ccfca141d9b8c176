"""POST /v1/embeddings — OpenAI-compatible embeddings."""

from __future__ import annotations

from fastapi import APIRouter, Body, Request
from starlette.responses import Response

from app.core.query import EmbedQuery
from app.core.service import EmbeddingService
from app.http.encoding import NPY, NPZ, binary_body, json_body, value_bytes, wants_binary
from app.http.openapi import BINARY, error_responses
from app.http.schemas import EXAMPLE_REQUEST, EmbeddingRequest, EmbeddingResponse

router = APIRouter(tags=["embeddings"])

EXAMPLES = {
    "pooled": {"summary": "Two sequences, k = 64, with ids", "value": EXAMPLE_REQUEST},
    "per_residue": {
        "summary": "One vector per residue (each item carries its shape [L, k])",
        "value": {"input": "MKTAYIAKQRQISFVKSHFSRQ", "pooling": "per_residue", "dimensions": 32},
    },
    "openai": {
        "summary": "What the OpenAI client sends (base64 by default)",
        "value": {"input": ["MKTAYIAKQRQ"], "model": "esm2", "encoding_format": "base64"},
    },
}


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
        **error_responses(400, 404, 413, 429, 500, 503, 504),
    },
    summary="Embed protein sequences (OpenAI-compatible).",
)
async def embeddings(
    request: Request, req: EmbeddingRequest = Body(openapi_examples=EXAMPLES)
) -> Response:
    """k-dim reverse-distilled embeddings; send `Accept: application/x-npy` for binary."""
    service: EmbeddingService = request.app.state.service
    binary = wants_binary(request.headers.get("accept"))
    per_value, encoding = value_bytes(req, binary)
    query = EmbedQuery(
        inputs=[req.input] if isinstance(req.input, str) else req.input,
        ids=req.ids,
        model=req.model,
        dimensions=req.dimensions,
        pooling=req.pooling,
        policy=req.long_sequence_policy,
        normalize=req.normalize,
        value_bytes=per_value,
        encoding=encoding,
    )
    out = await service.embed(query, request.scope["state"]["request_id"])
    if binary:
        return binary_body(req, out, service.artifact)
    return json_body(req, out, service.artifact)
