"""Bad input: schemathesis against the service's own OpenAPI schema (all routes, API keys on),
and bodies built to hurt a JSON parser — too long, too deep, too many values, junk — over real
HTTP, with a real `rdserve serve` process where memory is measured."""

from __future__ import annotations

import http.client
import json
import random
import re
import secrets
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import uvicorn
from hypothesis import strategies as st
from pydantic import SecretStr

from tests.helpers import wait_ready
from tests.procs import Proc, free_port, rdserve, wait_http

KEY = secrets.token_urlsafe(24)
AUTH = {"Authorization": f"Bearer {KEY}"}
ST = Path(sys.executable).parent / "schemathesis"
MIB = 2**20
DEFAULT_LIMIT = 16 * MIB  # Settings.max_body_bytes


# ---- schemathesis -----------------------------------------------------------------------------


@pytest.fixture
def keyed_server(make_app) -> Iterator[tuple[str, dict]]:
    """The app from make_app with API keys on, served over real HTTP by uvicorn in a thread."""
    c, _ = make_app(api_keys=SecretStr(KEY))
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(c.app, host="127.0.0.1", port=port, log_level="warning", lifespan="on")
    )
    thread = threading.Thread(target=server.run, name="fuzz-uvicorn", daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while not server.started and time.monotonic() < deadline:
            time.sleep(0.05)
        with httpx.Client(base_url=base) as client:
            wait_ready(client)
        yield base, c.app.openapi()
    finally:
        server.should_exit = True
        thread.join(30)


# The "schema-valid request accepted" check is left out on purpose: the service enforces rules that
# JSON Schema cannot state (ids as many as inputs and unique, dimensions up to the artifact's
# largest, the residue and sequence limits), so a schema-valid body may rightly get a 4xx.
# "use_after_free" too: DELETE of a queued or running job cancels it, and the job stays readable
# as cancelled (the bulk-job contract, like OpenAI's batches); an ended job is deleted (404).
EXCLUDED_CHECKS = "positive_data_acceptance,use_after_free"


@pytest.mark.parametrize("accept", ["application/json", "application/x-npy"])
def test_schemathesis_finds_no_failure_on_any_route(keyed_server, tmp_path, accept):
    """Every phase (examples, coverage, fuzzing) and every check but one, against every operation:
    no 5xx, every status, content type, header and body as documented, schema-invalid requests
    rejected, unlisted methods answered 405, and auth enforced (requests without the key or with
    a wrong one are refused). Deterministic generation, so CI runs are reproducible."""
    base, schema = keyed_server
    argv = [str(ST), "run", f"{base}/openapi.json", "--header", f"Authorization: Bearer {KEY}"]
    argv += ["--header", f"Accept: {accept}", "--checks", "all"]
    argv += ["--exclude-checks", EXCLUDED_CHECKS, "--continue-on-failure"]
    argv += ["--max-examples", "100", "--generation-deterministic", "--workers", "1"]
    argv += ["--request-timeout", "30", "--no-color"]
    argv += ["--report", "json", "--report-json-path", str(tmp_path / "report.json")]
    r = subprocess.run(argv, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out
    report = json.loads((tmp_path / "report.json").read_text())
    n_ops = sum(len(ops) for ops in schema["paths"].values())
    assert report["operations"] == {
        "total": n_ops,
        "selected": n_ops,
        "tested": n_ops,
        "errored": 0,
        "skipped": 0,
        "skip_reasons": [],
    }, out
    assert report["failures"] == [] and report["errors"] == [], out
    assert report["phases"]["coverage"]["status"] == "success", out
    assert report["phases"]["fuzzing"]["status"] == "success", out
    # The documented sequence alphabet lets generated requests reach the embedding path itself
    # (without it every generated body was a 400), and the coverage phase exercised the probes.
    rates = report["valid_rates"]["POST /v1/embeddings"]
    assert rates["fuzzing"]["accepted"] >= 10 and rates["coverage"]["accepted"] >= 1, rates
    assert report["test_cases"]["generated"] >= 200, report["test_cases"]


#: Strings a JSON body can carry that are not Unicode text: lone surrogates (schemathesis leaves
#: them out of its own string strategies, as they cannot be UTF-8 encoded).
SURROGATE_TEXT = st.text(
    st.characters(categories=["Cs", "Lu", "Ll", "Nd", "Po", "Cc"]), min_size=1, max_size=8
).filter(lambda t: any(0xD800 <= ord(c) <= 0xDFFF for c in t))


def _with_surrogates(body: object) -> st.SearchStrategy:
    """The generated body with surrogate text in one string field or key. For ``ids`` the
    sequences are made valid, so that the ids get as far as the response (and the .npz)."""
    if not isinstance(body, dict) or "input" not in body:
        return st.just(body)
    raw = body["input"]
    n = len(raw) if isinstance(raw, list) and raw else 1

    def place(field: str, text: str, item: int) -> dict:
        out = dict(body)
        if field == "ids":
            ids = [f"id{i}" for i in range(n)]
            ids[item % n] = text
            out["input"], out["ids"] = ["MKTAYIAKQRQ"] * n, ids
        elif field == "input":
            seqs = list(raw) if isinstance(raw, list) and raw else ["MKV"]
            seqs[item % len(seqs)] = text
            out["input"] = seqs
        elif field in ("model", "user"):
            out[field] = text
        else:  # an unknown field named by the surrogate text
            out[text] = 1
        return out

    fields = st.sampled_from(["ids", "ids", "ids", "input", "model", "user", "key"])
    return st.builds(place, fields, SURROGATE_TEXT, st.integers(0, 50))


def test_schemathesis_with_surrogate_strings_finds_no_5xx(keyed_server):
    """Schemathesis' own body generation for POST /v1/embeddings, with a string strategy that
    includes lone surrogates in every string field (valid JSON escapes, but no Unicode text:
    orjson and the .npz writer refuse them): always a 4xx in the one error shape, never a 5xx."""
    import schemathesis
    from hypothesis import HealthCheck, given, settings

    base, _ = keyed_server
    schema = schemathesis.openapi.from_url(f"{base}/openapi.json", headers=AUTH)

    @schema.hook
    def flatmap_body(context, body):
        return _with_surrogates(body)

    op = schema["/v1/embeddings"]["POST"]
    seen = {"sent": 0}

    @given(case=op.as_strategy())
    @settings(
        max_examples=60,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    def check(case):
        for accept in ("application/json", "application/x-npy"):
            headers = {**AUTH, "Accept": accept, "Content-Type": "application/json"}
            raw = json.dumps(case.body)  # ensure_ascii: surrogates travel as \ud800 escapes
            r = httpx.post(f"{base}/v1/embeddings", content=raw, headers=headers, timeout=30)
            seen["sent"] += 1
            assert r.status_code < 500, (raw, r.status_code, r.text)
            if r.status_code >= 400:
                assert set(r.json()["error"]) == {"message", "type", "param", "code"}, r.text

    check()
    assert seen["sent"] >= 100  # two Accept headers per case


def test_openapi_documents_the_gate_on_every_operation(make_app):
    """What the fuzz test holds the service to: every operation documents the error shape for
    500, the keyed ones 401 with Bearer security, POST 413; every response X-Request-ID."""
    c, _ = make_app(api_keys=SecretStr(KEY))
    schema = c.app.openapi()
    assert schema["components"]["securitySchemes"]["apiKey"] == {
        "type": "http",
        "scheme": "bearer",
        "description": "One of the configured API keys: `Authorization: Bearer KEY`.",
    }
    error_ref = {"$ref": "#/components/schemas/ErrorResponse"}
    for path, ops in schema["paths"].items():
        for method, op in ops.items():
            codes = set(op["responses"])
            keyed = not path.startswith(("/health", "/info"))
            assert op.get("security") == ([{"apiKey": []}] if keyed else None), (method, path)
            assert "500" in codes and ("401" in codes) == keyed, (method, path)
            assert ("413" in codes) == (method == "post"), (method, path)
            for code, resp in op["responses"].items():
                assert resp["headers"]["X-Request-ID"]["required"] is True
                if code.startswith(("4", "5")) and not (path == "/health/ready" and code == "503"):
                    assert resp["content"]["application/json"]["schema"] == error_ref, (path, code)
    assert "/v1/embeddings" in schema["paths"] and "/metrics" in schema["paths"]


# ---- bodies that hurt parsers, against a real `rdserve serve` ----------------------------------


@pytest.fixture(scope="module")
def api(tiny_artifact, tmp_path_factory) -> Iterator[tuple[str, Proc]]:
    """`rdserve serve` with API keys and the default body limit."""
    port = free_port()
    env = {
        "RDSERVE_ARTIFACT": str(tiny_artifact),
        "RDSERVE_DEVICE": "cpu",
        "RDSERVE_API_KEYS": KEY,
        "RDSERVE_PORT": str(port),
    }
    proc = rdserve("serve", env=env, log=tmp_path_factory.mktemp("fuzz") / "api.log")
    base = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{base}/health/ready", proc)
        yield base, proc
    finally:
        proc.stop()


def post_raw(base: str, body: bytes | Iterator[bytes], **headers: str) -> httpx.Response:
    headers = {**AUTH, "content-type": "application/json", **headers}
    return httpx.post(f"{base}/v1/embeddings", content=body, headers=headers, timeout=60)


def assert_error(r: httpx.Response, status: int, code: str) -> dict:
    """The response is `status` in the one error shape with `code`."""
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["code"] == code, err
    return err


def peak_rss_mib(proc: Proc) -> float:
    """The process's peak resident memory so far (VmHWM), in MiB."""
    status = Path(f"/proc/{proc.p.pid}/status").read_text()
    return int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1)) / 1024


def test_declared_length_over_the_limit_is_refused_without_reading_the_body(api):
    """Content-Length alone decides: the server answers 413 while the body has not been sent
    (a server that read first would wait for 100 MB that never come)."""
    base, _ = api
    host, port = base.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        conn.putrequest("POST", "/v1/embeddings")
        conn.putheader("Authorization", f"Bearer {KEY}")
        conn.putheader("Content-Type", "application/json")
        conn.putheader("Content-Length", str(100 * MIB))
        conn.endheaders()  # and not one byte of the body
        r = conn.getresponse()
        assert r.status == 413
        assert json.loads(r.read())["error"]["code"] == "body_too_large"
    finally:
        conn.close()
    # A body streamed without a length is cut off as soon as it passes the limit.
    chunks = (b"x" * MIB for _ in range(20))
    assert_error(post_raw(base, chunks), 413, "body_too_large")


def test_deep_nesting_is_a_clean_4xx(api):
    """100,000 nested arrays (200 kB, far under the byte limit) are refused before parsing;
    nesting past the JSON parser's recursion limit is invalid JSON, not a RecursionError 500."""
    base, proc = api
    deep = b"[" * 100_000 + b"]" * 100_000
    assert len(deep) < DEFAULT_LIMIT
    err = assert_error(post_raw(base, deep), 413, "body_too_complex")
    assert "JSON arrays, objects or items" in err["message"]
    nested = b'{"input": ' + b"[" * 5_000 + b"]" * 5_000 + b"}"  # under the value count bound
    err = assert_error(post_raw(base, nested), 400, "json_invalid")
    assert err["message"] == "request body is not valid JSON: nested too deeply"
    assert err["param"] == "body"
    shallow = b'{"input": ' + b"[" * 500 + b"]" * 500 + b"}"  # parses; fails validation
    assert_error(post_raw(base, shallow), 400, "string_type")
    assert httpx.get(f"{base}/health/live", timeout=5).status_code == 200
    out = proc.output()
    assert "RecursionError" not in out and "Traceback" not in out, out[-3000:]


def test_junk_just_under_the_limit_is_refused_cleanly_and_cheaply(api):
    """Bodies one byte under the 16 MiB limit: random bytes, random bytes the value bound lets
    through (so the parser sees them), text junk, a number too long for int, and valid JSON of
    millions of tiny values — each a 4xx in the error shape, and none parsed into Python objects
    (that would cost 250-450 MB: the server's peak memory must not move by that much)."""
    base, proc = api
    n = DEFAULT_LIMIT - 1
    rng = random.Random(7)
    junk = rng.randbytes(n)
    assert_error(post_raw(base, junk), 413, "body_too_complex")
    without_separators = junk.translate(None, b",[{").ljust(n, b"\xff")
    err = assert_error(post_raw(base, without_separators), 400, "json_invalid")
    assert err["param"] == "body" and err["message"].startswith("request body is not valid JSON")
    assert_error(post_raw(base, b"x" * n), 400, "json_invalid")
    long_int = b'{"input": "MKV", "dimensions": ' + b"7" * 50_000 + b"}"
    err = assert_error(post_raw(base, long_int), 400, "json_invalid")
    assert "number too long" in err["message"]
    before = peak_rss_mib(proc)
    for unit in (b'"ab",', b"[],", b"{},"):
        values = b"[" + unit * ((n - 3) // len(unit)) + b"0]"
        assert len(values) < DEFAULT_LIMIT
        assert_error(post_raw(base, values), 413, "body_too_complex")
    growth = peak_rss_mib(proc) - before
    assert growth < 150, f"peak RSS grew by {growth:.0f} MiB"
    r = httpx.post(f"{base}/v1/embeddings", json={"input": "MKV"}, headers=AUTH, timeout=60)
    assert r.status_code == 200, r.text
    assert "Traceback" not in proc.output()
