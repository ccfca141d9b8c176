"""HTTP types (pydantic v2) — the API boundary; every field documented in one line."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, WithJsonSchema

from models.sequences import ALPHABET, LongSequencePolicy, Pooling

_RESIDUE = f"[{ALPHABET}{ALPHABET.lower()}]"
# Python's \s (what the service strips) spelled out, since JSON Schema's regex dialect differs.
_SPACE = "[" + "".join(f"\\u{c:04x}" for c in range(0x10000) if chr(c).isspace()) + "]"
# What the service accepts, documented (for clients, and for the API fuzz test) but checked by the
# service itself, whose error names the offending residue and its position.
SEQUENCE_SCHEMA = {
    "type": "string",
    "pattern": f"^{_SPACE}*{_RESIDUE}(?:{_RESIDUE}|{_SPACE})*$",
    "description": f"Residues from {ALPHABET} (any case); whitespace is ignored.",
}
ProteinSequence = Annotated[str, WithJsonSchema(SEQUENCE_SCHEMA)]
ProteinSequences = Annotated[
    list[ProteinSequence],
    WithJsonSchema({"type": "array", "items": SEQUENCE_SCHEMA, "minItems": 1}),
]


class EmbeddingRequest(BaseModel):
    """POST /v1/embeddings — OpenAI-compatible, with protein extensions."""

    model_config = ConfigDict(extra="forbid")

    input: ProteinSequence | ProteinSequences = Field(
        ..., description="One protein sequence or a list (whitespace stripped, case folded)."
    )
    model: str | None = Field(
        None, description="Optional: the served family (e.g. 'esm2') or artifact name."
    )
    dimensions: int | None = Field(
        None, ge=1, description="k: dims returned (default: the artifact's full dim)."
    )
    encoding_format: Literal["float", "base64"] = Field(
        "float", description="'float' lists, or 'base64' of little-endian float32 bytes."
    )
    user: str | None = Field(None, description="Ignored (OpenAI compatibility).")
    pooling: Pooling = Field(
        Pooling.mean, description="mean over residues, per_residue vectors, or bos token."
    )
    normalize: bool = Field(False, description="L2-normalise each vector after truncating to k.")
    long_sequence_policy: LongSequencePolicy = Field(
        LongSequencePolicy.truncate,
        description="Sequences over the model context: error, truncate, or chunk (windows).",
    )
    ids: list[str] | None = Field(
        None, description="Optional ids, one per input, echoed back (and .npz keys)."
    )
    dtype: Literal["float32", "float16"] = Field(
        "float32", description="Element type of binary (.npy/.npz) responses."
    )


class EmbeddingItem(BaseModel):
    """One embedding of the response."""

    object: Literal["embedding"] = "embedding"
    index: int = Field(..., description="Position in the request's input.")
    embedding: list[float] | list[list[float]] | str = Field(
        ..., description="k floats, L×k floats for per_residue, or base64 float32 bytes."
    )
    id: str | None = Field(None, description="The request's id for this item, if given.")
    truncated: bool = Field(..., description="True when the sequence was cut to the context.")
    chunked: bool = Field(..., description="True when embedded as overlapping windows.")
    cached: bool = Field(..., description="True when fully served from the cache.")
    cache: Literal["full_hit", "partial", "miss"] = Field(..., description="Cache tier.")
    residues: int = Field(..., description="Residues embedded.")


class Usage(BaseModel):
    """Residues are the tokens of this API."""

    prompt_tokens: int = Field(..., description="Residues embedded.")
    total_tokens: int = Field(..., description="Same as prompt_tokens.")


class EmbeddingResponse(BaseModel):
    """Response of POST /v1/embeddings (JSON form)."""

    object: Literal["list"] = "list"
    model: str = Field(..., description="Artifact name, e.g. 'esm2-8M-35M-150M'.")
    family: str = Field(..., description="Model family.")
    levels: list[str] = Field(..., description="Chain prefix the requested k needs.")
    artifact_sha256: str = Field(..., description="sha256 of the projection artifact.")
    dimensions: int = Field(..., description="k: dims of each vector.")
    pooling: Pooling = Field(..., description="Pooling used.")
    data: list[EmbeddingItem] = Field(..., description="Embeddings in input order.")
    usage: Usage = Field(..., description="Residue counts.")


class LevelInfo(BaseModel):
    """One level of the served chain."""

    name: str = Field(..., description="Short name, e.g. '35M'.")
    dim: int = Field(..., description="Cumulative RD dims available up to this level.")
    model_id: str = Field(..., description="Hub id or path of its model.")
    revision: str | None = Field(None, description="Pinned revision.")
    loaded: bool = Field(..., description="Weights resident in at least one worker.")
    ready: bool = Field(..., description="Warmed up and serving.")


class ModelCard(BaseModel):
    """GET /v1/models entry."""

    id: str = Field(..., description="Artifact name (accepted as 'model').")
    object: Literal["model"] = "model"
    owned_by: str = Field("rdserve", description="OpenAI compatibility.")
    family: str = Field(..., description="Model family.")
    max_dimensions: int = Field(..., description="Largest k.")
    levels: list[LevelInfo] = Field(..., description="The chain, smallest first.")
    artifact: dict = Field(..., description="Artifact metadata, hash and per-step fit stats.")


class ModelList(BaseModel):
    """GET /v1/models."""

    object: Literal["list"] = "list"
    data: list[ModelCard]


class Readiness(BaseModel):
    """GET /health/ready."""

    status: Literal["ready", "warming", "unavailable"] = Field(..., description="Overall state.")
    ready_up_to_dimensions: int = Field(..., description="Largest k servable right now (0: none).")
    levels: list[LevelInfo] = Field(..., description="Per-level readiness.")
    mode: Literal["embedded", "distributed"] = Field(..., description="Where workers run.")
    workers: int = Field(..., description="Live workers serving this artifact.")
    error: str | None = Field(None, description="Why it is not ready, when a failure is known.")


class Liveness(BaseModel):
    """GET /health/live."""

    status: Literal["live"] = "live"


class ErrorDetail(BaseModel):
    """The body of every error response, whatever produced it."""

    model_config = ConfigDict(extra="forbid")

    message: str = Field(..., description="What went wrong, naming the field and item.")
    type: str = Field(..., description="OpenAI-style class, e.g. 'invalid_request_error'.")
    param: str | None = Field(..., description="The field (and item) at fault, e.g. 'input[3]'.")
    code: str | None = Field(..., description="Machine-readable reason, e.g. 'invalid_sequence'.")


class ErrorResponse(BaseModel):
    """{"error": {"message", "type", "param", "code"}} — the one error shape."""

    model_config = ConfigDict(extra="forbid")

    error: ErrorDetail
