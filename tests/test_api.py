"""The HTTP API in embedded mode: real FastAPI app, real worker thread, tiny ESM-2 chain."""

from __future__ import annotations

import base64
import io
import threading
import time

import numpy as np
import pytest

from tests.helpers import metric, wait_ready

SEQS = ["MKTAYIAKQRQISFVKSHFSRQ", "GSHMLEDPVDAFQ", "MVLSPADKTNVKAAWGKVGAHAGEYGAEAL"]


def embed(client, **body):
    return client.post("/v1/embeddings", json={"input": SEQS, **body})


def test_openai_shaped_response_with_provenance(client):
    r = embed(client, dimensions=40, ids=["a", "b", "c"], user="someone")
    assert r.status_code == 200
    assert r.headers["x-request-id"]
    body = r.json()
    assert body["object"] == "list" and body["model"] == "esm2-tiny32-tiny48-tiny64"
    assert body["family"] == "esm2" and body["levels"] == ["tiny32", "tiny48"]
    assert body["dimensions"] == 40 and len(body["artifact_sha256"]) == 64
    assert body["usage"] == {
        "prompt_tokens": sum(map(len, SEQS)),
        "total_tokens": sum(map(len, SEQS)),
    }
    for i, d in enumerate(body["data"]):
        assert d["object"] == "embedding" and d["index"] == i and d["id"] == "abc"[i]
        assert len(d["embedding"]) == 40
        assert d["truncated"] is False and d["cached"] is False and d["cache"] == "miss"
        assert d["residues"] == len(SEQS[i])
    # A single string is accepted; default k is the full dim; the echo header is honoured.
    r = client.post(
        "/v1/embeddings", json={"input": "mktay iak"}, headers={"x-request-id": "abc-1"}
    )
    assert r.headers["x-request-id"] == "abc-1"
    assert len(r.json()["data"][0]["embedding"]) == 64
    assert r.json()["usage"]["prompt_tokens"] == 8


def test_nested_cache_semantics(client):
    def forwards(level):
        return metric(client, "rdserve_forward_duration_seconds_count", level=level)

    def residues(level):
        return metric(client, "rdserve_residues_total", level=level)

    base = {lv: (forwards(lv), residues(lv)) for lv in ("tiny32", "tiny48", "tiny64")}
    hits0 = metric(client, "rdserve_cache_lookups_total", tier="full_hit")
    partial0 = metric(client, "rdserve_cache_lookups_total", tier="partial")

    low = embed(client, dimensions=30).json()  # runs tiny32 only
    assert [forwards(lv) - base[lv][0] for lv in ("tiny32", "tiny48", "tiny64")] == [1, 0, 0]
    high = embed(client, dimensions=64).json()  # reuses tiny32 from the cache: runs 48, 64
    assert [forwards(lv) - base[lv][0] for lv in ("tiny32", "tiny48", "tiny64")] == [1, 1, 1]
    assert [d["cache"] for d in high["data"]] == ["partial"] * 3
    assert residues("tiny48") - base["tiny48"][1] == sum(map(len, SEQS))
    assert metric(client, "rdserve_cache_lookups_total", tier="partial") - partial0 == 3
    again = embed(client, dimensions=45).json()  # lower k after higher k: full hit
    assert [d["cache"] for d in again["data"]] == ["full_hit"] * 3
    assert all(d["cached"] for d in again["data"])
    assert [forwards(lv) - base[lv][0] for lv in ("tiny32", "tiny48", "tiny64")] == [1, 1, 1]
    assert metric(client, "rdserve_cache_lookups_total", tier="full_hit") - hits0 == 3
    # Nested: every answer is a prefix of the largest one.
    for a, b, c in zip(low["data"], high["data"], again["data"], strict=True):
        np.testing.assert_allclose(a["embedding"], b["embedding"][:30], atol=1e-6)
        np.testing.assert_array_equal(c["embedding"], b["embedding"][:45])


def test_duplicates_in_one_request_are_computed_once(client):
    before = metric(client, "rdserve_residues_total", level="tiny32")
    body = client.post(
        "/v1/embeddings", json={"input": ["MKVL", "MKVL", "mkvl"], "dimensions": 8}
    ).json()
    assert metric(client, "rdserve_residues_total", level="tiny32") - before == 4
    assert body["data"][0]["embedding"] == body["data"][2]["embedding"]


