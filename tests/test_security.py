"""Security: API keys on every route but health, compared in constant time; no keys or sequences
in logs; Redis keys under the configured prefix; nothing read with pickle."""

from __future__ import annotations

import ast
import hashlib
import hmac
import random
import secrets
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from pydantic import SecretStr
from starlette.responses import PlainTextResponse

from app.http import middleware
from app.http.middleware import Gate
from app.http.routing import route_table
from models.artifact import ArtifactError, load_artifact
from models.families.unirep import UniRepModel
from models.reference import read_reference_step
from tests.helpers import random_protein, wait_ready
from tests.procs import Proc, free_port, rdserve, wait_http

REPO = Path(__file__).resolve().parents[1]
KEYS = ["k-" + secrets.token_urlsafe(8), "key-" + secrets.token_urlsafe(40)]  # unequal lengths
ERROR_FIELDS = {"message", "type", "param", "code"}


def assert_401(r: httpx.Response, what: str) -> None:
    assert r.status_code == 401, (what, r.status_code, r.text)
    assert r.headers["www-authenticate"] == 'Bearer realm="rdserve"', what
    if r.request.method == "HEAD":
        return  # no body by definition
    assert r.json() == {
        "error": {
            "message": "missing or invalid API key (use 'Authorization: Bearer KEY')",
            "type": "authentication_error",
            "param": None,
            "code": "invalid_api_key",
        }
    }, what


# ---- every route but /health/* needs a key ----------------------------------------------------


def submit_job(c, key: str) -> str:
    r = c.post("/v1/jobs", json={"input": ["MKV"]}, headers={"authorization": f"Bearer {key}"})
    assert r.status_code == 202, r.text
    return r.json()["id"]


def wait_job(c, job_id: str, key: str) -> str:
    """The job's id once it has ended (its result route then answers 200)."""
    for _ in range(300):
        r = c.get(f"/v1/jobs/{job_id}", headers={"authorization": f"Bearer {key}"})
        if r.json()["status"] == "succeeded":
            return job_id
        time.sleep(0.05)
    raise AssertionError(r.text)


def test_every_route_but_health_requires_a_key(make_app):
    """Enumerates the real app's routes (docs and schema included), each with every method."""
    c, _ = make_app(api_keys=SecretStr(",".join(KEYS)))
    bodies = {
        ("POST", "/v1/embeddings"): {"input": "MKV"},
        ("POST", "/v1/jobs"): {"input": ["MKV"]},
    }
    with c:
        wait_ready(c, 60)
        # Path parameters name a job of the key that calls (another key's job is a 404).
        job_of = {key: wait_job(c, submit_job(c, key), key) for key in KEYS}
        seen: set[tuple[str, str]] = set()
        for route in route_table(c.app.router.routes):
            for method in sorted(route.methods):
                path = route.path
                seen.add((method, path))
                body = bodies.get((method, path))

                def call(headers: dict, m: str = method, p: str = path, b: object = body):
                    key = headers.get("authorization", "").removeprefix("Bearer ")
                    job = job_of.get(key, "job-20260101T000000000-0000000000")
                    if m == "DELETE" and key in job_of:  # deletes the (ended) job: a new one
                        job = wait_job(c, submit_job(c, key), key)
                    return c.request(m, p.replace("{job_id}", job), json=b, headers=headers)

                if path.startswith(("/health/", "/v1/health/")) or path in ("/info", "/v1/info"):
                    r = call({})
                    assert r.status_code == 200, (method, path, r.text)
                    continue
                assert_401(call({}), f"{method} {path} without a key")
                for bad in (f"Bearer {KEYS[0]}x", f"Bearer {KEYS[1][:-1]}", f"Basic {KEYS[0]}"):
                    assert_401(call({"authorization": bad}), f"{method} {path} with {bad!r}")
                for key in KEYS:
                    r = call({"authorization": f"Bearer {key}"})
                    assert r.status_code < 400, (method, path, r.status_code, r.text)
        # Unknown paths are refused before routing too: a 404 would tell a caller what exists.
        assert_401(c.get("/v2/anything"), "an unknown path")
    assert seen >= {
        ("POST", "/v1/embeddings"),
        ("GET", "/v1/models"),
        ("GET", "/metrics"),
        ("GET", "/health/live"),
        ("GET", "/health/ready"),
        ("GET", "/openapi.json"),
        ("GET", "/docs"),
        ("POST", "/v1/jobs"),
        ("GET", "/v1/jobs/{job_id}/result"),
        ("DELETE", "/v1/jobs/{job_id}"),
    }, seen


