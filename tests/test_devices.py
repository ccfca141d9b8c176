"""`rdserve worker --devices`: one worker process per device from one command, each with its own
metrics port and identity, restarted alone when it dies, all stopped by one SIGTERM — real
processes on CPU (`--devices cpu,cpu`) over a private redis-server."""

from __future__ import annotations

import json
import os
import signal
import socket
import time
import uuid

import httpx
import pytest
import redis

from app.cli.supervise import Slot, backoff_s, check_ports, parse_devices, plan_slots
from tests.harness import Cluster, cluster_env
from tests.procs import free_port, rdserve

PREFIX = "rdserve-devices"


def test_parse_devices_lists_all_and_refuses_unknown_items():
    assert parse_devices("cpu,cpu", lambda: 0) == ["cpu", "cpu"]
    assert parse_devices(" cuda:0, cuda:1 ", lambda: 0) == ["cuda:0", "cuda:1"]
    assert parse_devices("all", lambda: 3) == ["cuda:0", "cuda:1", "cuda:2"]
    with pytest.raises(ValueError, match="no CUDA device"):
        parse_devices("all", lambda: 0)
    with pytest.raises(ValueError, match=r"item 2 \('gpu1'\)"):
        parse_devices("cuda:0,gpu1", lambda: 0)
    with pytest.raises(ValueError, match="item 1"):
        parse_devices("cuda", lambda: 1)


def test_slots_get_consecutive_ports_and_suffixed_ids():
    assert plan_slots(["cuda:0", "cuda:1"], "gpu-host", 9100) == [
        Slot(0, "cuda:0", "gpu-host-0", 9100),
        Slot(1, "cuda:1", "gpu-host-1", 9101),
    ]
    assert [s.metrics_port for s in plan_slots(["cpu", "cpu"], "h", 0)] == [0, 0]
    with pytest.raises(ValueError, match="ports up to 65536"):
        plan_slots(["cpu", "cpu"], "h", 65535)
    assert [backoff_s(n) for n in (1, 2, 3, 8)] == [1.0, 2.0, 4.0, 60.0]


def test_a_taken_port_is_named_before_any_worker_starts():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        slots = plan_slots(["cpu", "cpu"], "h", port - 1)
        with pytest.raises(OSError, match="port of worker h-1"):
            check_ports(slots, "127.0.0.1")


def _two_free_ports() -> int:
    """A base port whose successor is free too (both checked by binding)."""
    for _ in range(50):
        base = free_port()
        try:
            check_ports(plan_slots(["cpu", "cpu"], "probe", base), "127.0.0.1")
            return base
        except OSError:
            continue
    raise AssertionError("no two consecutive free ports")


def _beats(r: redis.Redis) -> dict[str, dict]:
    """Live heartbeats by worker id (``<prefix>:…worker:<consumer>``, app/transport/keys.py)."""
    keys = list(r.scan_iter(match=f"{PREFIX}:*worker:*"))
    beats = [json.loads(raw) for raw in r.mget(keys) if raw] if keys else []
    return {hb["id"]: hb for hb in beats if hb.get("running")}


def _until(what: str, check, timeout: float, proc):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = check()
        if got:
            return got
        time.sleep(0.1)
    raise AssertionError(f"{what} not within {timeout} s\n{proc.output()[-4000:]}")


def _restarted(r: redis.Redis, name: str, before: dict[str, dict], fleet) -> dict[str, dict]:
    """The heartbeats once ``name`` runs again in a new process (another pid than before)."""

    def check() -> dict[str, dict] | None:
        beats = _beats(r)
        pid = beats.get(name, {}).get("pid")
        return beats if pid not in (None, before[name]["pid"]) else None

    return _until(f"{name} restarted", check, 60, fleet)


def _residues(metrics_base: str) -> float:
    """Residues a worker has run through its models (all levels), from its own /metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{metrics_base}/metrics", timeout=5).text
    return sum(
        s.value
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
        if s.name == "rdserve_residues_total"
    )


def _embed(base: str) -> None:
    """A request no cache can answer (a fresh sequence): some worker must compute it."""
    seq = "MKT" + "".join("ACDEFGHIKLMNPQRSTVWY"[b % 20] for b in uuid.uuid4().bytes)
    r = httpx.post(f"{base}/v1/embeddings", json={"input": [seq], "dimensions": 16}, timeout=60)
    assert r.status_code == 200, r.text


def _serves_alone(cluster: Cluster, ports: dict[str, str], alive: str, fleet) -> None:
    """With the other worker just killed, requests are computed by ``alive`` (its residue
    count grows)."""
    before = _residues(ports[alive])
    _embed(cluster.base)
    assert _residues(ports[alive]) > before, fleet.output()[-4000:]


def test_one_command_runs_a_worker_per_device_restarts_each_alone_and_stops_all(
    tiny_artifact, redis_server, tmp_path
):
    r = redis_server.client()
    base_port = _two_free_ports()
    env = cluster_env(redis_server.url, tiny_artifact, PREFIX)
    cluster = Cluster(env, tmp_path)  # the API
    fleet = rdserve(
        "worker",
        "--devices",
        "cpu,cpu",
        "--worker-id",
        "fleet",
        "--metrics-port",
        str(base_port),
        env=env,
        log=tmp_path / "fleet.log",
    )
    ports = {f"fleet-{i}": f"http://127.0.0.1:{base_port + i}" for i in (0, 1)}
    try:
        cluster.wait_workers(2)
        first = _beats(r)
        assert set(first) == {"fleet-0", "fleet-1"}
        assert {hb["device"] for hb in first.values()} == {"cpu"}
        assert first["fleet-0"]["pid"] != first["fleet-1"]["pid"] != fleet.p.pid
        for url in ports.values():  # each its own metrics port, live
            assert httpx.get(f"{url}/health/live", timeout=5).status_code == 200

        # A child dies: only it is restarted (new process, same id); the other serves meanwhile.
        os.kill(first["fleet-0"]["pid"], signal.SIGKILL)
        _serves_alone(cluster, ports, "fleet-1", fleet)
        second = _restarted(r, "fleet-0", first, fleet)
        assert second["fleet-1"]["pid"] == first["fleet-1"]["pid"]  # untouched
        assert fleet.alive()

        # The restarted child serves too: with the other one killed, it computes alone.
        os.kill(second["fleet-1"]["pid"], signal.SIGKILL)
        _serves_alone(cluster, ports, "fleet-0", fleet)
        third = _restarted(r, "fleet-1", first, fleet)
        assert third["fleet-0"]["pid"] == second["fleet-0"]["pid"]
        cluster.wait_workers(2)

        # One SIGTERM to the supervisor stops every child gracefully (forwarded), then it exits.
        fleet.signal(signal.SIGTERM)
        assert fleet.wait(60) == 0, fleet.output()[-4000:]
        out = fleet.output()
        for name in ("fleet-0", "fleet-1"):
            assert f"worker {name}: stopping after the current batch" in out
            with pytest.raises(ProcessLookupError):
                os.kill(third[name]["pid"], 0)
        assert _beats(r) == {}  # each deregistered on its way out
        assert out.count('"msg":"worker exited; restarting it"') == 2, out[-4000:]
    finally:
        fleet.stop()
        cluster.close()
        r.close()
