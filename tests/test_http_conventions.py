"""What clients expect of the HTTP boundary (embedded app, real worker thread, tiny ESM-2):
400 for invalid requests, 413 for limits, /info, versioned health aliases, per-residue shapes,
Accept negotiation, strict types, safe ids, bounded and streamed outputs, bodies refused before
they are read, CORS and gzip, and the OpenAPI document."""

from __future__ import annotations

import asyncio
import base64
import gzip
import io
import json

import numpy as np
import pytest

from tests.helpers import wait_ready

SEQS = ["MKTAYIAKQRQISFVKSHFSRQ", "GSHMLEDPVDAFQ", "MVLSPADKTNVKAAWGKVGAHAGEYGAEAL"]


def post(client, headers=None, **body):
    # json.dumps escapes lone surrogates (valid JSON); httpx's encoder would refuse them.
    return client.post(
        "/v1/embeddings",
        content=json.dumps({"input": SEQS, **body}),
        headers={"content-type": "application/json", **(headers or {})},
    )


def assert_error(r, status, code, param=None):
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["code"] == code, err
    if param is not None:
        assert err["param"] == param, err
    return err


def test_info_names_the_chain_and_the_limits_clients_size_batches_by(client):
    info = client.get("/info").json()
    assert info["model_id"] == "esm2-tiny32-tiny48-tiny64" and info["family"] == "esm2"
    assert [lv["dim"] for lv in info["levels"]] == [32, 48, 64] and info["max_dimensions"] == 64
    assert info["levels"][0]["max_residues"] == 1022 and info["mode"] == "embedded"
    assert len(info["artifact_sha256"]) == 64 and info["version"]
    limits = info["limits"]
    # Neither limit bites before LangChain's batch (1,000 typical proteins) or OpenAI's (2,048).
    assert limits["max_sequences"] == 2048 and limits["max_residues"] == 2**20
    assert limits["token_budget"] == 1536 and limits["max_output_bytes"] > 0
    assert info["poolings"] == ["mean", "per_residue", "bos"]
    assert client.get("/v1/info").json() == info


def test_a_langchain_batch_of_1000_typical_proteins_is_one_request(client):
    """LangChain sends 1,000 inputs per request by default: the 1,000 UniRef90 sequences shipped
    in the package (302,952 residues) must be served, not refused with 413."""
    from models.sequences import packaged_sample, read_fasta

    seqs = [s for _, s in read_fasta(packaged_sample())]
    assert len(seqs) == 1000 and sum(map(len, seqs)) > 300_000
    r = post(client, input=seqs, dimensions=32, encoding_format="base64")
    assert r.status_code == 200, r.text[:300]
    assert len(r.json()["data"]) == 1000


def test_versioned_health_aliases(client):
    assert client.get("/v1/health/live").json() == {"status": "live"}
    ready = client.get("/v1/health/ready")
    assert ready.status_code == 200 and ready.json()["status"] == "ready"


def test_limits_are_413_and_validation_400(make_app):
    c, _ = make_app(max_sequences=2, max_residues=40)
    with c:
        assert_error(post(c), 413, "too_many_sequences", "input")
        assert_error(post(c, input=["M" * 30, "M" * 20]), 413, "too_many_residues", "input")
        assert_error(post(c, input=["MKJ"]), 400, "invalid_sequence", "input[0]")
        assert_error(post(c, input=["MK"], bogus=1), 400, "extra_forbidden", "bogus")


@pytest.mark.parametrize("value", [True, "32", 32.0])
def test_dimensions_has_a_strict_type(client, value):
    assert_error(post(client, dimensions=value), 400, "int_type", "dimensions")


def test_normalize_has_a_strict_type(client):
    assert_error(post(client, normalize=1), 400, "bool_type", "normalize")


def test_per_residue_items_carry_their_shape_also_in_base64(client):
    body = post(client, pooling="per_residue", dimensions=40, encoding_format="base64").json()
    for seq, item in zip(SEQS, body["data"], strict=True):
        assert item["shape"] == [len(seq), 40]
        flat = np.frombuffer(base64.b64decode(item["embedding"]), "<f4")
        assert flat.reshape(item["shape"]).shape == (len(seq), 40)
    pooled = post(client, dimensions=40).json()["data"]
    assert all(d["shape"] == [40] for d in pooled)
    # The CLI's spelling is accepted too.
    r = post(client, pooling="per-residue", dimensions=8)
    assert r.status_code == 200 and r.json()["pooling"] == "per_residue"


