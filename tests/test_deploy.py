"""Deployment checks without a Docker engine: the Dockerfile (hadolint, structure), the Compose
file (schema, services), Prometheus and Grafana configs against the real /metrics, .env.example,
the README configuration table, docker/fit.sh, and the compose topology run as plain processes."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import httpx
import jsonschema
import pytest
import redis
import yaml
from prometheus_client.parser import text_string_to_metric_families

from app.config_doc import README, env_name, readme_block, settings_table
from app.settings import Settings
from tests.helpers import wait_ready
from tests.procs import Proc, free_port, rdserve, wait_http

REPO = Path(__file__).resolve().parents[1]
SCHEMA = REPO.parent / "shared" / "schemas" / "compose-spec.json"
DOCKERFILE = REPO / "Dockerfile"
COMPOSE = REPO / "docker-compose.yml"
DOCKER = REPO / "docker"
DASHBOARD = DOCKER / "grafana" / "dashboards" / "rdserve.json"
RDSERVE_SERVICES = ("api", "worker", "fit")
# The two Redis services and their config files: the task queue and the embedding cache.
REDIS_SERVICES = {"redis": "./docker/redis.conf", "redis-cache": "./docker/redis-cache.conf"}
# Variables read by the image's scripts (docker/*), not by the Settings class.
SCRIPT_VARS = {
    "RDSERVE_HEALTH_URL",
    "RDSERVE_FIT_FASTA",
    "RDSERVE_REFERENCE_SCALERS",
    "RDSERVE_REFERENCE_REGRESSOR",
    "RDSERVE_REFERENCE_NSEQS",
}
# Settings that compose sets on purpose to something other than the Settings default.
DEPLOYMENT_OVERRIDES = {
    "artifact",
    "data_dir",
    "cache_dir",
    "device",
    "port",
    "metrics_port",
    "metrics_host",
    "api_keys",
    "cache_redis_url",
    "redis_username",
    "redis_password_file",
}
# The panels the dashboard must have, by the series they query.
DASHBOARD_MUST_QUERY = {
    "rdserve_requests_total",  # request rate, non-2xx
    "rdserve_request_duration_seconds_bucket",  # latency percentiles
    "rdserve_queue_depth",
    "rdserve_cache_lookups_total",  # hit ratio by tier
    "rdserve_forward_duration_seconds_bucket",  # per-level forward time
    "rdserve_residues_total",  # residues/s by level
    "rdserve_errors_total",
    "rdserve_workers_live",
    "rdserve_batch_padding_ratio_bucket",
}
SEQS = ["MKTAYIAKQRQISFVKSHFSRQ", "GSHMLEDPVDAFQ", "MVLSPADKTNVKAAWGKVGAHAGEYGAEAL"]


# ---- helpers: Dockerfile, Compose interpolation, PromQL -------------------------------------


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out: list[tuple[str, str]] = []
    buf = ""
    for line in DOCKERFILE.read_text().splitlines():
        if line.lstrip().startswith("#"):
            continue  # comments, also those inside a continued instruction
        buf += line.rstrip()
        if buf.endswith("\\"):
            buf = buf[:-1] + " "
            continue
        if buf.strip():
            instr, _, args = buf.strip().partition(" ")
            out.append((instr.upper(), args.strip()))
        buf = ""
    return out


def final_stage() -> list[tuple[str, str]]:
    ins = dockerfile_instructions()
    last_from = max(i for i, (k, _) in enumerate(ins) if k == "FROM")
    return ins[last_from:]


def image_env() -> dict[str, str]:
    """ENV of the runtime stage (KEY=VALUE pairs)."""
    env: dict[str, str] = {}
    for k, args in final_stage():
        if k == "ENV":
            for tok in shlex.split(args):
                key, _, value = tok.partition("=")
                env[key] = value
    return env


def image_scripts() -> dict[str, Path]:
    """Commands the image installs from docker/ (name in the image → file in the repo)."""
    scripts = {}
    for k, args in final_stage():
        if k == "COPY" and "--from" not in args:
            parts = [p for p in args.split() if not p.startswith("--")]
            src, dest = parts[0], parts[-1]
            scripts[Path(dest).name] = REPO / src
    return scripts


def exec_form(args: str) -> list[str]:
    return json.loads(args)


_VAR = re.compile(
    r"\$(?:(?P<esc>\$)|\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?+])(?P<arg>[^}]*))?\}"
    r"|(?P<bare>[A-Za-z_][A-Za-z0-9_]*))"
)


def interpolate(value: object, env: dict[str, str]) -> object:
    """Compose variable interpolation (${V}, ${V:-d}, ${V-d}, ${V:?e}, ${V:+a}, $$)."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def sub(m: re.Match) -> str:
        if m["esc"]:
            return "$"
        name, op, arg = m["name"] or m["bare"], m["op"], m["arg"] or ""
        v = env.get(name)
        set_, nonempty = v is not None, bool(v)
        if op in (":-", "-"):
            return v if (nonempty if op == ":-" else set_) else arg  # type: ignore[return-value]
        if op in (":+", "+"):
            return arg if (nonempty if op == ":+" else set_) else ""
        if op in (":?", "?") and not (nonempty if op == ":?" else set_):
            raise ValueError(f"{name}: {arg}")
        return v or ""

    return _VAR.sub(sub, value)


