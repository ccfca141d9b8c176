"""The ``rdserve`` console script: offline commands from ``models.cli`` plus serve and worker."""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Annotated, Any

import typer

from app import logs
from app.settings import Settings
from models.cli import cli, err, user_errors


def _settings(**overrides: Any) -> Settings:
    """Settings from RDSERVE_* variables, with CLI flags (those given) taking precedence."""
    with user_errors():
        return Settings(**{k: v for k, v in overrides.items() if v is not None})


def _stop_server(e: Exception) -> None:
    """Embedded warm-up failed (e.g. weights unavailable): say why once, then shut down."""
    err.print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
    os.kill(os.getpid(), signal.SIGTERM)


@cli.command()
def serve(
    artifact: Annotated[
        Path | None,
        typer.Option(help="projection artifact (default: fit/reuse the default chain's)"),
    ] = None,
    host: Annotated[str | None, typer.Option(help="bind address [RDSERVE_HOST]")] = None,
    port: Annotated[int | None, typer.Option(help="port [RDSERVE_PORT]")] = None,
    redis_url: Annotated[
        str | None, typer.Option(help="distributed mode: jobs and cache in Redis")
    ] = None,
    api_key_file: Annotated[
        Path | None, typer.Option(help="file with one API key per line")
    ] = None,
    models: Annotated[str | None, typer.Option(help="default chain / local model dirs")] = None,
    family: Annotated[str | None, typer.Option(help="family of the default chain")] = None,
    device: Annotated[str | None, typer.Option(help="embedded worker device")] = None,
    dtype: Annotated[str | None, typer.Option()] = None,
) -> None:
    """Run the HTTP API (embedded worker; or distributed with --redis-url)."""
    import uvicorn

    from app.bootstrap import distributed_service, embedded_service, load_served_artifact
    from app.server import create_app

    s = _settings(
        artifact=artifact,
        host=host,
        port=port,
        redis_url=redis_url,
        api_key_file=api_key_file,
        models=models,
        family=family,
        device=device,
        dtype=dtype,
    )
    logs.configure(s.log_level)
    with user_errors():
        art = load_served_artifact(s)
        if s.redis_url:
            service = distributed_service(s, art)
        else:
            service = embedded_service(s, art, on_fatal=_stop_server)
    err.print(
        f"serving {art.name} (max k = {art.max_dim}) on http://{s.host}:{s.port} "
        f"({'distributed via ' + s.redis_url if s.redis_url else 'embedded'})"
    )
    uvicorn.run(
        create_app(service),
        host=s.host,
        port=s.port,
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=s.shutdown_timeout_s,
    )


@cli.command()
def worker(
    artifact: Annotated[Path | None, typer.Option(help="projection artifact")] = None,
    redis_url: Annotated[str | None, typer.Option(help="Redis URL [RDSERVE_REDIS_URL]")] = None,
    models: Annotated[
        str | None, typer.Option(help="override the artifact's model ids (e.g. local dirs)")
    ] = None,
    device: Annotated[str | None, typer.Option(help="cpu, cuda, cuda:N, auto")] = None,
    dtype: Annotated[str | None, typer.Option()] = None,
    worker_id: Annotated[str | None, typer.Option(help="consumer name (default host-pid)")] = None,
    metrics_port: Annotated[int | None, typer.Option(help="Prometheus port (0: off)")] = None,
) -> None:
    """Run a worker: consume jobs from Redis, run the chain, reply (one per GPU)."""
    import redis

    from app.bootstrap import build_embedder, build_worker, load_served_artifact
    from app.streams import Heartbeat, RedisJobSource, default_worker_id
    from app.worker_server import serve_worker_http

    s = _settings(
        artifact=artifact,
        redis_url=redis_url,
        device=device,
        dtype=dtype,
        worker_id=worker_id,
        metrics_port=metrics_port,
    )
    logs.configure(s.log_level)
    if not s.redis_url:
        raise typer.Exit(_fail("a worker needs --redis-url (or RDSERVE_REDIS_URL)"))
    name = s.worker_id or default_worker_id()
    with user_errors():
        art = load_served_artifact(s)
        embedder = build_embedder(s, art, [x for x in models.split(",") if x] if models else None)
    client = redis.Redis.from_url(s.redis_url, socket_timeout=30, health_check_interval=30)
    source = RedisJobSource(client, s.redis_prefix, name, s.claim_idle_s, s.heartbeat_s)
    w = build_worker(embedder, source, s, name)
    if s.metrics_port:  # /metrics and a /health/live that fails when the loop stalls
        serve_worker_http(
            s.metrics_port, w.state, lambda: w.last_turn, stall_s=max(60.0, s.request_timeout_s)
        )
    beat = Heartbeat(
        client, s.redis_prefix, w.state, art.sha256, str(embedder.family.device), s.heartbeat_s
    )
    beat.start()

    def on_signal(signum: int, _: object) -> None:
        if w.stopping:  # a second signal: stop now; other workers claim what is left pending
            raise SystemExit(128 + signum)
        err.print(f"worker {name}: stopping after the current batch")
        w.stop()

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)
    try:
        with user_errors():
            if s.warmup:
                w.warmup()
            else:
                w.state.ready = [True] * w.state.levels
        err.print(f"worker {name} serving {art.name} on {embedder.family.device}")
        w.run()
    finally:
        beat.stop()


def _fail(message: str) -> int:
    err.print(f"[bold red]error:[/] {message}", highlight=False)
    return 2


def main() -> None:
    """Entry point of the ``rdserve`` console script."""
    cli()
