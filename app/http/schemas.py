"""HTTP types (pydantic v2) — the API boundary; every field documented in one line.

Every request and response type of the API is here, embeddings and bulk jobs alike: the one
place pydantic is used, hence longer than the other modules.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, Strict, WithJsonSchema

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
ProteinSequence = Annotated[str, Strict(), WithJsonSchema(SEQUENCE_SCHEMA)]
ProteinSequences = Annotated[
    list[ProteinSequence],
    WithJsonSchema({"type": "array", "items": SEQUENCE_SCHEMA, "minItems": 1}),
]
# Strict: `true` is not 1 and "32" is not 32 (pydantic's lax mode would coerce both).
StrictInt = Annotated[int, Strict()]
StrictBool = Annotated[bool, Strict()]
StrictStr = Annotated[str, Strict()]
ID_SCHEMA = {
    "type": "string",
    "minLength": 1,
    "maxLength": 256,
    "description": "A name: printable text; not '.' or '..' (or such a path part) nor a "
    "backslash, since ids name .npz members.",
}
ItemId = Annotated[str, Strict(), WithJsonSchema(ID_SCHEMA)]

EXAMPLE_REQUEST = {
    "input": ["MKTAYIAKQRQISFVKSHFSRQ", "GSHMLEDPVDAFQ"],
    "dimensions": 64,
    "ids": ["query-1", "query-2"],
}


class EmbeddingRequest(BaseModel):
    """POST /v1/embeddings — OpenAI-compatible, with protein extensions."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                EXAMPLE_REQUEST,
                {"input": "MKTAYIAKQRQISFVKSHFSRQ", "pooling": "per_residue", "dimensions": 32},
            ]
        },
    )

    input: ProteinSequence | ProteinSequences = Field(
        ..., description="One protein sequence or a list (whitespace stripped, case folded)."
    )
    model: StrictStr | None = Field(
        None, description="Optional: the served family (e.g. 'esm2') or artifact name."
    )
    dimensions: StrictInt | None = Field(
        None, ge=1, description="k: dims returned (default: the artifact's full dim)."
    )
    encoding_format: Literal["float", "base64"] = Field(
        "float", description="'float' lists, or 'base64' of little-endian float32 bytes."
    )
    user: StrictStr | None = Field(None, description="Ignored (OpenAI compatibility).")
    pooling: Pooling = Field(
        Pooling.mean,
        description="mean over residues, per_residue vectors ('per-residue' accepted), or bos.",
    )
    normalize: StrictBool = Field(
        False, description="L2-normalise each vector after truncating to k."
    )
    long_sequence_policy: LongSequencePolicy = Field(
        LongSequencePolicy.truncate,
        description="Sequences over the model context: error, truncate, or chunk (windows).",
    )
    ids: list[ItemId] | None = Field(
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
    shape: list[int] = Field(
        ...,
        description="Shape of the embedding: [k] pooled, [L, k] per residue (a base64 "
        "embedding is these values flattened, row-major).",
    )


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
    family_selection: str = Field(
        ..., description="How the family was chosen (configured, artifact, or the fallback)."
    )
    levels: list[LevelInfo] = Field(..., description="The chain, smallest first.")
    artifact: dict = Field(..., description="Artifact metadata, hash and per-step fit stats.")


class ModelList(BaseModel):
    """GET /v1/models."""

    object: Literal["list"] = "list"
    data: list[ModelCard]


class Readiness(BaseModel):
    """GET /health/ready (levels and error details only with a valid API key, when keys are
    configured: they name model paths and hosts)."""

    status: Literal["ready", "warming", "idle", "unavailable"] = Field(
        ...,
        description="ready; warming (a live worker is loading); idle (200: no worker, but "
        "requests are queued for one to start, RDSERVE_WORKER_WAKE_S); unavailable (no live "
        "worker, no queue, or a fatal error: see reason).",
    )
    ready_up_to_dimensions: int = Field(..., description="Largest k servable right now (0: none).")
    mode: Literal["embedded", "distributed"] = Field(..., description="Where workers run.")
    workers: int = Field(..., description="Live workers serving this artifact.")
    reason: str | None = Field(
        None,
        description="Why it is not ready (or idle): warming, no_worker, queue_unavailable or "
        "worker_error.",
    )
    levels: list[LevelInfo] | None = Field(None, description="Per-level readiness.")
    error: str | None = Field(None, description="The failure's message, when one is known.")


class Limits(BaseModel):
    """What one request may ask for."""

    max_sequences: int = Field(..., description="Most sequences in one request.")
    max_residues: int = Field(..., description="Most residues in one request.")
    max_residues_per_sequence: int | None = Field(
        ..., description="Model context in residues (longer: long_sequence_policy); None: none."
    )
    max_body_bytes: int = Field(..., description="Largest request body.")
    max_output_bytes: int = Field(..., description="Largest response (413 above).")
    token_budget: int | None = Field(
        ..., description="Tokens per model batch on the worker (None: not known to the API)."
    )


class LevelSummary(BaseModel):
    """One level, as GET /info lists it."""

    name: str = Field(..., description="Short name, e.g. '35M'.")
    dim: int = Field(..., description="Cumulative RD dims available up to this level.")
    max_residues: int | None = Field(..., description="Context of its model (None: unlimited).")


class ServerInfo(BaseModel):
    """GET /info (text-embeddings-inference's name): what this server serves and accepts."""

    version: str = Field(..., description="rdserve version.")
    model_id: str = Field(..., description="Artifact name (accepted as 'model').")
    family: str = Field(..., description="Model family.")
    family_selection: str = Field(
        ..., description="How the family was chosen (configured, artifact, or the fallback)."
    )
    max_dimensions: int = Field(..., description="Largest k.")
    levels: list[LevelSummary] = Field(..., description="The chain, smallest first.")
    poolings: list[str] = Field(..., description="Pooling values this family supports.")
    artifact_sha256: str = Field(..., description="sha256 of the projection artifact.")
    mode: Literal["embedded", "distributed"] = Field(..., description="Where workers run.")
    limits: Limits


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


# -- bulk jobs ---------------------------------------------------------------------------------

OnInvalidChoice = Literal["error", "skip"]


class JobOptionsBase(BaseModel):
    """Options of a bulk job (as for /v1/embeddings, plus the intake policies)."""

    model_config = ConfigDict(extra="forbid")

    model: StrictStr | None = Field(
        None, description="Optional: the served family (e.g. 'esm2') or artifact name."
    )
    dimensions: StrictInt | None = Field(
        None, ge=1, description="k: dims of each result (default: the artifact's full dim)."
    )
    pooling: Pooling = Field(
        Pooling.mean,
        description="mean over residues, per_residue vectors ('per-residue' accepted), or bos.",
    )
    normalize: StrictBool = Field(False, description="L2-normalise each vector after truncating.")
    long_sequence_policy: LongSequencePolicy = Field(
        LongSequencePolicy.truncate,
        description="Sequences over the model context: error, truncate, or chunk (windows).",
    )
    dtype: Literal["float32", "float16"] = Field(
        "float32", description="Element type of the result arrays."
    )
    on_invalid: OnInvalidChoice = Field(
        "error",
        description="A record with invalid residues or id: error (refuse the job, naming it) or "
        "skip (leave it out; listed among the job's failures).",
    )
    strip_stop: StrictBool = Field(
        False, description="Remove one trailing '*' (a stop codon) from each record."
    )


class JobQuery(JobOptionsBase):
    """Options of a FASTA upload to POST /v1/jobs, as query parameters."""

    # Query strings carry text: "true" and "64" are what a client can send.
    dimensions: int | None = Field(
        None, ge=1, description="k: dims of each result (default: the artifact's full dim)."
    )
    normalize: bool = Field(False, description="L2-normalise each vector after truncating.")
    strip_stop: bool = Field(
        False, description="Remove one trailing '*' (a stop codon) from each record."
    )


class JobRequest(JobOptionsBase):
    """POST /v1/jobs with a JSON body: shaped like POST /v1/embeddings."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [{"input": EXAMPLE_REQUEST["input"], "ids": ["a", "b"], "dimensions": 64}]
        },
    )

    input: ProteinSequences = Field(..., description="The sequences (whitespace stripped).")
    ids: list[ItemId] | None = Field(
        None, description="Optional ids, one per input, unique: the result's keys (default 0…N−1)."
    )


class JobFailure(BaseModel):
    """A record left out of the result, and why."""

    record: int = Field(..., description="Record number in the input, from 1.")
    id: str = Field(..., description="Its id.")
    error: str = Field(..., description="What went wrong.")
    code: str = Field(..., description="invalid_sequence, sequence_too_long, out_of_memory, …")


class JobProgress(BaseModel):
    """Done and total (records, residues or chunks)."""

    total: int = Field(..., description="How many the job has.")
    done: int = Field(..., description="How many are done.")


class JobResultInfo(BaseModel):
    """Where a succeeded job's result is."""

    url: str = Field(..., description="GET this path (add ?format=npy or ids for pooled jobs).")
    formats: list[str] = Field(..., description="Formats available: npz; npy and ids if pooled.")
    bytes: int = Field(..., description="Size of the .npz.")


class JobInfo(BaseModel):
    """A bulk job: GET /v1/jobs/{id}."""

    id: str = Field(..., description="Job id (sorted by creation time).")
    object: Literal["job"] = "job"
    status: Literal["queued", "running", "succeeded", "failed", "cancelled"] = Field(
        ..., description="queued → running → succeeded, failed or cancelled."
    )
    created_at: float = Field(..., description="Unix time it was accepted.")
    started_at: float | None = Field(None, description="Unix time it started running.")
    ended_at: float | None = Field(None, description="Unix time it ended.")
    updated_at: float = Field(..., description="Unix time of the last progress update.")
    model: str = Field(..., description="Artifact name.")
    family: str = Field(..., description="Model family.")
    artifact_sha256: str = Field(..., description="The artifact it is computed with.")
    dimensions: int = Field(..., description="k.")
    pooling: Pooling = Field(..., description="Pooling.")
    long_sequence_policy: LongSequencePolicy = Field(..., description="Long-sequence policy.")
    normalize: bool = Field(..., description="L2-normalised.")
    dtype: str = Field(..., description="Element type of the result arrays.")
    on_invalid: OnInvalidChoice = Field(..., description="Policy for invalid records.")
    records: JobProgress = Field(..., description="Records accepted, and embedded so far.")
    residues: JobProgress = Field(..., description="Their residues.")
    chunks: JobProgress = Field(..., description="Chunks the job was cut into.")
    skipped: int = Field(..., description="Records left out at intake (on_invalid=skip).")
    failed: int = Field(..., description="Records that failed while computing.")
    failures: list[JobFailure] = Field(
        ..., description="Skipped and failed records (the first 100 of each)."
    )
    cache: dict[str, int] = Field(
        ..., description="Records by cache tier (full_hit, partial, miss) so far."
    )
    residues_per_s: float | None = Field(None, description="Current rate of the job's driver.")
    eta_s: float | None = Field(None, description="Seconds left at that rate.")
    waiting: str | None = Field(None, description="Why nothing moves now (e.g. no_worker).")
    error: str | None = Field(None, description="Why the job failed.")
    result: JobResultInfo | None = Field(None, description="Once succeeded: where the result is.")


class JobList(BaseModel):
    """GET /v1/jobs: the caller's jobs, newest first."""

    object: Literal["list"] = "list"
    data: list[JobInfo]