def compose_variables(value: object) -> set[str]:
    """Names of the variables a (raw) compose structure interpolates."""
    if isinstance(value, dict):
        return set().union(*(compose_variables(v) for v in value.values()), set())
    if isinstance(value, list):
        return set().union(*(compose_variables(v) for v in value), set())
    if isinstance(value, str):
        return {m["name"] or m["bare"] for m in _VAR.finditer(value) if not m["esc"]}
    return set()


@pytest.fixture(scope="module")
def raw_compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


@pytest.fixture(scope="module")
def compose(raw_compose) -> dict:
    """The compose model with every variable at its default (an empty .env)."""
    return interpolate(raw_compose, {})  # type: ignore[return-value]


def env_of(service: dict) -> dict[str, str]:
    env = service.get("environment", {})
    if isinstance(env, list):
        env = dict(e.split("=", 1) for e in env)
    return {k: "" if v is None else str(v) for k, v in env.items()}


def mounts(service: dict) -> dict[str, str]:
    """Mount target → source (named volume or ./path) of a service's short-syntax volumes."""
    out = {}
    for v in service.get("volumes", []):
        source, target, *_ = v.split(":")
        out[target] = source
    return out


_PROMQL_KEYWORDS = {
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "bool",
    "and",
    "or",
    "unless",
    "offset",
    "inf",
    "nan",
}


def promql_metric_names(expr: str) -> set[str]:
    """Metric names a PromQL expression selects (functions, keywords, labels left out)."""
    s = re.sub(r'"(?:\\.|[^"\\])*"|\'(?:\\.|[^\'\\])*\'', '""', expr)  # string literals
    s = re.sub(r"\{[^}]*\}", " ", s)  # label matchers
    s = re.sub(r"\[[^\]]*\]", " ", s)  # range selectors, subqueries, Grafana $__intervals
    s = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", s)
    names = set()
    for m in re.finditer(r"(?<![\w.$])[A-Za-z_:][A-Za-z0-9_:]*", s):
        if m[0].lower() in _PROMQL_KEYWORDS or s[m.end() :].lstrip().startswith("("):
            continue
        names.add(m[0])
    return names


def dashboard_exprs(node: object) -> Iterator[str]:
    if isinstance(node, dict):
        if isinstance(node.get("expr"), str):
            yield node["expr"]
        for v in node.values():
            yield from dashboard_exprs(v)
    elif isinstance(node, list):
        for v in node:
            yield from dashboard_exprs(v)


def sample_names(exposition: str) -> set[str]:
    return {s.name for f in text_string_to_metric_families(exposition) for s in f.samples}


def dockerignore_excludes(path: str) -> bool:
    """Docker's .dockerignore rule (last matching pattern wins; a match on a parent counts)."""
    patterns = [
        ln.strip()
        for ln in (REPO / ".dockerignore").read_text().splitlines()
        if ln.strip() and not ln.startswith("#")
    ]
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    excluded = False
    for pat in patterns:
        neg = pat.startswith("!")
        pat = pat.lstrip("!").strip("/")
        regex = re.escape(pat).replace(r"\*\*/", "(?:.*/)?").replace(r"\*", "[^/]*")
        if any(re.fullmatch(regex, p) for p in prefixes):
            excluded = not neg
    return excluded


# ---- Dockerfile ------------------------------------------------------------------------------