def test_binary_and_base64_equal_the_json_numbers(client):
    js = np.array(
        [d["embedding"] for d in embed(client, dimensions=50).json()["data"]], dtype=np.float32
    )
    b64 = embed(client, dimensions=50, encoding_format="base64").json()["data"]
    dec = np.stack([np.frombuffer(base64.b64decode(d["embedding"]), "<f4") for d in b64])
    np.testing.assert_array_equal(dec, js)
    r = client.post(
        "/v1/embeddings",
        json={"input": SEQS, "dimensions": 50},
        headers={"accept": "application/x-npy"},
    )
    assert r.headers["content-type"] == "application/x-npy"
    assert r.headers["x-rdserve-levels"] == "tiny32,tiny48,tiny64"
    assert r.headers["x-rdserve-family"] == "esm2"  # every response says the family served
    arr = np.load(io.BytesIO(r.content))
    assert arr.shape == (3, 50) and arr.dtype == np.float32
    np.testing.assert_array_equal(arr, js)
    r = client.post(
        "/v1/embeddings",
        json={"input": SEQS, "dimensions": 50, "dtype": "float16"},
        headers={"accept": "application/x-npy"},
    )
    np.testing.assert_array_equal(np.load(io.BytesIO(r.content)), js.astype(np.float16))


def test_per_residue_json_npz_and_pooled_equality(client):
    # Ids are any strings, np.savez's own argument names included.
    ids = ["x", "file", "allow_pickle"]
    body = embed(client, dimensions=48, pooling="per_residue", ids=ids).json()
    per = [np.array(d["embedding"], dtype=np.float32) for d in body["data"]]
    assert [p.shape for p in per] == [(len(s), 48) for s in SEQS]
    r = client.post(
        "/v1/embeddings",
        headers={"accept": "application/x-npy"},
        json={"input": SEQS, "dimensions": 48, "pooling": "per_residue", "ids": ids},
    )
    assert r.headers["content-type"] == "application/x-npz"
    npz = np.load(io.BytesIO(r.content))
    assert sorted(npz.files) == sorted(ids)
    for name, p in zip(ids, per, strict=True):
        np.testing.assert_array_equal(npz[name], p)
    pooled = embed(client, dimensions=48).json()["data"]
    for p, d in zip(per, pooled, strict=True):
        np.testing.assert_allclose(p.mean(0), d["embedding"], atol=1e-5)


def test_normalize_and_bos(client):
    for d in embed(client, dimensions=20, normalize=True).json()["data"]:
        assert abs(np.linalg.norm(d["embedding"]) - 1) < 1e-5
    bos = embed(client, dimensions=20, pooling="bos").json()["data"]
    mean = embed(client, dimensions=20).json()["data"]
    assert all(len(d["embedding"]) == 20 for d in bos)
    assert bos[0]["embedding"] != mean[0]["embedding"]


def test_long_sequences(client):
    long = "M" + "ACDEFGHIKL" * 110
    r = client.post(
        "/v1/embeddings", json={"input": ["MKV", long], "long_sequence_policy": "error"}
    )
    assert r.status_code == 400 and r.json()["error"]["param"] == "input[1]"
    assert "exceeds the model context of 1022" in r.json()["error"]["message"]
    d = client.post("/v1/embeddings", json={"input": ["MKV", long]}).json()["data"]
    assert [x["truncated"] for x in d] == [False, True] and d[1]["residues"] == 1022
    d = client.post(
        "/v1/embeddings", json={"input": [long], "long_sequence_policy": "chunk"}
    ).json()
    assert d["data"][0]["chunked"] and d["data"][0]["residues"] == len(long)


