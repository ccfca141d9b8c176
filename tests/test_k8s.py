"""deploy/k8s: every manifest validates against the Kubernetes schemas (kubernetes-validate,
strict: unknown fields fail) and the KEDA resources against KEDA's CRD schemas (vendored in
deploy/schemas/keda); the manifests agree with the code (settings, key layout, ports, grace
periods); and the Redis behaviour the autoscaler relies on holds on a real redis-server."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import jsonschema
import kubernetes_validate
import pytest
import yaml

from app.settings import Settings
from app.transport.keys import GROUP, bulk_key, tasks_key
from tests.procs import REPO

K8S = REPO / "deploy" / "k8s"
KEDA_SCHEMAS = REPO / "deploy" / "schemas" / "keda"
#: The oldest Kubernetes the manifests claim (docs/operations.md) and the newest schemas known.
VERSIONS = ("1.29.0", kubernetes_validate.latest_version())
PLACEHOLDER_SHA = "artifact-sha"  # 12 characters, filled in by the operator (50-keda.yaml)


def _docs() -> list[tuple[Path, dict[str, Any]]]:
    files = sorted(K8S.glob("*.yaml")) + sorted((K8S / "jobs").glob("*.yaml"))
    return [(f, d) for f in files for d in yaml.safe_load_all(f.read_text()) if d]


DOCS = _docs()


def _find(kind: str, name: str) -> dict[str, Any]:
    (doc,) = [d for _, d in DOCS if d["kind"] == kind and d["metadata"]["name"] == name]
    return doc


def _closed(schema: Any) -> Any:
    """The CRD schema as the API server applies it with strict field validation (kubectl's
    default): an object with listed properties admits no others, unless the schema says so."""
    if isinstance(schema, dict):
        out = {k: _closed(v) for k, v in schema.items()}
        if (
            "properties" in out
            and "additionalProperties" not in out
            and not out.get("x-kubernetes-preserve-unknown-fields")
        ):
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [_closed(v) for v in schema]
    return schema


def _keda_validator(kind: str) -> jsonschema.Draft7Validator:
    schema = json.loads((KEDA_SCHEMAS / f"{kind.lower()}-v1alpha1.json").read_text())
    return jsonschema.Draft7Validator(_closed(schema))


def test_every_manifest_is_found_and_of_a_known_kind():
    kinds = sorted({d["kind"] for _, d in DOCS})
    assert kinds == [
        "ConfigMap",
        "Deployment",
        "Job",
        "Namespace",
        "PersistentVolumeClaim",
        "PodDisruptionBudget",
        "ScaledObject",
        "Service",
        "TriggerAuthentication",
    ]


@pytest.mark.parametrize("version", VERSIONS)
def test_kubernetes_manifests_validate_strictly(version):
    checked = 0
    for path, doc in DOCS:
        if doc["apiVersion"].startswith("keda.sh/"):
            continue
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            pytest.fail(f"{path.name}: {doc['kind']} {doc['metadata']['name']}: {e.message}")
        checked += 1
    assert checked == len(DOCS) - 2


def test_keda_resources_validate_against_the_crd_schemas():
    for kind in ("ScaledObject", "TriggerAuthentication"):
        (doc,) = [d for _, d in DOCS if d["kind"] == kind]
        assert doc["apiVersion"] == "keda.sh/v1alpha1"
        errors = [e.message for e in _keda_validator(kind).iter_errors(doc)]
        assert not errors, f"{kind}: {errors}"
    so = _find("ScaledObject", "rdserve-worker")["spec"]
    assert so["minReplicaCount"] <= so["maxReplicaCount"]  # the CRD's CEL rule


def test_the_validators_refuse_what_a_cluster_would():
    """Not vacuous: a misspelt field fails each validator."""
    so = copy.deepcopy(_find("ScaledObject", "rdserve-worker"))
    so["spec"]["minReplicaCounts"] = so["spec"].pop("minReplicaCount")
    assert list(_keda_validator("ScaledObject").iter_errors(so))
    so = copy.deepcopy(_find("ScaledObject", "rdserve-worker"))
    so["spec"]["triggers"][0]["authenticationRef"]["kind"] = "Secret"
    assert list(_keda_validator("ScaledObject").iter_errors(so))
    dep = copy.deepcopy(_find("Deployment", "rdserve-worker"))
    dep["spec"]["template"]["spec"]["containers"][0]["livenessProbe"]["httpGet"]["paht"] = "/"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(dep, VERSIONS[-1], strict=True)


def _container(name: str) -> dict[str, Any]:
    return _find("Deployment", name)["spec"]["template"]["spec"]["containers"][0]


def _env(container: dict[str, Any]) -> dict[str, Any]:
    env = {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env", [])}
    for ref in container.get("envFrom", []):
        env |= _find("ConfigMap", ref["configMapRef"]["name"])["data"]
    return env


def test_every_rdserve_variable_is_a_setting():
    fields = set(Settings.model_fields)
    for _, doc in DOCS:
        if doc["kind"] == "ConfigMap":
            names = list(doc["data"])
        elif doc["kind"] in ("Deployment", "Job"):
            names = [e["name"] for e in doc["spec"]["template"]["spec"]["containers"][0]["env"]]
        else:
            continue
        for name in names:
            if name.startswith("RDSERVE_"):
                assert name.removeprefix("RDSERVE_").lower() in fields, name


def test_probes_and_scrapes_hit_the_routes_and_ports_the_processes_serve():
    api, worker = _container("rdserve-api"), _container("rdserve-worker")
    api_port = {p["name"]: p["containerPort"] for p in api["ports"]}["http"]
    assert int(_env(api)["RDSERVE_PORT"]) == api_port
    assert api["readinessProbe"]["httpGet"]["path"] == "/health/ready"
    assert api["livenessProbe"]["httpGet"]["path"] == "/health/live"
    w_env = _env(worker)
    metrics = {p["name"]: p["containerPort"] for p in worker["ports"]}["metrics"]
    assert int(w_env["RDSERVE_METRICS_PORT"]) == metrics
    assert w_env["RDSERVE_METRICS_HOST"] == "0.0.0.0"  # reachable by the kubelet and Prometheus
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert worker[probe]["httpGet"] == {"path": "/health/live", "port": "metrics"}
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == "1"
    for name, port in (("rdserve-api", api_port), ("rdserve-worker", metrics)):
        notes = _find("Deployment", name)["spec"]["template"]["metadata"]["annotations"]
        assert notes["prometheus.io/scrape"] == "true"
        assert int(notes["prometheus.io/port"]) == port
        assert notes["prometheus.io/path"] == "/metrics"


def test_secrets_are_referenced_never_stored():
    assert not [d for _, d in DOCS if d["kind"] == "Secret"]
    text = "\n".join(p.read_text() for p in {p for p, _ in DOCS})
    assert "password:" not in text.replace("parameter: password", "")
    api_secrets = _find("Deployment", "rdserve-api")["spec"]["template"]["spec"]["volumes"]
    sources = next(v for v in api_secrets if v["name"] == "secrets")["projected"]["sources"]
    assert {s["secret"]["name"] for s in sources} == {"rdserve-api-keys", "rdserve-redis"}
    env = _env(_container("rdserve-api"))
    assert env["RDSERVE_API_KEY_FILE"].startswith("/run/secrets/")
    assert env["RDSERVE_REDIS_PASSWORD_FILE"].startswith("/run/secrets/")


def test_pod_disruption_budgets_select_their_deployments():
    for name in ("rdserve-api", "rdserve-worker"):
        pdb = _find("PodDisruptionBudget", name)["spec"]
        labels = _find("Deployment", name)["spec"]["template"]["metadata"]["labels"]
        assert pdb["selector"]["matchLabels"].items() <= labels.items()
        assert pdb["maxUnavailable"] == 1


def test_keda_triggers_watch_the_streams_the_code_uses():
    env = _env(_container("rdserve-worker"))
    prefix = env["RDSERVE_REDIS_PREFIX"]
    queue = urlsplit(env["RDSERVE_REDIS_URL"])
    so = _find("ScaledObject", "rdserve-worker")["spec"]
    assert so["scaleTargetRef"]["name"] == "rdserve-worker"
    streams = {}
    for t in so["triggers"]:
        meta = t["metadata"]
        assert t["type"] == "redis-streams"
        assert meta["address"] == f"{queue.hostname}:{queue.port}"
        assert t["authenticationRef"]["name"] == "rdserve-redis"
        streams[t["name"]] = meta["stream"]
        if "lagCount" in meta:
            assert meta["consumerGroup"] == GROUP
        else:  # the guard: stream length, which KEDA reads without a group
            assert "consumerGroup" not in meta and "streamLength" in meta
    assert streams == {
        "tasks-lag": tasks_key(prefix, PLACEHOLDER_SHA),
        "tasks-length": tasks_key(prefix, PLACEHOLDER_SHA),
        "bulk-lag": bulk_key(prefix, PLACEHOLDER_SHA),
        "bulk-length": bulk_key(prefix, PLACEHOLDER_SHA),
    }


def test_grace_periods_cover_the_work_in_flight():
    from benchmarks.capacity import worker_grace_s

    api = _find("Deployment", "rdserve-api")["spec"]["template"]["spec"]
    env = _env(api["containers"][0])
    pre_stop = int(api["containers"][0]["lifecycle"]["preStop"]["exec"]["command"][-1])
    assert api["terminationGracePeriodSeconds"] > pre_stop + float(
        env["RDSERVE_SHUTDOWN_TIMEOUT_S"]
    )
    worker = _find("Deployment", "rdserve-worker")["spec"]["template"]["spec"]
    grace = worker_grace_s()
    assert worker["terminationGracePeriodSeconds"] == grace["grace_s"]
    assert grace["grace_s"] >= grace["turn_s"] + grace["exit_s"]
    # docs/operations.md quotes these: 16 budgets 13.7 s, one maximal request 54.7 s.
    assert math.isclose(grace["drain_turn_s"], 13.68, rel_tol=0.01)
    assert math.isclose(grace["turn_s"], 54.73, rel_tol=0.01)


def test_consumer_group_lag_is_what_keda_reads_and_why_a_length_guard(redis_server):
    """XINFO GROUPS ``lag`` counts entries no worker has taken; once an entry nobody took is
    deleted (the API withdraws a task whose request gave up) Redis cannot tell the lag (nil;
    KEDA's client reads -1) until the stream is drained, while XLEN still counts the backlog."""
    r = redis_server.client()
    stream = tasks_key("rdserve", "0" * 12)
    r.xgroup_create(stream, GROUP, id="0", mkstream=True)
    ids = [r.xadd(stream, {"d": b"task"}) for _ in range(5)]
    r.xreadgroup(GROUP, "w/1", {stream: ">"}, count=2)

    def lag() -> int | None:
        return next(g["lag"] for g in r.xinfo_groups(stream) if g["name"] == GROUP.encode())

    assert lag() == 3
    r.xack(stream, GROUP, ids[0])
    r.xdel(stream, ids[0])  # answered: deleted behind the group's position
    assert lag() == 3
    r.xdel(stream, ids[3])  # withdrawn before any worker took it
    assert lag() is None and r.xlen(stream) == 3
    for _, msgs in r.xreadgroup(GROUP, "w/1", {stream: ">"}):
        for msg_id, _ in msgs:
            r.xack(stream, GROUP, msg_id)
            r.xdel(stream, msg_id)
    r.xack(stream, GROUP, ids[1])
    r.xdel(stream, ids[1])
    assert r.xlen(stream) == 0 and lag() == 0  # drained: known again
    r.close()
