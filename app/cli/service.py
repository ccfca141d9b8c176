"""The service commands: `rdserve serve` (the HTTP API) and `rdserve worker` (one per GPU)."""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Annotated, Any

import typer

from app import logs
from app.cli.ui import ModelsOpt, err, fail, user_errors
from app.settings import Settings

ArtifactOpt = Annotated[
    Path | None,
    typer.Option(
        help="projection artifact (default: the chain's, fitted if missing) [RDSERVE_ARTIFACT]"
    ),
]
FamilyOpt = Annotated[str | None, typer.Option(help="model family of the chain [RDSERVE_FAMILY]")]
DeviceOpt = Annotated[str | None, typer.Option(help="cpu, cuda, cuda:N, auto [RDSERVE_DEVICE]")]
DtypeOpt = Annotated[
    str | None, typer.Option(help="auto, float32, bfloat16, float16 [RDSERVE_DTYPE]")
]
ThreadsOpt = Annotated[
    int | None,
    typer.Option(help="CPU threads of model forwards (default: usable cores) [RDSERVE_THREADS]"),
]


DevicesOpt = Annotated[
    str | None,
    typer.Option(
        help="one worker process per device: all (every CUDA device), or a list such as "
        "cuda:0,cuda:1 or cpu,cpu; worker i is <worker-id>-i on metrics port "
        "<metrics-port>+i [RDSERVE_DEVICES]",
        envvar="RDSERVE_DEVICES",
        show_envvar=False,
    ),
]


def _settings(**overrides: Any) -> Settings:
    """Settings from RDSERVE_* variables, with CLI flags (those given) taking precedence."""
    with user_errors():
        return Settings(**{k: v for k, v in overrides.items() if v is not None})


def _stop_server(e: Exception) -> None:
    """Embedded warm-up failed (e.g. weights unavailable): say why once, then shut down."""
    err.print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
    os.kill(os.getpid(), signal.SIGTERM)


def _listen_error(what: str, host: str, port: int, flags: str, e: OSError) -> typer.Exit:
    return fail(
        f"cannot listen on {host}:{port} for {what}: {e.strerror or e} (choose another port "
        f"with {flags})"
    )


def serve(
    artifact: ArtifactOpt = None,
    host: Annotated[str | None, typer.Option(help="bind address [RDSERVE_HOST]")] = None,
    port: Annotated[int | None, typer.Option(help="port [RDSERVE_PORT]")] = None,
    redis_url: Annotated[
        str | None, typer.Option(help="distributed mode: tasks and cache in Redis")
    ] = None,
    api_key_file: Annotated[
        Path | None, typer.Option(help="file with one API key per line")
    ] = None,
    models: ModelsOpt = None,
    family: FamilyOpt = None,
    device: DeviceOpt = None,
    dtype: DtypeOpt = None,
    threads: ThreadsOpt = None,
) -> None:
    """Run the HTTP API (embedded worker; or distributed with --redis-url)."""
    from app.bootstrap import (
        distributed_service,
        embedded_service,
        load_served_artifact,
        resolve_family,
    )
    from app.http.app import create_app
    from app.http.server import bind
    from app.http.server import serve as serve_http
    from app.transport.connect import redacted

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
        threads=threads,
    )
    logs.configure(s.log_level)
    try:  # before anything loads: a port that is taken fails the start at once
        sock = bind(s.host, s.port)
    except OSError as e:
        raise _listen_error("the API", s.host, s.port, "--port / RDSERVE_PORT", e) from None
    with user_errors():
        s, selection = resolve_family(s)
        art = load_served_artifact(s)
        if s.redis_url:
            service = distributed_service(s, art, selection)
        else:
            service = embedded_service(s, art, on_fatal=_stop_server, family_selection=selection)
    err.print(
        f"serving {art.name} (family {art.family}: {selection}; max k = {art.max_dim}) on "
        f"http://{s.host}:{sock.getsockname()[1]} "
        f"({'distributed via ' + redacted(s.redis_url) if s.redis_url else 'embedded'})",
        highlight=False,
        soft_wrap=True,
    )
    serve_http(create_app(service), sock, s, service.dispatcher.drain)