@pytest.mark.parametrize(
    ("accept", "binary"),
    [
        ("application/x-npy;q=0", False),
        ("application/x-npy; q=0.0, application/json", False),
        ("APPLICATION/X-NPY", True),
        ("application/json;q=0.5, application/x-npy", True),
        ("application/json, application/x-npy;q=0.9", False),
        ("*/*", False),
        ("application/*;q=0.1, application/x-npy;q=0.2", True),
    ],
)
def test_accept_header_is_parsed(client, accept, binary):
    r = post(client, headers={"accept": accept}, dimensions=8)
    assert r.status_code == 200
    if binary:
        assert r.headers["content-type"] == "application/x-npy"
        assert np.load(io.BytesIO(r.content)).shape == (3, 8)
    else:
        assert r.headers["content-type"] == "application/json" and len(r.json()["data"]) == 3


@pytest.mark.parametrize(
    "bad",
    ["\ud800", "a\udfffb", "../etc/passwd", "/abs", "a/../b", "..", "a\\b", "x\x00y", ""],
)
def test_ids_are_validated_never_a_5xx(client, bad):
    r = post(client, ids=["ok", bad, "fine"], pooling="per_residue")
    assert_error(r, 400, "invalid_id", "ids[1]")


def test_lone_surrogates_anywhere_are_a_400(client):
    # Valid JSON escapes that are not Unicode text: orjson (and the .npz writer) refuse them.
    for raw, status in (
        (b'{"input": ["MK\\ud800"]}', 400),
        (b'{"input": "MK", "model": "\\udc00"}', 404),
        (b'{"input": "MK", "\\ud800": 1}', 400),
        (b'{"input": "MK", "user": "\\ud800"}', 200),  # ignored, never echoed
    ):
        r = client.post("/v1/embeddings", content=raw, headers={"content-type": "application/json"})
        assert r.status_code == status, (raw, r.status_code, r.text)
        assert status == 200 or r.json()["error"]["code"]


def test_pfam_style_ids_key_npz_members(client):
    ids = ["P12345/1-22", "Q9/3-15", "sp|P69905|HBA"]
    r = post(client, ids=ids, pooling="per_residue", headers={"accept": "application/x-npy"})
    assert r.status_code == 200
    assert sorted(np.load(io.BytesIO(r.content)).files) == sorted(ids)


def test_output_size_is_bounded_before_any_work_and_binary_suggested(make_app):
    # 66 residues × 64 dims: JSON ~50 KB (12 B/value), float32 ~17 KB.
    c, service = make_app(max_output_bytes=20_000)
    with c:
        wait_ready(c)
        before = service.dispatcher.worker.state.loaded
        err = assert_error(post(c, pooling="per_residue"), 413, "output_too_large", "input")
        assert "application/x-npy" in err["message"] and "rdserve embed" in err["message"]
        assert service.dispatcher.source.outstanding() == 0 and before == [True] * 3
        r = post(c, pooling="per_residue", headers={"accept": "application/x-npy"})
        assert r.status_code == 200
        assert post(c, pooling="per_residue", dimensions=8).status_code == 200


def test_large_binary_responses_stream(client, monkeypatch):
    import app.http.encoding as enc

    small = {}
    for pooling in ("mean", "per_residue"):
        r = post(client, pooling=pooling, headers={"accept": "application/x-npy"}, ids=list("abc"))
        assert "content-length" in r.headers
        small[pooling] = r.content
    monkeypatch.setattr(enc, "STREAM_ABOVE", 16)
    for pooling in ("mean", "per_residue"):
        r = post(client, pooling=pooling, headers={"accept": "application/x-npy"}, ids=list("abc"))
        assert r.status_code == 200 and "content-length" not in r.headers  # chunked
        new, old = np.load(io.BytesIO(r.content)), np.load(io.BytesIO(small[pooling]))
        if pooling == "mean":
            np.testing.assert_array_equal(new, old)
        else:
            assert new.files == old.files
            for k in old.files:
                np.testing.assert_array_equal(new[k], old[k])


def test_gzip_when_the_client_accepts_it(client):
    r = post(client, pooling="per_residue", headers={"accept-encoding": "gzip"})
    assert r.headers.get("content-encoding") == "gzip" and len(r.json()["data"]) == 3
    raw = client.post(
        "/v1/embeddings",
        json={"input": SEQS, "pooling": "per_residue"},
        headers={"accept-encoding": "gzip", "accept": "application/x-npy"},
    )
    assert "content-encoding" not in raw.headers  # float arrays are sent as they are
    plain = post(client, pooling="per_residue", headers={"accept-encoding": "identity"})
    assert "content-encoding" not in plain.headers
    assert len(gzip.compress(plain.content)) < len(plain.content)