# ---- constant-time comparison -----------------------------------------------------------------


async def _ok_app(scope: dict, receive: object, send: object) -> None:
    await PlainTextResponse("ok")(scope, receive, send)  # type: ignore[arg-type]


def test_key_comparison_is_constant_time_and_exact(monkeypatch):
    """The gate keeps only sha256 digests of the keys; every check compares the token's digest
    with each key's (32 vs 32 bytes, no early exit), so its time depends on neither the token's
    length, the key's length, nor how much of a key the token got right."""
    calls: list[tuple[int, int]] = []
    real = hmac.compare_digest

    def recording(a: bytes, b: bytes) -> bool:
        calls.append((len(a), len(b)))
        return real(a, b)

    monkeypatch.setattr(middleware.hmac, "compare_digest", recording)
    gate = Gate(_ok_app, api_keys=KEYS, max_body_bytes=1024)
    held = repr(vars(gate)).encode()
    assert all(k.encode() not in held for k in KEYS)  # no raw key in memory to leak
    assert gate.key_digests == [hashlib.sha256(k.encode()).digest() for k in KEYS]
    client = TestClient(gate)
    short, long = KEYS
    cases = {
        f"Bearer {short}": 200,
        f"Bearer {long}": 200,
        f"bearer {long}": 200,  # the scheme is case-insensitive (RFC 9110)
        f"Bearer  {short} ": 200,  # surrounding whitespace is not part of the token
        f"Bearer {short[:-1]}": 401,  # a prefix of a key
        f"Bearer {short[:1]}": 401,
        f"Bearer {short}x": 401,  # a key plus more
        f"Bearer {short}{long}": 401,
        f"Bearer {long.upper()}": 401,
        f"Bearer {'x' * 10_000}": 401,
        "Bearer ": 401,
        "Bearer": 401,
        short: 401,  # no scheme
        f"Basic {short}": 401,
    }
    for header, want in cases.items():
        calls.clear()
        r = client.get("/x", headers={"authorization": header})
        assert r.status_code == want, (header, r.text)
        if header.lower().startswith("bearer "):
            assert calls == [(32, 32)] * len(KEYS), (header, calls)
        else:
            assert calls == [], header  # refused on the scheme, before any key is looked at
    r = client.get("/x", headers={"authorization": b"Bearer \xff\xfe"})
    assert r.status_code == 401  # non-ASCII bytes are just a wrong key


# ---- nothing secret in logs ---------------------------------------------------------------


@pytest.fixture
def logged_api(tiny_artifact, tmp_path) -> Iterator:
    """Start `rdserve serve` at debug level with one random key; yields (base, proc) makers."""
    procs: list[Proc] = []

    def start(key: str, **env: str) -> tuple[str, Proc]:
        port = free_port()
        full = {
            "RDSERVE_ARTIFACT": str(tiny_artifact),
            "RDSERVE_DEVICE": "cpu",
            "RDSERVE_PORT": str(port),
            "RDSERVE_API_KEYS": key,
            "RDSERVE_LOG_LEVEL": "debug",
            **env,
        }
        proc = rdserve("serve", env=full, log=tmp_path / f"api-{len(procs)}.log")
        procs.append(proc)
        base = f"http://127.0.0.1:{port}"
        wait_http(f"{base}/health/ready", proc)
        return base, proc

    try:
        yield start
    finally:
        for p in procs:
            p.stop()