def worker(
    artifact: ArtifactOpt = None,
    redis_url: Annotated[str | None, typer.Option(help="Redis URL [RDSERVE_REDIS_URL]")] = None,
    models: ModelsOpt = None,
    family: FamilyOpt = None,
    device: DeviceOpt = None,
    dtype: DtypeOpt = None,
    worker_id: Annotated[
        str | None, typer.Option(help="worker name (default host-pid) [RDSERVE_WORKER_ID]")
    ] = None,
    metrics_port: Annotated[
        int | None,
        typer.Option(help="/metrics and /health/live port, 0: off [RDSERVE_METRICS_PORT]"),
    ] = None,
    metrics_host: Annotated[
        str | None, typer.Option(help="bind address of that port [RDSERVE_METRICS_HOST]")
    ] = None,
    threads: ThreadsOpt = None,
    devices: DevicesOpt = None,
) -> None:
    """Run a worker: consume tasks from Redis, run the chain, reply (one per GPU; with
    --devices, one process per device, each restarted alone if it dies)."""

    from app.bootstrap import load_served_artifact, make_embedder, make_worker, resolve_family
    from app.http.worker_endpoint import WorkerEndpoint
    from app.transport.connect import sync_client
    from app.transport.consumer import RedisTaskSource
    from app.transport.heartbeat import Heartbeat
    from app.transport.keys import default_worker_id, new_consumer

    # Flags that every worker of a --devices fleet shares (device, id and port are per worker).
    shared: dict[str, object] = {
        "artifact": artifact,
        "redis_url": redis_url,
        "models": models,
        "family": family,
        "dtype": dtype,
        "metrics_host": metrics_host,
        "threads": threads,
    }
    s = _settings(**shared, device=device, worker_id=worker_id, metrics_port=metrics_port)
    logs.configure(s.log_level)
    if not s.redis_url:
        raise fail("a worker needs --redis-url (or RDSERVE_REDIS_URL)")
    if devices is not None:
        if device is not None:
            raise fail("--device and --devices exclude each other (--devices cpu for one worker)")
        raise typer.Exit(_supervise(devices, s, shared, s.worker_id or default_worker_id()))
    name = s.worker_id or default_worker_id()
    consumer = new_consumer(name)  # fresh per start: see app/transport/keys.py
    endpoint = None
    if s.metrics_port:  # bound before the models load: a port that is taken fails at once
        try:
            endpoint = WorkerEndpoint(s.metrics_host, s.metrics_port)
        except OSError as e:
            raise _listen_error(
                "the worker's /metrics and /health/live",
                s.metrics_host,
                s.metrics_port,
                "--metrics-port / RDSERVE_METRICS_PORT; 0 turns it off",
                e,
            ) from None
    with user_errors():
        s, _ = resolve_family(s)
        art = load_served_artifact(s)
        embedder = make_embedder(s, art)
        client = sync_client(
            s.redis_url, s.redis_auth(), socket_timeout=30, health_check_interval=30
        )
    source = RedisTaskSource(
        client,
        s.redis_prefix,
        art.sha256,
        consumer,
        s.claim_idle_s,
        s.heartbeat_s,
        s.redis_reply_ttl_s,
    )
    w = make_worker(embedder, source, s, consumer)
    if endpoint is not None:  # /metrics and a /health/live that fails when the loop stalls
        endpoint.serve(w.state, lambda: w.last_turn, stall_s=max(60.0, s.request_timeout_s))
        err.print(f"worker {name}: /metrics and /health/live on {s.metrics_host}:{endpoint.port}")
    beat = Heartbeat(
        client, s.redis_prefix, consumer, w.state, art.sha256, str(embedder.device), s.heartbeat_s
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
            w.prepare(s.warmup)
        err.print(f"worker {name} serving {art.name} on {embedder.device} (consumer {consumer})")
        w.run()
    finally:
        beat.stop()
        source.close()


def _supervise(spec: str, s: Settings, shared: dict[str, object], worker_id: str) -> int:
    """``worker --devices``: one single-device worker process per device (app/cli/supervise)."""
    from app.cli import supervise

    def cuda_count() -> int:
        import torch

        return torch.cuda.device_count()

    with user_errors():
        devices = supervise.parse_devices(spec, cuda_count)
        slots = supervise.plan_slots(devices, worker_id, s.metrics_port)
    try:
        supervise.check_ports(slots, s.metrics_host)
    except OSError as e:
        raise _listen_error(
            "the workers' /metrics and /health/live",
            s.metrics_host,
            s.metrics_port,
            "--metrics-port / RDSERVE_METRICS_PORT: worker i gets that port + i; 0 turns them off",
            e,
        ) from None
    for slot in slots:
        port = f", /metrics and /health/live on :{slot.metrics_port}" if slot.metrics_port else ""
        err.print(f"worker {slot.worker_id}: {slot.device}{port}", highlight=False)
    env = supervise.child_env(shared)
    return supervise.Supervisor(slots, supervise.worker_command(), env).run()
