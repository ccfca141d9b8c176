"""Metrics that do not mislead dashboards, with real processes (API + worker over a private Redis):
each process exports only what it knows, the artifact info is labelled everywhere, labelled
counters start at 0, the standard process/Python collectors are there, and /health/ready with
no live worker says unavailable and why."""

from __future__ import annotations

import httpx
from prometheus_client.parser import text_string_to_metric_families

from tests.harness import Cluster, cluster_env
from tests.procs import wait_http

API_ONLY = {"rdserve_workers_live", "rdserve_queue_depth", "rdserve_requests_total"}
WORKER_ONLY = {"rdserve_worker_up", "rdserve_model_loaded", "rdserve_batch_sequences_count"}


def samples(base: str) -> dict[str, list[dict[str, str]]]:
    text = httpx.get(f"{base}/metrics", timeout=5).text
    out: dict[str, list[dict[str, str]]] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out.setdefault(s.name, []).append({**s.labels, "_value": str(s.value)})
    return out


def test_each_process_exports_what_it_knows(redis_server, tiny_artifact, tmp_path):
    from models.artifact import load_artifact

    sha = load_artifact(tiny_artifact).sha256
    c = Cluster(cluster_env(redis_server.url, tiny_artifact, "rdserve-metrics"), tmp_path)
    try:
        # No worker yet: unavailable, with the reason, not "warming".
        body = wait_http(f"{c.base}/health/ready", c.api, status=503).json()
        assert body["status"] == "unavailable" and body["reason"] == "no_worker", body

        c.worker("w1", metrics=True)
        c.wait_workers(1)
        api, worker = samples(c.base), samples(c.metrics["w1"])
        assert set(api) >= API_ONLY and not (WORKER_ONLY & set(api)), sorted(api)
        assert set(worker) >= WORKER_ONLY and not (API_ONLY & set(worker)), sorted(worker)
        for proc in (api, worker):
            (info,) = proc["rdserve_artifact_info"]
            assert info["sha256"] == sha and info["family"] == "esm2" and info["dims"] == "32,48,64"
            assert "process_cpu_seconds_total" in proc and "python_info" in proc
        # Labelled counters exist at 0 before the first event, so rate() sees the first one.
        errors = {s["code"]: s["_value"] for s in api["rdserve_errors_total"]}
        assert errors["no_worker"] == "0.0" and errors["invalid_sequence"] == "0.0"
        tiers = {s["tier"] for s in api["rdserve_cache_lookups_total"]}
        assert tiers == {"full_hit", "partial", "miss"}
        failures = {s["reason"]: s["_value"] for s in worker["rdserve_item_failures_total"]}
        assert failures == {"out_of_memory": "0.0", "compute_failed": "0.0"}
        residues = {s["level"] for s in worker["rdserve_residues_total"]}
        assert residues == {"tiny32", "tiny48", "tiny64"}
    finally:
        c.close()