def _exercise(base: str, key: str, wrong: str, seqs: list[str]) -> None:
    """Valid requests (JSON and binary), an invalid sequence, a wrong and a missing key."""
    ok = {"authorization": f"Bearer {key}"}
    valid, binary, invalid, unauthorised = seqs[:2], seqs[2], seqs[3], seqs[4]
    r = httpx.post(f"{base}/v1/embeddings", json={"input": valid}, headers=ok, timeout=60)
    assert r.status_code == 200, r.text
    r = httpx.post(
        f"{base}/v1/embeddings",
        json={"input": [binary.lower()], "pooling": "per_residue"},
        headers={**ok, "accept": "application/x-npy"},
        timeout=60,
    )
    assert r.status_code == 200, r.text
    bad = invalid[:20] + "J" + invalid[20:]
    r = httpx.post(f"{base}/v1/embeddings", json={"input": ["MKV", bad]}, headers=ok, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["param"] == "input[1]", r.text
    for headers in ({"authorization": f"Bearer {wrong}"}, {}):
        r = httpx.post(f"{base}/v1/embeddings", json={"input": unauthorised}, headers=headers)
        assert r.status_code == 401
    assert httpx.get(f"{base}/v1/models", headers=ok).status_code == 200


def _windows(seq: str, n: int = 12) -> set[str]:
    """Every n-residue piece of seq, as sent and as the service folds it."""
    return {seq[i : i + n] for i in range(len(seq) - n + 1)} | {
        seq[i : i + n].lower() for i in range(len(seq) - n + 1)
    }


def test_keys_and_sequences_never_reach_the_logs(logged_api):
    rng = random.Random(secrets.randbits(32))
    seqs = [random_protein(rng, 40, 60) for _ in range(5)]
    key, wrong = secrets.token_urlsafe(24), secrets.token_urlsafe(24)
    base, proc = logged_api(key)
    _exercise(base, key, wrong, seqs)
    proc.stop()
    out = proc.output()
    # The log is there, with a line per request: its silence is not vacuous.
    assert out.count('"msg":"request"') >= 6, out[-3000:]
    assert '"status":401' in out and '"status":400' in out
    for secret in (key, wrong, key[:12], wrong[:12]):
        assert secret not in out, f"key material in the log: {secret!r}"
    leaked = [w for s in seqs for w in _windows(s) if w in out]
    assert not leaked, f"sequence pieces in the log: {leaked[:3]}"


def test_sequences_are_logged_only_when_opted_in(logged_api):
    """RDSERVE_LOG_SEQUENCES=true is the documented opt-in; keys stay out regardless."""
    rng = random.Random(secrets.randbits(32))
    seqs = [random_protein(rng, 40, 60) for _ in range(5)]
    key, wrong = secrets.token_urlsafe(24), secrets.token_urlsafe(24)
    base, proc = logged_api(key, RDSERVE_LOG_SEQUENCES="true")
    _exercise(base, key, wrong, seqs)
    proc.stop()
    out = proc.output()
    assert '"level":"debug"' in out
    assert all(s in out for s in seqs[:2]), out[-3000:]  # the valid requests' sequences
    for secret in (key, wrong):
        assert secret not in out


# ---- Redis keys under the configured prefix ---------------------------------------------------


def test_every_redis_key_is_under_the_configured_prefix(redis_server, tiny_artifact, tmp_path):
    """A redis-server of this test's own: every key in it is ours to check."""
    prefix = "some-custom-prefix"
    env = {
        "RDSERVE_REDIS_URL": redis_server.url,
        "RDSERVE_REDIS_PREFIX": prefix,
        "RDSERVE_ARTIFACT": str(tiny_artifact),
        "RDSERVE_DEVICE": "cpu",
        "RDSERVE_METRICS_PORT": "0",
    }
    port = free_port()
    api = rdserve("serve", "--port", str(port), env=env, log=tmp_path / "api.log")
    worker = rdserve("worker", "--worker-id", "w1", env=env, log=tmp_path / "w1.log")
    base = f"http://127.0.0.1:{port}"
    rng = random.Random(3)
    try:
        wait_http(f"{base}/health/ready", api)
        for pooling in ("mean", "per_residue"):
            body = {"input": [random_protein(rng, 20, 40) for _ in range(3)], "pooling": pooling}
            r = httpx.post(f"{base}/v1/embeddings", json=body, timeout=60)
            assert r.status_code == 200, r.text
        keys = sorted(k.decode() for k in redis_server.client().keys("*"))
    finally:
        worker.stop()
        api.stop()
    outside = [k for k in keys if not k.startswith(f"{prefix}:")]
    assert not outside, outside
    # Tasks stream, worker heartbeat and cache entries all exist: the check covered each kind
    # (queue keys carry the artifact's hash tag after the prefix: "<prefix>:{sha12}:tasks").
    kinds = {next(p for p in k.split(":")[1:] if not p.startswith("{")) for k in keys}
    assert {"tasks", "worker", "workers", "emb"} <= kinds, keys


# ---- no pickle ---------------------------------------------------------------------------------


class Booby:
    """Unpickling this creates `path`: proof that something was unpickled."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple:
        return (open, (str(self.path), "w"))


PICKLE_MODULES = {"pickle", "_pickle", "cPickle", "dill", "cloudpickle", "joblib", "shelve"}
PICKLE_MODULES |= {"marshal", "torch.serialization"}


def _calls(tree: ast.AST) -> Iterator[tuple[str, ast.Call]]:
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            yield ast.unparse(node.func), node


def test_no_source_reads_pickles():
    """app/ and models/ import no pickle module, never call torch.load, pass allow_pickle=False
    to every np.load and use_safetensors=True to every model from_pretrained (bandit checks
    pickle and torch.load too, in `make lint`)."""
    sources = sorted((REPO / "app").rglob("*.py")) + sorted((REPO / "models").rglob("*.py"))
    np_loads = hub_loads = 0
    for f in sources:
        tree = ast.parse(f.read_text(), str(f))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                names = {node.module or ""} | {f"{node.module}.{a.name}" for a in node.names}
            else:
                continue
            assert not names & PICKLE_MODULES, f"{f}:{node.lineno} imports {names}"
        for func, call in _calls(tree):
            where = f"{f.relative_to(REPO)}:{call.lineno}"
            assert not func.endswith(("torch.load", "serialization.load")), f"{where}: unpickles"
            if func in ("np.load", "numpy.load"):
                np_loads += 1
                kw = {k.arg: ast.unparse(k.value) for k in call.keywords}
                assert kw.get("allow_pickle") == "False", (
                    f"{where}: np.load without allow_pickle=False"
                )
            for k in call.keywords:
                if k.arg == "allow_pickle":
                    assert ast.unparse(k.value) == "False", f"{where}: allow_pickle={k.value}"
            owner = func.removesuffix(".from_pretrained")
            if owner != func and not owner.endswith(("Tokenizer", "Config")):  # model weights
                hub_loads += 1
                kw = {k.arg: ast.unparse(k.value) for k in call.keywords}
                assert kw.get("use_safetensors") == "True", f"{where}: may load a pickled .bin"
    # The scan saw the real loaders (reference scalers, UniRep weights, ESM-2 weights).
    assert np_loads >= 3 and hub_loads >= 1


def test_loaders_refuse_pickles_without_running_them(tmp_path):
    """An artifact, a reference scaler and UniRep weights that hold a pickle are refused, and
    the pickle's payload never runs."""
    marker = tmp_path / "unpickled"
    import pickle  # only to build the hostile files

    art = tmp_path / "evil.safetensors"
    art.write_bytes(pickle.dumps(Booby(marker)))
    with pytest.raises(ArtifactError, match="not a valid safetensors file"):
        load_artifact(art)
    npz = tmp_path / "sklearn-scaler-a-b-pcr-x-100.npz"
    np.savez(npz, regressor__coef_=np.array([Booby(marker)], dtype=object))
    with pytest.raises(ArtifactError, match="without pickle"):
        read_reference_step(npz, 2, 4, "pcr")
    weights = tmp_path / "model_weights.npz"
    np.savez(weights, embedding=np.array([Booby(marker)], dtype=object))
    with pytest.raises(ValueError, match="allow_pickle"):
        UniRepModel.from_npz(weights)
    assert not marker.exists()
    # The hostile files really were pickles: loading them the unsafe way runs the payload.
    pickle.loads(art.read_bytes())
    assert marker.exists()
