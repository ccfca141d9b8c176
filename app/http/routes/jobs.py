"""Bulk jobs: POST /v1/jobs (a FASTA upload, plain or gzip, or a JSON body), GET /v1/jobs[/{id}],
DELETE /v1/jobs/{id} (cancel), GET /v1/jobs/{id}/result (streamed)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError
from starlette.responses import JSONResponse, StreamingResponse

from app.core.errors import APIError
from app.core.jobs.manager import JobManager, JobView
from app.core.jobs.model import JobOptions, JobStatus, OnInvalid
from app.http.openapi import BINARY, error_responses
from app.http.schemas import JobInfo, JobList, JobOptionsBase, JobQuery, JobRequest
from models.sequences import Pooling

router = APIRouter(tags=["jobs"])

#: Media types of a FASTA upload (gzip is recognised from its first bytes whatever the type).
FASTA_TYPES = frozenset(
    {
        "",
        "text/x-fasta",
        "application/x-fasta",
        "text/plain",
        "application/gzip",
        "application/x-gzip",
        "application/octet-stream",
    }
)
#: Result bytes read per piece while streaming it out.
READ_PIECE = 2**20


def streams_body(endpoint: Callable[..., Any]) -> Callable[..., Any]:
    """Mark a route whose non-JSON body the gate passes through unread (an upload the route
    reads as it arrives) instead of buffering it under max_body_bytes."""
    endpoint.streams_body = True  # type: ignore[attr-defined]
    return endpoint


def _jobs(request: Request) -> tuple[JobManager, str]:
    """The job manager and the caller (jobs belong to the API key that made them)."""
    return request.app.state.jobs, request.scope["state"]["principal"]


def _options(o: JobOptionsBase) -> JobOptions:
    return JobOptions(
        dimensions=o.dimensions,
        pooling=o.pooling,
        policy=o.long_sequence_policy,
        normalize=o.normalize,
        dtype=o.dtype,
        on_invalid=OnInvalid(o.on_invalid),
        strip_stop=o.strip_stop,
    )


def job_info(v: JobView) -> JobInfo:
    sp, st = v.spec, v.state
    result = None
    if st.status == JobStatus.succeeded:
        pooled = sp.pooling != Pooling.per_residue
        result = {
            "url": f"/v1/jobs/{sp.id}/result",
            "formats": ["npz", "npy", "ids"] if pooled else ["npz"],
            "bytes": st.result_bytes or 0,
        }
    return JobInfo.model_validate(
        {
            "id": sp.id,
            "status": st.status.value,
            "created_at": sp.created_at,
            "started_at": st.started_at,
            "ended_at": st.ended_at,
            "updated_at": st.updated_at,
            "model": sp.model,
            "family": sp.family,
            "artifact_sha256": sp.artifact_sha256,
            "dimensions": sp.dimensions,
            "pooling": sp.pooling,
            "long_sequence_policy": sp.policy,
            "normalize": sp.normalize,
            "dtype": sp.dtype,
            "on_invalid": sp.on_invalid.value,
            "records": {"total": sp.records, "done": st.records_done},
            "residues": {"total": sp.residues, "done": st.residues_done},
            "chunks": {"total": sp.chunks, "done": st.chunks_done},
            "skipped": len(sp.skipped),
            "failed": st.failures_total,
            "failures": [_failure(f) for f in [*sp.skipped[:100], *st.failures]],
            "cache": st.cache,
            "residues_per_s": st.residues_per_s,
            "eta_s": st.eta_s,
            "waiting": st.waiting,
            "error": st.error,
            "result": result,
        }
    )


def _failure(f: Any) -> dict:
    return {"record": f.record, "id": f.id, "error": f.error, "code": f.code}


FASTA_BODY = {"schema": BINARY}
CREATE_BODY = {
    "requestBody": {
        "required": True,
        "description": "A FASTA file (plain or gzip, streamed; options as query parameters), "
        "or a JSON body shaped like POST /v1/embeddings.",
        "content": {
            "application/json": {
                "schema": JobRequest.model_json_schema(ref_template="#/components/schemas/{model}")
            },
            **{t: FASTA_BODY for t in sorted(FASTA_TYPES) if t},
        },
    }
}


@router.post(
    "/v1/jobs",
    status_code=202,
    response_model=JobInfo,
    responses={
        202: {"description": "Accepted: validated and queued. `Location` names the job."},
        **error_responses(400, 404, 413, 415),
    },
    openapi_extra=CREATE_BODY,
    summary="Start a bulk job (FASTA upload or JSON).",
)
@streams_body
async def create_job(request: Request, query: Annotated[JobQuery, Query()]) -> JSONResponse:
    """Every record is validated as the body arrives, before any model runs; the job is then
    run on every worker of the fleet, in chunks, between interactive requests."""
    jobs, owner = _jobs(request)
    media = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media == "application/json":
        if request.query_params:
            raise APIError(
                400,
                "a JSON job carries its options in its body, not as query parameters",
                param=next(iter(request.query_params)),
                code="unexpected_query",
            )
        try:
            req = JobRequest.model_validate_json(await request.body())
        except ValidationError as e:
            raise RequestValidationError(
                [{**err, "loc": ("body", *err["loc"])} for err in e.errors()]
            ) from None
        _check_model(request, req.model)
        view = await jobs.create_from_list(owner, _options(req), req.input, req.ids)
    elif media in FASTA_TYPES:
        _check_model(request, query.model)
        limit = jobs.settings.job_max_bytes
        if int(request.headers.get("content-length") or 0) > limit:
            raise APIError(
                413,
                f"the upload is {request.headers['content-length']} bytes; the limit is "
                f"{limit:,} (job_max_bytes): split the input into several jobs",
                param="body",
                code="upload_too_large",
            )
        view = await jobs.create_from_upload(owner, _options(query), request.stream())
    else:
        raise APIError(
            415,
            f"a job is a FASTA upload ({', '.join(sorted(t for t in FASTA_TYPES if t))}) or "
            f"application/json, not {media!r}",
            param="content-type",
            code="unsupported_media_type",
        )
    body = job_info(view).model_dump(mode="json")
    return JSONResponse(body, status_code=202, headers={"Location": f"/v1/jobs/{view.spec.id}"})


def _check_model(request: Request, model: str | None) -> None:
    service = request.app.state.service
    if model and not service.accepts_model(model):
        raise APIError(
            404,
            f"model {model!r} is not served here; this server serves {service.artifact.name!r}",
            param="model",
            code="model_not_found",
        )


@router.get(
    "/v1/jobs",
    response_model=JobList,
    responses=error_responses(400),
    summary="The caller's jobs, newest first.",
)
async def list_jobs(
    request: Request,
    limit: Annotated[int, Query(ge=1, le=100, description="How many (newest first).")] = 20,
) -> JobList:
    jobs, owner = _jobs(request)
    return JobList(data=[job_info(v) for v in await jobs.list(owner, limit)])


@router.get(
    "/v1/jobs/{job_id}",
    response_model=JobInfo,
    responses=error_responses(404),
    summary="A job's state and progress.",
)
async def get_job(request: Request, job_id: str) -> JobInfo:
    jobs, owner = _jobs(request)
    return job_info(await jobs.get(owner, job_id))


@router.delete(
    "/v1/jobs/{job_id}",
    response_model=JobInfo,
    responses=error_responses(404),
    summary="Cancel a job; delete an ended one (and its result).",
)
async def cancel_job(request: Request, job_id: str) -> JobInfo:
    """A queued or running job is cancelled: its chunks in flight are withdrawn and nothing
    partial is kept; it stays listed as cancelled (answers once it is, or after a few seconds
    with its state then). An ended job is deleted with its result (404 afterwards)."""
    jobs, owner = _jobs(request)
    return job_info(await jobs.cancel(owner, job_id))


@router.get(
    "/v1/jobs/{job_id}/result",
    response_class=StreamingResponse,
    responses={
        200: {
            "description": "The result, streamed: .npz keyed by id (pooled or per residue), or "
            "for pooled jobs the N×k .npy (record order) or its ids, one per line.",
            "content": {
                "application/x-npz": {"schema": BINARY},
                "application/x-npy": {"schema": BINARY},
                "text/plain": {"schema": {"type": "string"}},
            },
        },
        **error_responses(400, 404, 409),
    },
    summary="Download a succeeded job's result.",
)
async def job_result(
    request: Request,
    job_id: str,
    format: Annotated[
        str, Query(description="npz (default); for pooled jobs also npy or ids.")
    ] = "npz",
) -> StreamingResponse:
    jobs, owner = _jobs(request)
    res = await jobs.result(owner, job_id, format)
    headers = {
        "Content-Length": str(res.size),
        "Content-Disposition": f'attachment; filename="{res.filename}"',
    }
    return StreamingResponse(_pieces(jobs, res.path), media_type=res.media_type, headers=headers)


async def _pieces(jobs: JobManager, path: str) -> AsyncIterator[bytes]:
    """The file in READ_PIECE pieces, read in a thread: the whole file is never in memory."""
    fh = await asyncio.to_thread(jobs.store.open, path)
    try:
        while piece := await asyncio.to_thread(fh.read, READ_PIECE):
            yield piece
    finally:
        await asyncio.to_thread(fh.close)
