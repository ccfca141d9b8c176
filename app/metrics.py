"""Prometheus metrics (prefix ``rdserve_``, base units). One registry per process. Mostly
declarations, one per metric, hence the length.

Shared by every room (the HTTP gate, the service, the worker loop and the Redis transport all
count here), so it sits beside the settings rather than inside one room; ``/metrics`` itself is
an HTTP route (``app.http.routes.metrics``).
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from typing import TYPE_CHECKING, Literal

from prometheus_client import (
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    disable_created_metrics,
)
from prometheus_client.metrics import MetricWrapperBase

if TYPE_CHECKING:
    from models.artifact import Artifact

# *_created series double the exposition size and no dashboard uses them.
disable_created_metrics()
#: What this process exports. Metrics below are created unregistered and join it by role
#: (export()), so an API process never shows worker gauges (a 0 that is not a measurement) and
#: a worker never shows the API's.
REGISTRY = CollectorRegistry(auto_describe=True)

_LATENCY = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)

REQUESTS = Counter(
    "rdserve_requests",
    "HTTP requests by route and status code.",
    ["route", "status"],
    registry=None,
)
REQUEST_DURATION = Histogram(
    "rdserve_request_duration_seconds",
    "HTTP request latency.",
    ["route"],
    buckets=_LATENCY,
    registry=None,
)
ERRORS = Counter("rdserve_errors", "Error responses by error code.", ["code"], registry=None)
ITEMS = Counter(
    "rdserve_embedding_items",
    "Sequences requested, by requested-k bucket and pooling.",
    ["k_bucket", "pooling"],
    registry=None,
)
CACHE = Counter(
    "rdserve_cache_lookups",
    "Per-sequence cache outcomes: full_hit (served from cache), partial (lower levels reused), "
    "miss.",
    ["tier"],
    registry=None,
)
CACHE_ERRORS = Counter(
    "rdserve_cache_errors",
    "Cache operations that failed (requests were computed instead).",
    ["op"],
    registry=None,
)
QUEUE_DEPTH = Gauge(
    "rdserve_queue_depth", "Requests queued or in progress for workers.", registry=None
)
BATCH_SEQUENCES = Histogram(
    "rdserve_batch_sequences",
    "Sequences (model rows) per forward batch.",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512),
    registry=None,
)
BATCH_RESIDUES = Histogram(
    "rdserve_batch_residues",
    "Real residues per forward batch.",
    buckets=(16, 64, 256, 1024, 2048, 4096, 8192, 16384, 32768, 65536),
    registry=None,
)
BATCH_PADDING = Histogram(
    "rdserve_batch_padding_ratio",
    "Share of a batch's token grid that is padding or special.",
    buckets=(0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0),
    registry=None,
)
FORWARD_DURATION = Histogram(
    "rdserve_forward_duration_seconds",
    "One level's forward over one batch.",
    ["level"],
    buckets=_LATENCY,
    registry=None,
)
RESIDUES = Counter(
    "rdserve_residues", "Residues processed by each level's model.", ["level"], registry=None
)
MODEL_LOAD = Gauge(
    "rdserve_model_load_seconds",
    "Time to load each level's weights.",
    ["level"],
    registry=None,
)
MODEL_LOADED = Gauge(
    "rdserve_model_loaded",
    "1 when a level's weights are resident and warmed up.",
    ["level"],
    registry=None,
)
WORKER_UP = Gauge("rdserve_worker_up", "1 while this process's worker loop runs.", registry=None)
WORKER_HEARTBEAT = Gauge(
    "rdserve_worker_heartbeat_timestamp_seconds",
    "Unix time of the worker's last loop turn.",
    registry=None,
)
WORKERS_LIVE = Gauge(
    "rdserve_workers_live",
    "Workers with a fresh heartbeat serving this artifact.",
    registry=None,
)
ITEM_FAILURES = Counter(
    "rdserve_item_failures",
    "Sequences that failed even in a batch of their own (after split-and-retry), by reason.",
    ["reason"],
    registry=None,
)
TASKS_RECLAIMED = Counter(
    "rdserve_tasks_reclaimed",
    "Tasks this worker took over from another: dead (heartbeat gone) or idle (claim_idle_s).",
    ["reason"],
    registry=None,
)
TASKS_RESUBMITTED = Counter(
    "rdserve_tasks_resubmitted",
    "Tasks the API queued again because Redis lost them (restart without persistence).",
    registry=None,
)
REPLIES_DISCARDED = Counter(
    "rdserve_replies_discarded",
    "Worker replies nobody waited for: duplicate (computed twice) or expired (request ended).",
    ["reason"],
    registry=None,
)
TASKS_SKIPPED = Counter(
    "rdserve_tasks_skipped",
    "Tasks a worker dropped unfinished: withdrawn (their request gave up) or deadline (expired).",
    ["reason"],
    registry=None,
)
REPLIES_FAILED = Counter(
    "rdserve_replies_failed",
    "Results a worker could not write to Redis (e.g. OOM at maxmemory); answered with an error.",
    registry=None,
)
REPLIES_LOST = Counter(
    "rdserve_replies_lost",
    "Requests failed with 503 because their task was gone from the queue and no reply came.",
    registry=None,
)
BULK_QUEUE_DEPTH = Gauge(
    "rdserve_bulk_queue_depth",
    "Bulk-job chunks queued or in progress for workers (apart from interactive requests).",
    registry=None,
)
QUEUE_LAG = Gauge(
    "rdserve_queue_lag",
    "Tasks queued that no worker has taken yet, by queue (tasks: requests; bulk: job chunks) — "
    "Redis Streams consumer-group lag, for autoscalers that cannot read Redis.",
    ["queue"],
    registry=None,
)
QUEUE_PENDING = Gauge(
    "rdserve_queue_pending",
    "Tasks taken by a worker and not yet answered, by queue (tasks, bulk).",
    ["queue"],
    registry=None,
)
BULK_YIELDS = Counter(
    "rdserve_bulk_yields",
    "Times a worker paused a turn of bulk-job chunks to serve interactive tasks first.",
    registry=None,
)
JOBS = Counter(
    "rdserve_jobs",
    "Bulk jobs by how they ended (succeeded, failed, cancelled), counted where they ended.",
    ["status"],
    registry=None,
)
JOBS_RUNNING = Gauge(
    "rdserve_jobs_running", "Bulk jobs this API process is driving now.", registry=None
)
JOB_RECORDS = Counter(
    "rdserve_job_records",
    "Bulk-job records done by this API process, by cache tier (full_hit, partial, miss) or failed.",
    ["outcome"],
    registry=None,
)
JOB_RESIDUES = Counter(
    "rdserve_job_residues", "Bulk-job residues done by this API process.", registry=None
)
ARTIFACT = Info("rdserve_artifact", "The projection artifact being served.", registry=None)

#: Error codes the API answers with (pydantic's own validation types come on top): counted
#: from 0 so that the first error shows in rate().
ERROR_CODES = (
    "invalid_sequence",
    "sequence_too_long",
    "empty_input",
    "too_many_sequences",
    "too_many_residues",
    "output_too_large",
    "invalid_dimensions",
    "unsupported_pooling",
    "model_not_found",
    "ids_length_mismatch",
    "duplicate_id",
    "invalid_id",
    "json_invalid",
    "extra_forbidden",
    "invalid_api_key",
    "body_too_large",
    "body_too_complex",
    "unexpected_body",
    "not_found",
    "method_not_allowed",
    "queue_full",
    "no_worker",
    "queue_unavailable",
    "timeout",
    "internal",
    "out_of_memory",
    "compute_failed",
    "artifact_mismatch",
    "dispatch_failed",
    "shutting_down",
    "result_undeliverable",
    "request_timeout",
    "too_many_connections",
    "job_not_found",
    "job_not_finished",
    "too_many_records",
    "upload_too_large",
    "invalid_fasta",
    "unsupported_format",
)

API_METRICS: tuple[MetricWrapperBase, ...] = (
    REQUESTS,
    REQUEST_DURATION,
    ERRORS,
    ITEMS,
    CACHE,
    CACHE_ERRORS,
    QUEUE_DEPTH,
    WORKERS_LIVE,
    TASKS_RESUBMITTED,
    REPLIES_DISCARDED,
    REPLIES_LOST,
    BULK_QUEUE_DEPTH,
    QUEUE_LAG,
    QUEUE_PENDING,
    JOBS,
    JOBS_RUNNING,
    JOB_RECORDS,
    JOB_RESIDUES,
)
WORKER_METRICS: tuple[MetricWrapperBase, ...] = (
    BATCH_SEQUENCES,
    BATCH_RESIDUES,
    BATCH_PADDING,
    FORWARD_DURATION,
    RESIDUES,
    MODEL_LOAD,
    MODEL_LOADED,
    WORKER_UP,
    WORKER_HEARTBEAT,
    ITEM_FAILURES,
    TASKS_RECLAIMED,
    TASKS_SKIPPED,
    REPLIES_FAILED,
    BULK_YIELDS,
)
_registered: set[int] = set()
_lock = threading.Lock()


def _register(collectors: Iterable[object]) -> None:
    with _lock:
        for c in collectors:
            if id(c) not in _registered:
                REGISTRY.register(c)  # type: ignore[arg-type]
                _registered.add(id(c))


def export(role: Literal["api", "worker"], artifact: Artifact, routes: Iterable[str] = ()) -> None:
    """Export this process's metrics for ``role`` (embedded mode: both), describe the artifact,
    and start labelled counters at 0 for every label value known now (idempotent)."""
    _register((PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR, ARTIFACT))
    ARTIFACT.info(
        {
            "name": artifact.name,
            "family": artifact.family,
            "sha256": artifact.sha256,
            "levels": ",".join(lv.name for lv in artifact.levels),
            "dims": ",".join(map(str, artifact.dims)),
            "regressor": artifact.regressor,
        }
    )
    if role == "api":
        _register(API_METRICS)
        for code in ERROR_CODES:
            ERRORS.labels(code)
        for tier in ("full_hit", "partial", "miss"):
            CACHE.labels(tier)
        for op in ("get", "put"):
            CACHE_ERRORS.labels(op)
        for reason in ("duplicate", "expired"):
            REPLIES_DISCARDED.labels(reason)
        for route in routes:
            REQUESTS.labels(route, "200")
            REQUEST_DURATION.labels(route)
        for dim in artifact.dims:
            for pooling in ("mean", "per_residue", "bos"):
                ITEMS.labels(f"le_{dim}", pooling)
        for queue in ("tasks", "bulk"):
            QUEUE_LAG.labels(queue)
            QUEUE_PENDING.labels(queue)
        for status in ("succeeded", "failed", "cancelled"):
            JOBS.labels(status)
        for outcome in ("full_hit", "partial", "miss", "failed"):
            JOB_RECORDS.labels(outcome)
    else:
        _register(WORKER_METRICS)
        for lv in artifact.levels:
            RESIDUES.labels(lv.name)
            FORWARD_DURATION.labels(lv.name)
            MODEL_LOADED.labels(lv.name)
        for reason in ("out_of_memory", "compute_failed"):
            ITEM_FAILURES.labels(reason)
        for reason in ("dead", "idle"):
            TASKS_RECLAIMED.labels(reason)
        for reason in ("withdrawn", "deadline"):
            TASKS_SKIPPED.labels(reason)


def set_queue(queue: Literal["tasks", "bulk"], depth: int, lag: int) -> None:
    """The gauges of one queue: ``depth`` tasks in it, ``lag`` of them not yet taken."""
    (QUEUE_DEPTH if queue == "tasks" else BULK_QUEUE_DEPTH).set(depth)
    QUEUE_LAG.labels(queue).set(lag)
    QUEUE_PENDING.labels(queue).set(max(0, depth - lag))


def k_bucket(k: int, dims: list[int]) -> str:
    """Label a requested k by the smallest level dim covering it ('le_320', …): bounded labels."""
    return next(f"le_{d}" for d in dims if k <= d)