def test_cors_is_opt_in(make_app):
    c, _ = make_app(api_keys="k1")
    pre = {"origin": "https://lab.example", "access-control-request-method": "POST"}
    with c:
        assert c.options("/v1/embeddings", headers=pre).status_code in (401, 405)
    c, _ = make_app(api_keys="k1", cors_origins="https://lab.example")
    with c:
        r = c.options(
            "/v1/embeddings",
            headers={**pre, "access-control-request-headers": "authorization,content-type"},
        )
        assert r.status_code == 200
        assert r.headers["access-control-allow-origin"] == "https://lab.example"
        r = c.get("/info", headers={"origin": "https://lab.example"})
        assert r.headers["access-control-allow-origin"] == "https://lab.example"
        r = c.options("/v1/embeddings", headers={**pre, "origin": "https://evil.example"})
        assert "access-control-allow-origin" not in r.headers


def test_ready_details_need_the_key(make_app):
    c, _ = make_app(api_keys="k1")
    with c:
        wait_ready(c)
        anon = c.get("/health/ready").json()
        assert anon["status"] == "ready" and "levels" not in anon
        assert "model_id" not in str(anon) and "/" not in str(anon)
        keyed = c.get("/health/ready", headers={"authorization": "Bearer k1"}).json()
        assert [lv["dim"] for lv in keyed["levels"]] == [32, 48, 64]
        assert keyed["levels"][0]["model_id"].startswith("/")


def test_ready_without_a_live_worker_is_unavailable_with_the_reason(make_app):
    c, service = make_app()
    with c:
        wait_ready(c)
        service.dispatcher.worker.stop()
        service.dispatcher._thread.join(10)
        r = c.get("/health/ready")
        assert r.status_code == 503
        body = r.json()
        assert body["status"] == "unavailable" and body["reason"] == "no_worker", body


def _call(app, method, path, headers):
    """One request straight through the ASGI app, with a body that must never be read."""
    sent: list[dict] = []

    async def receive():
        raise AssertionError("the body was read")

    async def send(message):
        sent.append(message)

    scope = {
        "type": "http",
        "http_version": "1.1",
        "method": method,
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "scheme": "http",
        "server": ("testserver", 80),
        "client": ("127.0.0.1", 1),
        "headers": [(k.encode(), v.encode()) for k, v in headers.items()],
    }
    asyncio.run(app(scope, receive, send))
    start = next(m for m in sent if m["type"] == "http.response.start")
    return start["status"], dict(start["headers"])


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [
        ("POST", "/health/live", 405),
        ("PUT", "/health/ready", 405),
        ("GET", "/health/live", 400),
        ("POST", "/no/such/route", 404),
        ("POST", "/info", 405),
    ],
)
def test_bodies_are_refused_before_they_are_read(make_app, method, path, status):
    c, _ = make_app()
    big = {"content-length": str(16 * 2**20), "content-type": "application/json"}
    got, headers = _call(c.app, method, path, big)
    assert got == status and headers[b"connection"] == b"close"
    got, _ = _call(c.app, method, path, {"transfer-encoding": "chunked"})
    assert got == status


def test_openapi_documents_each_status_with_its_own_example(make_app):
    c, _ = make_app(api_keys="k1")
    with c:
        doc = c.get("/openapi.json", headers={"authorization": "Bearer k1"}).json()
    op = doc["paths"]["/v1/embeddings"]["post"]
    assert "422" not in str(doc["paths"]) and "HTTPValidationError" not in str(doc)
    examples = {
        code: resp["content"]["application/json"]["example"]["error"]["code"]
        for code, resp in op["responses"].items()
        if code != "200"
    }
    assert examples["400"] == "invalid_sequence" and examples["401"] == "invalid_api_key"
    assert examples["413"] == "too_many_residues" and examples["503"] == "no_worker"
    assert len(set(examples.values())) == len(examples)  # one example per status
    assert op["security"] == [{"apiKey": []}]
    assert doc["components"]["securitySchemes"]["apiKey"]["scheme"] == "bearer"
    body = op["requestBody"]["content"]["application/json"]
    assert set(body["examples"]) >= {"pooled", "per_residue"}
    assert "/info" in doc["paths"] and "security" not in doc["paths"]["/info"]["get"]