def test_hadolint_passes():
    hadolint = Path(sys.executable).parent / "hadolint"
    r = subprocess.run(
        [str(hadolint), "--no-color", "--failure-threshold", "warning", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    # Any ignored rule must say why on the same line.
    for line in DOCKERFILE.read_text().splitlines():
        if "hadolint ignore" in line:
            assert re.search(r"ignore=\S+\s+\S", line), f"unjustified: {line}"


def test_dockerfile_image_layout():
    ins = dockerfile_instructions()
    args = dict(a.split("=", 1) for k, a in ins if k == "ARG" and "=" in a)
    # Base pinned by exact tag and digest; every stage uses it.
    assert re.fullmatch(
        r"python:3\.11\.\d+-slim-bookworm@sha256:[0-9a-f]{64}", args["PYTHON_IMAGE"]
    ), args["PYTHON_IMAGE"]
    froms = [a for k, a in ins if k == "FROM"]
    assert froms == ["${PYTHON_IMAGE} AS builder", "${PYTHON_IMAGE} AS runtime"]
    # CUDA PyTorch by default, switchable by build argument.
    assert re.fullmatch(r"https://download\.pytorch\.org/whl/cu\d+", args["TORCH_INDEX"])
    assert args["TORCH_VERSION"] == "2.13.0"
    runs = " ".join(a for k, a in ins if k == "RUN")
    assert '--index-url "${TORCH_INDEX}" "torch==${TORCH_VERSION}"' in runs
    stage = final_stage()
    assert ("COPY", "--from=builder /opt/venv /opt/venv") in stage
    # Non-root, numeric user (the last USER of the final stage is the one that runs); one image
    # for serve and worker.
    user = [a for k, a in stage if k == "USER"][-1]
    uid = args["RDSERVE_UID"] if user.startswith("${RDSERVE_UID}") else user.split(":")[0]
    assert uid.isdigit() and int(uid) > 0
    assert exec_form(next(a for k, a in stage if k == "ENTRYPOINT")) == ["rdserve"]
    assert exec_form(next(a for k, a in stage if k == "CMD"))[:3] == ["serve", "--host", "0.0.0.0"]
    health = next(a for k, a in stage if k == "HEALTHCHECK")
    cmd = exec_form(health.split(" CMD ", 1)[1])
    assert image_scripts()[cmd[0]] == DOCKER / "healthcheck.py"
    # The model cache and the data directory are volumes.
    env = image_env()
    volumes = exec_form(next(a for k, a in stage if k == "VOLUME"))
    for path in (env["HF_HOME"], env["RDSERVE_DATA_DIR"], env["RDSERVE_CACHE_DIR"]):
        assert any(path == v or path.startswith(v + "/") for v in volumes), path


def test_build_context_holds_exactly_what_is_copied():
    for _, script in image_scripts().items():
        assert script.is_file() and os.access(script, os.X_OK), script
    copied = [
        a.split()[-2] for k, a in dockerfile_instructions() if k == "COPY" and "--from" not in a
    ]
    copied += ["pyproject.toml", "README.md"]
    for src in copied:
        assert (REPO / src).exists(), src
        files = [REPO / src] if (REPO / src).is_file() else list((REPO / src).rglob("*.py"))
        for f in files:
            assert not dockerignore_excludes(str(f.relative_to(REPO))), f
    data = next((REPO / "models" / "data").glob("*.fasta"))
    assert not dockerignore_excludes(str(data.relative_to(REPO)))
    for path in (".venv/bin/python", ".git/HEAD", "tests/conftest.py", "app/__pycache__/x.pyc"):
        assert dockerignore_excludes(path), path


# ---- Compose ---------------------------------------------------------------------------------


def test_compose_validates_against_the_spec(raw_compose, compose):
    schema = json.loads(SCHEMA.read_text())
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    for model in (raw_compose, compose):
        errors = sorted(cls(schema).iter_errors(model), key=lambda e: list(e.path))
        assert not errors, "\n".join(f"{list(e.path)}: {e.message}" for e in errors)


def test_compose_services(compose):
    s = compose["services"]
    assert set(s) >= {"redis", "redis-cache", "api", "worker", "fit", "prometheus", "grafana"}
    assert {n: s[n].get("profiles") for n in s} == {
        "redis": None,
        "redis-cache": None,
        "api": None,
        "worker": None,
        "fit": ["fit"],
        "prometheus": ["monitoring"],
        "grafana": ["monitoring"],
    }
    # Redis: the queue (never evicts) and the cache (LRU), each started by docker/redis-start.sh
    # with its config, ACL users whose passwords are compose secrets (files), an authenticated
    # ping health check, no published port.
    secrets = compose["secrets"]
    for name, conf in REDIS_SERVICES.items():
        r, m = s[name], mounts(s[name])
        start = next(t for t, src in m.items() if src == "./docker/redis-start.sh")
        assert r["command"][:3] == ["sh", start, next(t for t, src in m.items() if src == conf)]
        renv = env_of(r)
        for var in ("REDIS_API_PASSWORD_FILE", "REDIS_WORKER_PASSWORD_FILE"):
            if var in renv:
                secret = Path(renv[var]).name
                assert renv[var] == f"/run/secrets/{secret}" and secret in r["secrets"]
        assert "REDIS_API_PASSWORD_FILE" in renv
        test = r["healthcheck"]["test"]
        assert test[0] == "CMD-SHELL" and "redis-cli --user" in test[1] and "PONG" in test[1]
        assert "ports" not in r
    assert "REDIS_WORKER_PASSWORD_FILE" not in env_of(s["redis-cache"])  # workers never use it
    for secret in secrets.values():
        assert secret["file"].startswith("./secrets/")  # files, git-ignored; no literal here
    assert "/secrets/" in (REPO / ".gitignore").read_text().splitlines()
    for name, role in (("api", "rdserve-api"), ("worker", "rdserve-worker")):
        env = env_of(s[name])
        assert env["RDSERVE_REDIS_USERNAME"] == role
        secret = Path(env["RDSERVE_REDIS_PASSWORD_FILE"]).name
        assert secret in s[name]["secrets"] and secret in secrets
    assert urlsplit(env_of(s["api"])["RDSERVE_CACHE_REDIS_URL"]).hostname == "redis-cache"
    # One image for api, worker and fit, built from this repository.
    for name in RDSERVE_SERVICES:
        assert s[name]["image"] == s["api"]["image"] and s[name]["build"]["context"] == "."
    scripts = image_scripts()
    # API: distributed mode against the redis service, port 8000, after Redis is healthy.
    api = s["api"]
    argv = api["command"]
    assert argv[:3] == ["serve", "--host", "0.0.0.0"]
    url = urlsplit(argv[argv.index("--redis-url") + 1])
    assert (url.hostname, url.port) == ("redis", 6379)
    api_port = int(env_of(api).get("RDSERVE_PORT", Settings().port))
    assert [p.rsplit(":", 1)[1] for p in api["ports"]] == [str(api_port)]
    assert api["depends_on"]["redis"]["condition"] == "service_healthy"
    assert api["depends_on"]["redis-cache"]["condition"] == "service_healthy"
    assert scripts[api["healthcheck"]["test"][1]] == DOCKER / "healthcheck.py"
    # Worker: one GPU per replica, scalable (no fixed name, no host ports), metrics in-network.
    w = s["worker"]
    assert w["command"][:3] == ["worker", "--redis-url", argv[argv.index("--redis-url") + 1]]
    assert w["deploy"]["resources"]["reservations"]["devices"] == [
        {"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}
    ]
    assert "container_name" not in w and "ports" not in w
    wenv = env_of(w)
    metrics_port = int(wenv["RDSERVE_METRICS_PORT"])
    assert [str(p) for p in w["expose"]] == [str(metrics_port)]
    assert urlsplit(wenv["RDSERVE_HEALTH_URL"]).port == metrics_port
    assert urlsplit(wenv["RDSERVE_HEALTH_URL"]).path == "/health/live"  # a real loop check
    assert w["depends_on"]["redis"]["condition"] == "service_healthy"
    assert scripts[w["healthcheck"]["test"][1]] == DOCKER / "healthcheck.py"
    # fit: the one-shot script, writable data volume, GPU.
    fit = s["fit"]
    assert scripts[fit["entrypoint"][0]] == DOCKER / "fit.sh"
    assert fit["restart"] == "no" and fit["healthcheck"] == {"disable": True}
    assert fit["deploy"]["resources"] == w["deploy"]["resources"]
    # Monitoring: Grafana waits for a healthy Prometheus.
    assert s["grafana"]["depends_on"]["prometheus"]["condition"] == "service_healthy"
    # Every bind mount exists in the repository.
    for svc in s.values():
        for src in mounts(svc).values():
            if src.startswith("./"):
                assert (REPO / src).exists(), src


def test_compose_volumes_hold_the_data_dir_and_model_cache(compose):
    s, declared = compose["services"], set(compose["volumes"])
    img = image_env()
    for name in RDSERVE_SERVICES:
        env = {**img, **env_of(s[name])}
        m = mounts(s[name])
        assert m.get(env["RDSERVE_DATA_DIR"]) in declared, name
        assert Path(env["RDSERVE_ARTIFACT"]).is_relative_to(env["RDSERVE_DATA_DIR"])
        if name != "api":  # the API loads no model
            cache = [t for t in m if Path(env["HF_HOME"]).is_relative_to(t)]
            assert cache and m[cache[0]] in declared, name
            assert Path(env["RDSERVE_CACHE_DIR"]).is_relative_to(cache[0])
    # fit writes the artifact; api and workers only read it.
    assert not s["fit"]["volumes"][0].endswith(":ro")
    assert all(v.endswith(":ro") for v in s["api"]["volumes"] if v.startswith("data:"))
    for svc in s.values():
        for src in mounts(svc).values():
            assert src.startswith("./") or src in declared, src


def test_env_example_documents_every_variable(raw_compose, compose, monkeypatch):
    text = (REPO / ".env.example").read_text()
    documented = dict(re.findall(r"^#? ?([A-Z][A-Z0-9_]*)=(.*)$", text, re.M))
    active = dict(re.findall(r"^([A-Z][A-Z0-9_]*)=(.*)$", text, re.M))
    used = compose_variables(raw_compose)
    assert used - set(documented) == set(), "undocumented in .env.example"
    assert set(active) - used - {"COMPOSE_PROFILES"} == set(), "not used by docker-compose.yml"
    # An unedited copy of .env.example deploys the compose defaults (secrets aside).
    with_env = interpolate(raw_compose, active)
    for name in RDSERVE_SERVICES:
        a, b = env_of(with_env["services"][name]), env_of(compose["services"][name])
        assert {k: v for k, v in a.items() if k != "HF_TOKEN"} == {
            k: v for k, v in b.items() if k != "HF_TOKEN"
        }
    # Every RDSERVE_* a container gets is a setting (or read by the image's scripts), parses,
    # and equals the Settings default unless compose overrides it on purpose.
    fields = {env_name(f): f for f in Settings.model_fields}
    default = Settings()
    for name in RDSERVE_SERVICES:
        env = {
            k: v for k, v in env_of(compose["services"][name]).items() if k.startswith("RDSERVE")
        }
        if name == "fit":  # docker/fit.sh unsets an empty RDSERVE_REVISION
            assert "unset RDSERVE_REVISION" in (DOCKER / "fit.sh").read_text()
            env = {k: v for k, v in env.items() if v or k != "RDSERVE_REVISION"}
        for var in set(env) - set(fields):
            assert var in SCRIPT_VARS, f"{name}: {var} is neither a setting nor a script variable"
        for k in [k for k in os.environ if k.startswith("RDSERVE_")]:
            monkeypatch.delenv(k)
        for k, v in env.items():
            monkeypatch.setenv(k, v)
        got = Settings()
        for var in set(env) & set(fields):
            f = fields[var]
            if f not in DEPLOYMENT_OVERRIDES:
                assert getattr(got, f) == getattr(default, f), f"{name}: {var}"
        assert got.keys() == []
    for var in SCRIPT_VARS:
        script = DOCKER / ("healthcheck.py" if var == "RDSERVE_HEALTH_URL" else "fit.sh")
        assert var in script.read_text(), var


# ---- Prometheus and Grafana ------------------------------------------------------------------


def test_prometheus_scrapes_the_api_and_every_worker(compose):
    prom = yaml.safe_load((DOCKER / "prometheus.yml").read_text())
    jobs = {j["job_name"]: j for j in prom["scrape_configs"]}
    s = compose["services"]
    api_port = int(env_of(s["api"]).get("RDSERVE_PORT", Settings().port))
    api = jobs["rdserve-api"]
    assert api.get("metrics_path", "/metrics") == "/metrics"
    assert [t for sc in api["static_configs"] for t in sc["targets"]] == [f"api:{api_port}"]
    worker = jobs["rdserve-worker"]
    (sd,) = worker["dns_sd_configs"]
    assert sd["names"] == ["worker"] and sd["type"] == "A"
    assert sd["port"] == int(env_of(s["worker"])["RDSERVE_METRICS_PORT"])
    # The config Prometheus loads is this file.
    target = next(
        t for t, src in mounts(s["prometheus"]).items() if src == "./docker/prometheus.yml"
    )
    assert f"--config.file={target}" in s["prometheus"]["command"]


def test_grafana_provisioning_fits_together(compose):
    s = compose["services"]
    g = mounts(s["grafana"])
    assert g["/etc/grafana/provisioning"] == "./docker/grafana/provisioning"
    prov = DOCKER / "grafana" / "provisioning"
    (ds,) = yaml.safe_load((prov / "datasources" / "prometheus.yml").read_text())["datasources"]
    url = urlsplit(ds["url"])
    prom_port = int(s["prometheus"]["ports"][0].rsplit(":", 1)[1])
    assert ds["type"] == "prometheus" and (url.hostname, url.port) == ("prometheus", prom_port)
    (provider,) = yaml.safe_load((prov / "dashboards" / "rdserve.yml").read_text())["providers"]
    assert g[provider["options"]["path"]] == "./docker/grafana/dashboards"
    home = Path(env_of(s["grafana"])["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"])
    assert home == Path(provider["options"]["path"]) / DASHBOARD.name
    dash = json.loads(DASHBOARD.read_text())
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    uids = {
        p["datasource"]["uid"]
        for p in dash["panels"] + [t for p in dash["panels"] for t in p["targets"]]
    }
    assert uids == {ds["uid"]}
    used = set().union(*(promql_metric_names(e) for e in dashboard_exprs(dash)))
    assert used >= DASHBOARD_MUST_QUERY, DASHBOARD_MUST_QUERY - used


@pytest.mark.parametrize(
    ("expr", "names"),
    [
        (
            "histogram_quantile(0.9, sum by (le, level) "
            '(rate(a_bucket{level!="x{y}"}[$__rate_interval])))',
            {"a_bucket"},
        ),
        (
            "sum by (tier) (rate(a_total[5m])) / ignoring(tier) group_left "
            "sum(rate(b_total[5m] offset 1h))",
            {"a_total", "b_total"},
        ),
        ('up{job="rdserve-api"} == bool 1e3 and on(instance) c:recorded', {"up", "c:recorded"}),
        ("max(rdserve_workers_live)", {"rdserve_workers_live"}),
    ],
)
def test_promql_metric_names(expr, names):
    assert promql_metric_names(expr) == names


def test_dashboard_queries_only_exposed_metrics(make_app):
    """Every series the dashboard queries is in the service's real /metrics (embedded mode)."""
    c, _ = make_app()
    with c:
        wait_ready(c)
        for pooling in ("mean", "per_residue"):
            for _ in range(2):  # the repeat is a cache hit
                r = c.post(
                    "/v1/embeddings", json={"input": SEQS, "dimensions": 40, "pooling": pooling}
                )
                assert r.status_code == 200, r.text
        assert c.post("/v1/embeddings", json={"input": ["MKJ"]}).status_code == 400
        exposed = sample_names(c.get("/metrics").text)
    used = set().union(
        *(promql_metric_names(e) for e in dashboard_exprs(json.loads(DASHBOARD.read_text())))
    )
    assert used, "no PromQL found"
    assert used - exposed == set(), f"queried but not exposed: {sorted(used - exposed)}"


# ---- README ----------------------------------------------------------------------------------


def test_readme_config_table_matches_settings():
    assert readme_block(README.read_text()) == settings_table(), (
        "README configuration table is stale: run .venv/bin/python -m app.config_doc --write"
    )
    table = settings_table()
    assert all(f"`{env_name(f)}`" in table for f in Settings.model_fields)


def test_readme_operations_section():
    text = README.read_text()
    ops = text.split("<!-- ops:start -->", 1)[1].split("<!-- ops:end -->", 1)[0]
    for needle in (
        "docker compose up -d",
        "--scale worker=",
        "--profile fit",
        "--profile monitoring",
    ):
        assert needle in ops, needle
    assert "docs/operations.md" in ops and (REPO / "docs" / "operations.md").is_file()


# ---- docker/fit.sh ---------------------------------------------------------------------------


def containerize(value: str, tmp: Path) -> str:
    """Map the container's /data, /cache and /run/secrets paths into a temp dir."""
    for root in ("/data", "/cache", "/run/secrets"):
        if value == root or value.startswith(root + "/"):
            return str(tmp / value.lstrip("/"))
    return value


def run_fit_script(compose: dict, tmp: Path, **extra: str) -> tuple[str, list[str] | None]:
    """docker/fit.sh with the fit service's environment and a stub `rdserve` that records its
    arguments: (output, the rdserve argv or None when it was not called)."""
    script = image_scripts()[compose["services"]["fit"]["entrypoint"][0]]
    stub = tmp / "bin" / "rdserve"
    stub.parent.mkdir(exist_ok=True)
    stub.write_text('#!/bin/sh\nprintf "%s\\n" "$@" > "$RDSERVE_STUB_ARGS"\n')
    stub.chmod(0o755)
    record = tmp / "argv.txt"
    record.unlink(missing_ok=True)
    env = {**image_env(), **env_of(compose["services"]["fit"])}
    env = {k: containerize(v, tmp) for k, v in env.items() if k != "PATH"}
    env |= {"PATH": f"{stub.parent}{os.pathsep}{os.environ['PATH']}", "RDSERVE_DEVICE": "cpu"}
    env |= {"RDSERVE_STUB_ARGS": str(record), **extra}
    r = subprocess.run(["sh", str(script)], env=env, capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout, record.read_text().splitlines() if record.exists() else None


def test_fit_script_fits_imports_or_skips(compose, tiny_esm_dirs, tmp_path):
    """Each branch of docker/fit.sh; the rdserve commands it builds then run for real."""
    import numpy as np
    from typer.testing import CliRunner

    from app.cli import cli
    from models.artifact import load_artifact
    from tests.helpers import write_scaler

    models = ",".join(str(p) for p in tiny_esm_dirs)
    names, dims = [p.name for p in tiny_esm_dirs], [32, 48, 64]
    scalers = tmp_path / "scalers"
    scalers.mkdir()
    rng = np.random.default_rng(0)
    for i in range(2):
        write_scaler(scalers, dims[i], dims[i + 1], names[i], names[i + 1], "linear", rng)
    ref, fitted = tmp_path / "ref.safetensors", tmp_path / "fit.safetensors"
    # Reference scalers configured: import them.
    _, argv = run_fit_script(
        compose,
        tmp_path,
        RDSERVE_MODELS=models,
        RDSERVE_ARTIFACT=str(ref),
        RDSERVE_REFERENCE_SCALERS=str(scalers),
    )
    assert (
        argv and argv[:2] == ["import-reference", str(scalers)] and argv[-2:] == ["--out", str(ref)]
    )
    res = CliRunner().invoke(cli, argv)
    assert res.exit_code == 0, res.output
    assert load_artifact(ref).regressor == "reference-linear"
    # Otherwise: fit (the compose environment's settings become flags).
    _, argv = run_fit_script(
        compose,
        tmp_path,
        RDSERVE_MODELS=models,
        RDSERVE_ARTIFACT=str(fitted),
        RDSERVE_FIT_SEQUENCES="8",
    )
    assert argv and argv[0] == "fit" and argv[-2:] == ["--out", str(fitted)]
    assert "--revision" not in argv  # compose passes RDSERVE_REVISION empty
    res = CliRunner().invoke(cli, argv)
    assert res.exit_code == 0, res.output
    art = load_artifact(fitted)
    assert art.dims == dims and art.fitting["n_sequences"] == 8
    # The artifact exists: nothing runs.
    out, argv = run_fit_script(
        compose, tmp_path, RDSERVE_MODELS=models, RDSERVE_ARTIFACT=str(fitted)
    )
    assert argv is None and "nothing to do" in out
    # The compose default artifact path is where the fit service's data volume is mounted.
    assert env_of(compose["services"]["fit"])["RDSERVE_ARTIFACT"].startswith("/data/")


# ---- the compose topology as plain processes -------------------------------------------------


def service_argv(service: dict, redis_url: str) -> list[str]:
    """A service's rdserve arguments, with the Redis URL and bind address made local."""
    argv = list(service["command"])
    i = argv.index("--redis-url") + 1
    argv[i] = redis_url
    if "--host" in argv:
        argv[argv.index("--host") + 1] = "127.0.0.1"
    return argv


def service_env(compose: dict, name: str, tmp: Path, **overrides: str) -> dict[str, str]:
    env = {**image_env(), **env_of(compose["services"][name])}
    env = {k: containerize(v, tmp) for k, v in env.items() if k != "PATH"}
    return {**env, "RDSERVE_DEVICE": "cpu", **overrides}


def localize(url: str, port: int) -> str:
    u = urlsplit(url)
    return urlunsplit(u._replace(netloc=f"127.0.0.1:{port}"))


def run_healthcheck(compose: dict, name: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    cmd = compose["services"][name]["healthcheck"]["test"]
    assert cmd[0] == "CMD"
    script = image_scripts()[cmd[1]]
    return subprocess.run(
        [sys.executable, str(script), *cmd[2:]],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=15,
    )


def wait_redis(r: redis.Redis, proc: Proc, timeout: float = 10) -> None:
    """Until the server answers a PING (AuthenticationError when it refuses this client)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            r.ping()
            return
        except redis.AuthenticationError:  # a ConnectionError too: it answered
            raise
        except redis.ConnectionError:
            assert proc.alive() and time.monotonic() < deadline, proc.output()
            time.sleep(0.1)


def test_compose_topology_runs_as_processes(compose, tiny_artifact, tmp_path):
    """redis + api + 2 workers with compose's commands and environment; requests through them."""
    s = compose["services"]
    secrets = tmp_path / "run" / "secrets"
    secrets.mkdir(parents=True)
    for name in compose["secrets"]:  # what `docker compose` mounts from ./secrets/
        (secrets / name).write_text(f"{name}-{uuid.uuid4().hex}\n")
    prefix = f"rdserve-deploy-{uuid.uuid4().hex[:8]}"
    redis_procs, urls = {}, {}
    for name in REDIS_SERVICES:  # each with its compose command and environment
        svc, rport = s[name], free_port()
        sources = mounts(svc)
        argv = [str(REPO / sources[a]) if a in sources else a for a in svc["command"]]
        argv[argv.index("--maxmemory") + 1] = "64mb"
        renv = {k: containerize(v, tmp_path) for k, v in env_of(svc).items()}
        redis_procs[name] = Proc(
            [
                *argv,
                *("--port", str(rport), "--bind", "127.0.0.1", "--dir", str(tmp_path)),
                *("--save", "", "--appendonly", "no", "--daemonize", "no"),
            ],
            {**renv, "RDSERVE_REDIS_PREFIX": prefix},
            tmp_path / f"{name}.log",
        )
        urls[name] = f"redis://127.0.0.1:{rport}/0"
    redis_url = urls["redis"]
    api_password = (secrets / "redis_api_password").read_text().strip()
    procs = list(redis_procs.values())
    try:
        for name, policy in (("redis", "noeviction"), ("redis-cache", "allkeys-lru")):
            with pytest.raises(redis.AuthenticationError):  # the default user is off
                wait_redis(redis.Redis.from_url(urls[name]), redis_procs[name])
            r = redis.Redis.from_url(urls[name], username="rdserve-api", password=api_password)
            wait_redis(r, redis_procs[name])
            # The settings of the config files are live (read as the test's own INFO).
            assert r.info("memory")["maxmemory_policy"] == policy, name
            assert r.info("persistence")["aof_enabled"] == 0
            r.close()

        common = {"RDSERVE_ARTIFACT": str(tiny_artifact), "RDSERVE_REDIS_PREFIX": prefix}
        api_port = free_port()
        cache_url = urls[urlsplit(env_of(s["api"])["RDSERVE_CACHE_REDIS_URL"]).hostname]
        api_env = service_env(
            compose,
            "api",
            tmp_path,
            RDSERVE_PORT=str(api_port),
            RDSERVE_CACHE_REDIS_URL=cache_url,
            **common,
        )
        api = rdserve(*service_argv(s["api"], redis_url), env=api_env, log=tmp_path / "api.log")
        procs.append(api)
        worker_envs = []
        for i in range(2):
            port = free_port()
            wenv = service_env(
                compose,
                "worker",
                tmp_path,
                RDSERVE_METRICS_PORT=str(port),
                RDSERVE_HEALTH_URL=localize(env_of(s["worker"])["RDSERVE_HEALTH_URL"], port),
                **common,
            )
            worker_envs.append(wenv)
            procs.append(
                rdserve(*service_argv(s["worker"], redis_url), env=wenv, log=tmp_path / f"w{i}.log")
            )
        base = f"http://127.0.0.1:{api_port}"
        wait_http(f"{base}/health/live", api)
        deadline = time.monotonic() + 120
        while True:
            ready = httpx.get(f"{base}/health/ready", timeout=5)
            if ready.status_code == 200 and ready.json()["workers"] == 2:
                break
            for p in procs:
                assert p.alive(), p.output()[-3000:]
            assert time.monotonic() < deadline, (ready.text, [p.output()[-2000:] for p in procs])
            time.sleep(0.3)
        assert ready.json()["mode"] == "distributed"

        body = {"input": SEQS, "dimensions": 64}
        first = httpx.post(f"{base}/v1/embeddings", json=body, timeout=60)
        assert first.status_code == 200, first.text
        assert {d["cache"] for d in first.json()["data"]} == {"miss"}
        again = httpx.post(f"{base}/v1/embeddings", json={**body, "dimensions": 16}, timeout=60)
        assert again.status_code == 200, again.text
        assert [d["cache"] for d in again.json()["data"]] == ["full_hit"] * len(SEQS)
        bad = httpx.post(f"{base}/v1/embeddings", json={"input": ["MKJ"]}, timeout=10)
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "input[0]"

        # The containers' health checks pass against the processes.
        for name, env in [("api", api_env), *(("worker", e) for e in worker_envs)]:
            hc = run_healthcheck(compose, name, env)
            assert hc.returncode == 0, (name, hc.stderr)
        # What Prometheus scrapes (API + workers) covers every dashboard query.
        exposed = sample_names(httpx.get(f"{base}/metrics", timeout=5).text)
        for env in worker_envs:
            port = env["RDSERVE_METRICS_PORT"]
            text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
            exposed |= sample_names(text)
        used = set().union(
            *(promql_metric_names(e) for e in dashboard_exprs(json.loads(DASHBOARD.read_text())))
        )
        assert used - exposed == set(), sorted(used - exposed)
    finally:
        for p in reversed(procs):  # the private Redis servers keep nothing
            p.stop()


def test_image_healthcheck_probes_the_role_the_container_runs(tmp_path, monkeypatch):
    """Without RDSERVE_HEALTH_URL the default HEALTHCHECK finds the worker's metrics port when
    the container's main process is `rdserve worker`, and the API's port otherwise."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("healthcheck", DOCKER / "healthcheck.py")
    assert spec is not None and spec.loader is not None
    hc = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hc)
    worker, api = tmp_path / "worker", tmp_path / "api"
    argv = {
        worker: ["/opt/venv/bin/python", "/opt/venv/bin/rdserve", "worker", "--redis-url", "x"],
        api: ["/opt/venv/bin/python", "/opt/venv/bin/rdserve", "serve", "--host", "0.0.0.0"],
    }
    for path, args in argv.items():  # /proc/1/cmdline: NUL-terminated arguments
        path.write_bytes(b"".join(a.encode() + b"\0" for a in args))
    for var in ("RDSERVE_HEALTH_URL", "RDSERVE_PORT", "RDSERVE_METRICS_PORT"):
        monkeypatch.delenv(var, raising=False)
    assert hc.health_url(["hc"], worker) == "http://127.0.0.1:9100/health/live"
    assert hc.health_url(["hc"], api) == "http://127.0.0.1:8000/health/live"
    assert hc.health_url(["hc"], tmp_path / "absent") == "http://127.0.0.1:8000/health/live"
    monkeypatch.setenv("RDSERVE_METRICS_PORT", "9200")
    assert hc.health_url(["hc"], worker) == "http://127.0.0.1:9200/health/live"
    monkeypatch.setenv("RDSERVE_HEALTH_URL", "http://x/health/live")
    assert hc.health_url(["hc"], worker) == "http://x/health/live"
