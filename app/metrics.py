"""Prometheus metrics (prefix ``rdserve_``, base units). One registry per process.

Shared by every room (the HTTP gate, the service, the worker loop and the Redis transport all
count here), so it sits beside the settings rather than inside one room; ``/metrics`` itself is
an HTTP route (``app.http.routes.metrics``).
"""

from __future__ import annotations

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    disable_created_metrics,
)

# *_created series double the exposition size and no dashboard uses them.
disable_created_metrics()
REGISTRY = CollectorRegistry(auto_describe=True)

_LATENCY = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)

REQUESTS = Counter(
    "rdserve_requests",
    "HTTP requests by route and status code.",
    ["route", "status"],
    registry=REGISTRY,
)
REQUEST_DURATION = Histogram(
    "rdserve_request_duration_seconds",
    "HTTP request latency.",
    ["route"],
    buckets=_LATENCY,
    registry=REGISTRY,
)
ERRORS = Counter("rdserve_errors", "Error responses by error code.", ["code"], registry=REGISTRY)
ITEMS = Counter(
    "rdserve_embedding_items",
    "Sequences requested, by requested-k bucket and pooling.",
    ["k_bucket", "pooling"],
    registry=REGISTRY,
)
CACHE = Counter(
    "rdserve_cache_lookups",
    "Per-sequence cache outcomes: full_hit (served from cache), partial (lower levels reused), "
    "miss.",
    ["tier"],
    registry=REGISTRY,
)
CACHE_ERRORS = Counter(
    "rdserve_cache_errors",
    "Cache operations that failed (requests were computed instead).",
    ["op"],
    registry=REGISTRY,
)
QUEUE_DEPTH = Gauge(
    "rdserve_queue_depth", "Requests queued or in progress for workers.", registry=REGISTRY
)
BATCH_SEQUENCES = Histogram(
    "rdserve_batch_sequences",
    "Sequences (model rows) per forward batch.",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512),
    registry=REGISTRY,
)
BATCH_RESIDUES = Histogram(
    "rdserve_batch_residues",
    "Real residues per forward batch.",
    buckets=(16, 64, 256, 1024, 2048, 4096, 8192, 16384, 32768, 65536),
    registry=REGISTRY,
)
BATCH_PADDING = Histogram(
    "rdserve_batch_padding_ratio",
    "Share of a batch's token grid that is padding or special.",
    buckets=(0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0),
    registry=REGISTRY,
)
FORWARD_DURATION = Histogram(
    "rdserve_forward_duration_seconds",
    "One level's forward over one batch.",
    ["level"],
    buckets=_LATENCY,
    registry=REGISTRY,
)
RESIDUES = Counter(
    "rdserve_residues", "Residues processed by each level's model.", ["level"], registry=REGISTRY
)
MODEL_LOAD = Gauge(
    "rdserve_model_load_seconds",
    "Time to load each level's weights.",
    ["level"],
    registry=REGISTRY,
)
MODEL_LOADED = Gauge(
    "rdserve_model_loaded",
    "1 when a level's weights are resident and warmed up.",
    ["level"],
    registry=REGISTRY,
)
WORKER_UP = Gauge(
    "rdserve_worker_up", "1 while this process's worker loop runs.", registry=REGISTRY
)
WORKER_HEARTBEAT = Gauge(
    "rdserve_worker_heartbeat_timestamp_seconds",
    "Unix time of the worker's last loop turn.",
    registry=REGISTRY,
)
WORKERS_LIVE = Gauge(
    "rdserve_workers_live",
    "Workers with a fresh heartbeat serving this artifact.",
    registry=REGISTRY,
)
ITEM_FAILURES = Counter(
    "rdserve_item_failures",
    "Sequences that failed even in a batch of their own (after split-and-retry), by reason.",
    ["reason"],
    registry=REGISTRY,
)
TASKS_RECLAIMED = Counter(
    "rdserve_tasks_reclaimed",
    "Tasks this worker took over from another: dead (heartbeat gone) or idle (claim_idle_s).",
    ["reason"],
    registry=REGISTRY,
)
TASKS_RESUBMITTED = Counter(
    "rdserve_tasks_resubmitted",
    "Tasks the API queued again because Redis lost them (restart without persistence).",
    registry=REGISTRY,
)
REPLIES_DISCARDED = Counter(
    "rdserve_replies_discarded",
    "Worker replies nobody waited for: duplicate (computed twice) or expired (request ended).",
    ["reason"],
    registry=REGISTRY,
)
TASKS_SKIPPED = Counter(
    "rdserve_tasks_skipped",
    "Tasks a worker dropped unfinished: withdrawn (their request gave up) or deadline (expired).",
    ["reason"],
    registry=REGISTRY,
)
REPLIES_FAILED = Counter(
    "rdserve_replies_failed",
    "Results a worker could not write to Redis (e.g. OOM at maxmemory); answered with an error.",
    registry=REGISTRY,
)
REPLIES_LOST = Counter(
    "rdserve_replies_lost",
    "Requests failed with 503 because their task was gone from the queue and no reply came.",
    registry=REGISTRY,
)
ARTIFACT = Info("rdserve_artifact", "The projection artifact being served.", registry=REGISTRY)


def k_bucket(k: int, dims: list[int]) -> str:
    """Label a requested k by the smallest level dim covering it ('le_320', …): bounded labels."""
    return next(f"le_{d}" for d in dims if k <= d)
