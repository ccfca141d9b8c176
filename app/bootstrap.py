"""Turning settings into a running service: artifact (fitted on first start), chain, wiring."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from app.cache import MemoryCache, RedisCache
from app.dispatch import EmbeddedDispatcher, LocalQueue
from app.service import EmbeddingService
from app.settings import Settings
from app.streams import RedisDispatcher
from app.worker import JobSource, Worker
from models.artifact import Artifact, load_artifact, save_artifact
from models.sequences import clean_sequences, packaged_sample, read_fasta

if TYPE_CHECKING:
    from models.embedder import Embedder

log = logging.getLogger(__name__)

PACKAGED_SAMPLE = packaged_sample().name


def default_artifact_path(settings: Settings) -> Path:
    """<data_dir>/artifacts/<family>-<level names>.safetensors for the configured chain."""
    from models.families import family_class

    levels = family_class(settings.family).resolve_levels(settings.model_list, settings.revision)
    name = "-".join([settings.family, *(lv.name for lv in levels)])
    return settings.data_dir / "artifacts" / f"{name}.safetensors"


def packaged_sequences(n: int) -> list[str]:
    """The first n of the 1,000 UniRef90 sequences shipped in the package (models/data)."""
    return clean_sequences(s for _, s in read_fasta(packaged_sample(), n))


def ensure_artifact(settings: Settings) -> Path:
    """The configured artifact; without one, the default chain's — fitted now if missing."""
    if settings.artifact is not None:
        if not settings.artifact.exists():
            raise FileNotFoundError(f"artifact {settings.artifact} does not exist")
        return settings.artifact
    path = default_artifact_path(settings)
    if path.exists():
        return path
    from models.cli import run_fit  # the CLI's progress-bar fit

    log.info("no artifact for the default chain; fitting it now", extra={"artifact": str(path)})
    seqs = packaged_sequences(settings.fit_sequences)
    art = run_fit(
        settings.family,
        settings.model_list,
        seqs,
        revision=settings.revision,
        device=settings.device,
        dtype=settings.dtype,
        token_budget=settings.token_budget,
        source=PACKAGED_SAMPLE,
    )
    save_artifact(art, path)
    return path


def build_embedder(
    settings: Settings, artifact: Artifact, models: list[str] | None = None
) -> Embedder:
    """The artifact's chain (or an override, e.g. local dirs on this machine) on the device."""
    # torch and the model code load here, not at import: a distributed API never needs them.
    from models.embedder import Embedder
    from models.families import build_chain

    if models:
        family = build_chain(
            artifact.family,
            models=models,
            revision=settings.revision,
            device=settings.device,
            dtype=settings.dtype,
            cache_dir=settings.cache_dir,
        )
    else:
        family = build_chain(
            artifact.family,
            levels=list(artifact.levels),
            device=settings.device,
            dtype=settings.dtype,
            cache_dir=settings.cache_dir,
        )
    return Embedder(family, artifact, settings.token_budget, settings.chunk_overlap)


def build_worker(embedder: Embedder, source: JobSource, settings: Settings, name: str) -> Worker:
    """The worker loop over a job source, batching as the settings say."""
    budget = embedder.extractor.token_budget  # the resolved (device-dependent) budget
    return Worker(embedder, source, name, budget, settings.batch_wait_ms / 1000)


def embedded_service(
    settings: Settings,
    artifact: Artifact,
    models: list[str] | None = None,
    on_fatal: Callable[[Exception], None] | None = None,
) -> EmbeddingService:
    """One process: worker thread + in-memory LRU."""
    embedder = build_embedder(settings, artifact, models)
    source = LocalQueue()
    worker = build_worker(embedder, source, settings, "embedded")
    dispatcher = EmbeddedDispatcher(worker, source, settings.max_queue, settings.warmup, on_fatal)
    return EmbeddingService(artifact, MemoryCache(settings.cache_max_bytes), dispatcher, settings)


def distributed_service(settings: Settings, artifact: Artifact) -> EmbeddingService:
    """API only: jobs over Redis Streams to `rdserve worker` processes; cache in Redis."""
    import redis.asyncio as aioredis

    assert settings.redis_url
    # Blocking pools: past max_connections concurrent requests a request waits for a free
    # connection (redis-py's default pool raises MaxConnectionsError, which at ~100 concurrent
    # requests turned cache lookups into misses and the fleet check into a false 503).
    dispatch_client = aioredis.Redis.from_pool(  # from_pool: the client owns and closes the pool
        aioredis.BlockingConnectionPool.from_url(
            settings.redis_url,
            max_connections=settings.redis_max_connections,
            timeout=10,
            socket_timeout=10,
            socket_connect_timeout=2,  # an unreachable Redis answers 503 quickly, not in 10 s
            health_check_interval=30,
        )
    )
    # The cache gets its own pool with short timeouts: a slow Redis must not stall requests.
    cache_client = aioredis.Redis.from_pool(
        aioredis.BlockingConnectionPool.from_url(
            settings.cache_redis_url or settings.redis_url,
            max_connections=settings.redis_max_connections,
            timeout=1.0,
            socket_timeout=1.0,
            socket_connect_timeout=1.0,
        )
    )
    dispatcher = RedisDispatcher(
        dispatch_client,
        settings.redis_prefix,
        artifact.sha256,
        len(artifact.levels),
        settings.max_queue,
    )
    cache = RedisCache(
        cache_client,
        settings.redis_prefix,
        len(artifact.levels),
        artifact.dims,
        settings.cache_ttl_s,
    )
    return EmbeddingService(artifact, cache, dispatcher, settings)


def load_served_artifact(settings: Settings) -> Artifact:
    return load_artifact(ensure_artifact(settings))