@pytest.mark.parametrize(
    ("body", "status", "param", "code", "text"),
    [
        (
            {"input": ["MKV", "MKJV"]},
            400,
            "input[1]",
            "invalid_sequence",
            "invalid residue 'J' at position 3",
        ),
        ({"input": ["MKV", " "]}, 400, "input[1]", "invalid_sequence", "empty sequence"),
        ({"input": []}, 400, "input", "empty_input", "at least one sequence"),
        (
            {"input": "MKV", "dimensions": 0},
            400,
            "dimensions",
            "greater_than_equal",
            "greater than or equal to 1",
        ),
        (
            {"input": "MKV", "dimensions": 65},
            400,
            "dimensions",
            "invalid_dimensions",
            "between 1 and 64, got 65",
        ),
        ({"input": ["M"] * 6}, 413, "input", "too_many_sequences", "6 sequences; the limit is 5"),
        (
            {"input": ["M" * 60, "M" * 50]},
            413,
            "input",
            "too_many_residues",
            "110 residues; the limit is 100",
        ),
        ({"input": "MKV", "bogus": 1}, 400, "bogus", "extra_forbidden", "unknown field 'bogus'"),
        ({"input": [1, 2]}, 400, "input", "string_type", "input"),
        ({"input": ["MKV", 7]}, 400, "input[1]", "string_type", "input[1]: Input should be"),
        (
            {"input": ["MKV", "MKW", "MKY"], "ids": ["a", "b", "a"]},
            400,
            "ids[2]",
            "duplicate_id",
            "ids[2] repeats ids[0] ('a')",
        ),
        ({"input": "MKV", "pooling": "max"}, 400, "pooling", "enum", "pooling"),
        (
            {"input": ["MKV"], "ids": ["a", "b"]},
            400,
            "ids",
            "ids_length_mismatch",
            "ids has 2 entries",
        ),
        (
            {"input": "MKV", "model": "gpt-4"},
            404,
            "model",
            "model_not_found",
            "'gpt-4' is not served",
        ),
    ],
)
def test_errors_have_one_shape_and_name_the_field(make_app, body, status, param, code, text):
    c, _ = make_app(max_sequences=5, max_residues=100)
    with c:
        r = c.post("/v1/embeddings", json=body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["param"].startswith(param) and err["code"] == code and text in err["message"]


def test_model_may_name_the_family_or_artifact(client):
    assert client.post("/v1/embeddings", json={"input": "MKV", "model": "esm2"}).status_code == 200
    r = client.post("/v1/embeddings", json={"input": "MKV", "model": "esm2-tiny32-tiny48-tiny64"})
    assert r.status_code == 200


def test_body_over_the_limit_is_rejected_before_parsing(make_app):
    c, _ = make_app(max_body_bytes=2048)
    with c:
        r = c.post(
            "/v1/embeddings",
            content=b'{"input": "' + b"M" * 4000 + b'"}',
            headers={"content-type": "application/json"},
        )
        assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large"
        r = c.post(
            "/v1/embeddings", content=b"{not json", headers={"content-type": "application/json"}
        )
        err = r.json()["error"]
        assert r.status_code == 400 and err["code"] == "json_invalid" and err["param"] == "body"
        assert "not valid JSON at character 1" in err["message"]


class Gate:
    """Holds the worker inside compute until released (fault injection for queue tests)."""

    def __init__(self, service):
        self.release = threading.Event()
        self.entered = threading.Event()
        inner = service.dispatcher.worker.embedder.iter_compute

        def iter_compute(*a, **kw):
            self.entered.set()
            self.release.wait(30)
            yield from inner(*a, **kw)

        service.dispatcher.worker.embedder.iter_compute = iter_compute


def test_queue_full_gives_429_with_retry_after(make_app):
    c, service = make_app(max_queue=1)
    with c:
        wait_ready(c)
        gate = Gate(service)
        results = {}
        t = threading.Thread(target=lambda: results.setdefault("first", embed(c, dimensions=8)))
        t.start()
        assert gate.entered.wait(10)
        r = embed(c, dimensions=9)
        gate.release.set()
        t.join(10)
    assert r.status_code == 429 and r.headers["retry-after"] == "1"
    assert r.json()["error"]["code"] == "queue_full"
    assert results["first"].status_code == 200


def test_request_timeout_gives_504(make_app):
    c, service = make_app(request_timeout_s=0.3)
    with c:
        wait_ready(c)
        gate = Gate(service)
        r = embed(c, dimensions=8)
        gate.release.set()
    assert r.status_code == 504 and r.json()["error"]["code"] == "timeout"


def test_no_worker_gives_503(make_app):
    c, service = make_app()
    with c:
        wait_ready(c)
        service.dispatcher.worker.stop()
        service.dispatcher._thread.join(5)
        r = embed(c, dimensions=8)
        assert r.status_code == 503 and r.json()["error"]["code"] == "no_worker"
        assert c.get("/health/ready").status_code == 503


@pytest.mark.parametrize("source", ["env", "file"])
def test_api_keys(make_app, tmp_path, source):
    if source == "env":
        from pydantic import SecretStr

        c, _ = make_app(api_keys=SecretStr("k1, k2"))
    else:
        f = tmp_path / "keys"
        f.write_text("# ops keys\nk1\nk2\n")
        c, _ = make_app(api_key_file=f)
    with c:
        assert c.get("/health/live").status_code == 200
        wait_ready(c)
        for path in ("/v1/models", "/metrics"):
            r = c.get(path)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
            assert r.headers["www-authenticate"].startswith("Bearer")
        r = c.post(
            "/v1/embeddings", json={"input": "MKV"}, headers={"authorization": "Bearer nope"}
        )
        assert r.status_code == 401
        r = c.post("/v1/embeddings", json={"input": "MKV"}, headers={"authorization": "Bearer k2"})
        assert r.status_code == 200
        assert c.get("/v1/models", headers={"authorization": "Bearer k1"}).status_code == 200


def test_configured_but_empty_keys_refuse_to_start(tmp_path):
    """Keys that were asked for but parse to nothing must not silently turn authentication off."""
    from pydantic import SecretStr, ValidationError

    from app.settings import Settings

    comments = tmp_path / "keys"
    comments.write_text("# rotated out\n\n")
    for bad in (
        {"api_keys": SecretStr(" , ")},
        {"api_key_file": comments},
        {"api_key_file": tmp_path / "missing"},
    ):
        with pytest.raises(ValidationError, match=r"API keys were configured|cannot read"):
            Settings(**bad)
    # '#' starts a comment only in the key file; in the variable it is part of a key.
    assert Settings(api_keys=SecretStr("#abc, def")).keys() == ["#abc", "def"]
    assert Settings().keys() == []


def test_auth_off_by_default(client):
    assert client.get("/v1/models").status_code == 200


def test_models_health_and_metrics(client):
    card = client.get("/v1/models").json()["data"][0]
    assert card["id"] == "esm2-tiny32-tiny48-tiny64" and card["max_dimensions"] == 64
    assert [lv["dim"] for lv in card["levels"]] == [32, 48, 64]
    assert all(lv["loaded"] and lv["ready"] for lv in card["levels"])
    assert card["artifact"]["regressor"] == "pcr" and len(card["artifact"]["steps"]) == 2
    assert card["artifact"]["steps"][0]["components_kept"] >= 1
    ready = client.get("/health/ready").json()
    assert ready["status"] == "ready" and ready["ready_up_to_dimensions"] == 64
    embed(client, dimensions=10)
    text = client.get("/metrics").text
    for name in (
        "rdserve_requests_total",
        "rdserve_request_duration_seconds_bucket",
        "rdserve_queue_depth",
        "rdserve_batch_sequences_bucket",
        "rdserve_batch_residues_bucket",
        "rdserve_batch_padding_ratio_bucket",
        "rdserve_forward_duration_seconds_bucket",
        "rdserve_residues_total",
        "rdserve_cache_lookups_total",
        "rdserve_model_load_seconds",
        "rdserve_worker_up",
        "rdserve_artifact_info",
        "rdserve_embedding_items_total",
    ):
        assert name in text, name
    assert 'rdserve_embedding_items_total{k_bucket="le_32",pooling="mean"}' in text


def test_readiness_grows_level_by_level(make_app):
    c, service = make_app()
    gate = threading.Event()
    fam = service.dispatcher.worker.embedder.family
    inner = fam.load

    def slow_load(level):
        if level == 2:
            gate.wait(30)
        return inner(level)

    fam.load = slow_load
    with c:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            r = c.get("/health/ready")
            if r.json()["ready_up_to_dimensions"] == 48:
                break
            time.sleep(0.05)
        assert r.status_code == 503 and r.json()["status"] == "warming"
        assert [lv["ready"] for lv in r.json()["levels"]] == [True, True, False]
        gate.set()
        assert wait_ready(c)["ready_up_to_dimensions"] == 64


def test_sequences_are_logged_only_when_enabled(make_app, caplog):
    caplog.set_level("DEBUG", logger="app.core.service")
    for enabled in (False, True):
        caplog.clear()
        c, _ = make_app(log_sequences=enabled)
        with c:
            c.post("/v1/embeddings", json={"input": ["MKVLAW"], "dimensions": 4})
        logged = [r for r in caplog.records if getattr(r, "sequences", None)]
        assert bool(logged) is enabled
        if enabled:
            assert logged[0].sequences == ["MKVLAW"] and logged[0].request_id


def test_unexpected_error_is_a_500_in_the_error_shape_with_the_request_id(make_app):
    c, service = make_app()

    async def broken(*_a, **_kw):
        raise RuntimeError("boom")

    with c:
        wait_ready(c)
        service.embed = broken
        r = c.post("/v1/embeddings", json={"input": "MKV"}, headers={"x-request-id": "rid-500"})
    assert r.status_code == 500 and r.headers["x-request-id"] == "rid-500"
    assert r.json()["error"] == {
        "message": "internal error",
        "type": "server_error",
        "param": None,
        "code": "internal",
    }


def test_workers_live_metric_in_embedded_mode(client):
    assert metric(client, "rdserve_workers_live") == 1


def test_log_extras_never_replace_the_base_fields():
    import json
    import logging

    from app.logs import JsonFormatter

    rec = logging.LogRecord("app.x", logging.WARNING, __file__, 1, "hello", None, None)
    rec.__dict__.update(level="tiny32", msg_id=3)
    out = json.loads(JsonFormatter().format(rec))
    assert out["level"] == "warning" and out["msg"] == "hello"
    assert out["extra_level"] == "tiny32" and out["msg_id"] == 3


def test_heap_is_frozen_after_warm_up(client):
    """Objects alive after warm-up (models, libraries) are out of the GC's reach (no 200 ms
    full collections during requests)."""
    import gc

    assert gc.get_freeze_count() > 10_000
