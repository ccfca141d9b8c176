"""Bulk jobs in one process (embedded mode, the real app over TestClient, tiny real models):
FASTA and JSON intake, validation before any work, limits, results in every format equal to
direct embeddings, ownership by API key, cancellation and deletion, a re-run at a larger k
served from the nested cache, and a result store that is not a local directory (fsspec).

The fleet (API replicas, workers, Redis, crashes) is in tests/test_jobs_fleet.py."""

from __future__ import annotations

import gzip
import io
import time

import numpy as np
import pytest
from pydantic import SecretStr

from tests.helpers import wait_ready

SEQS = [
    "MKTAYIAKQRQISFVKSHFSRQLEERLGLIEVQ",
    "GSHMLEDPVDAFQ",
    "MVLSPADKTNVKAAWGKVGAHAGEYGAEALERMFLSFPTTKTYFPHF",
    "MADQLTEEQIAEFKEAFSLFDKDGDGTITTKELGTVMRSLGQNPTEAELQ",
]
IDS = ["P1 kinase", "P2", "P3", "P4"]  # a FASTA id ends at the first space: "P1"


def fasta(records: list[tuple[str, str]], width: int = 10) -> bytes:
    """FASTA text with sequences wrapped at ``width`` (as most writers do)."""
    out = []
    for name, seq in records:
        out.append(f">{name}\n")
        out += [seq[i : i + width] + "\n" for i in range(0, len(seq), width)]
    return "".join(out).encode()


def wait_job(c, job_id: str, headers: dict | None = None, timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        j = c.get(f"/v1/jobs/{job_id}", headers=headers or {}).json()
        if j["status"] in ("succeeded", "failed", "cancelled"):
            return j
        time.sleep(0.05)
    raise AssertionError(j)


def direct(c, seqs: list[str], **opts) -> list[np.ndarray]:
    """The same sequences through POST /v1/embeddings."""
    r = c.post("/v1/embeddings", json={"input": seqs, **opts})
    assert r.status_code == 200, r.text
    return [np.asarray(d["embedding"], dtype=np.float32) for d in r.json()["data"]]


def load(content: bytes) -> dict:
    with np.load(io.BytesIO(content)) as z:
        return {k: z[k] for k in z.files}


@pytest.fixture
def app(make_app):
    c, _ = make_app()
    with c:
        wait_ready(c)
        yield c


def test_a_json_job_gives_what_direct_requests_give_in_every_format(app):
    r = app.post("/v1/jobs", json={"input": SEQS, "dimensions": 40, "normalize": True})
    assert r.status_code == 202, r.text
    assert r.headers["location"] == f"/v1/jobs/{r.json()['id']}"
    accepted = r.json()
    assert accepted["records"] == {"total": 4, "done": 0} and accepted["dimensions"] == 40
    j = wait_job(app, accepted["id"])
    assert j["status"] == "succeeded" and j["records"] == {"total": 4, "done": 4}
    assert j["residues"]["done"] == sum(map(len, SEQS)) and j["failures"] == []
    assert j["result"]["formats"] == ["npz", "npy", "ids"]
    want = direct(app, SEQS, dimensions=40, normalize=True)
    res = app.get(j["result"]["url"])
    assert res.headers["content-type"] == "application/x-npz"
    assert int(res.headers["content-length"]) == j["result"]["bytes"] == len(res.content)
    npz = load(res.content)
    assert sorted(npz) == ["0", "1", "2", "3"]  # ids default to the input indices
    for i, w in enumerate(want):
        np.testing.assert_allclose(npz[str(i)], w, rtol=1e-5, atol=1e-6)
    npy = np.load(io.BytesIO(app.get(j["result"]["url"], params={"format": "npy"}).content))
    assert npy.shape == (4, 40) and npy.dtype == np.float32
    np.testing.assert_allclose(npy, np.stack(want), rtol=1e-5, atol=1e-6)
    ids = app.get(j["result"]["url"], params={"format": "ids"}).text
    assert ids == "0\n1\n2\n3\n"
    listed = app.get("/v1/jobs").json()["data"]
    assert [x["id"] for x in listed] == [j["id"]] and listed[0]["status"] == "succeeded"


def test_a_gzip_fasta_upload_per_residue_float16(app):
    body = gzip.compress(fasta(list(zip(IDS, SEQS, strict=True))))
    r = app.post(
        "/v1/jobs",
        params={"dimensions": 64, "pooling": "per_residue", "dtype": "float16"},
        content=body,
        headers={"content-type": "application/gzip"},
    )
    assert r.status_code == 202, r.text
    j = wait_job(app, r.json()["id"])
    assert j["status"] == "succeeded" and j["pooling"] == "per_residue"
    assert j["result"]["formats"] == ["npz"]  # per residue: no N×k .npy
    npz = load(app.get(j["result"]["url"]).content)
    assert list(npz) == ["P1", "P2", "P3", "P4"]
    want = direct(app, SEQS, dimensions=64, pooling="per_residue")
    for name, w in zip(npz, want, strict=True):
        assert npz[name].dtype == np.float16 and npz[name].shape == w.shape
        np.testing.assert_allclose(npz[name], w, rtol=2e-3, atol=2e-3)
    bad = app.get(j["result"]["url"], params={"format": "npy"})
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "unsupported_format"


def test_records_are_validated_before_any_work(app, make_app):
    """An invalid record refuses the job at once, naming its number and id; with
    on_invalid=skip it is left out and listed; a trailing stop codon may be stripped."""
    recs = [("ok1", SEQS[0]), ("bad", "MKJV"), ("ok2", SEQS[1]), ("stop", SEQS[2] + "*")]
    r = app.post("/v1/jobs", content=fasta(recs), headers={"content-type": "text/x-fasta"})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["code"] == "invalid_sequence" and err["message"].startswith("record 2 (bad):")
    assert "'J' at position 3" in err["message"]
    assert app.get("/v1/jobs").json()["data"] == []  # nothing was kept
    r = app.post(
        "/v1/jobs",
        params={"on_invalid": "skip", "strip_stop": "true"},
        content=fasta(recs),
        headers={"content-type": "text/x-fasta"},
    )
    assert r.status_code == 202, r.text
    j = wait_job(app, r.json()["id"])
    assert j["status"] == "succeeded" and j["records"] == {"total": 3, "done": 3}
    assert j["skipped"] == 1
    assert [(f["record"], f["id"], f["code"]) for f in j["failures"]] == [
        (2, "bad", "invalid_sequence")
    ]
    assert list(load(app.get(j["result"]["url"]).content)) == ["ok1", "ok2", "stop"]
    dup = fasta([("a", SEQS[0]), ("b", SEQS[1]), ("a", SEQS[2])])
    r = app.post("/v1/jobs", content=dup, headers={"content-type": "text/x-fasta"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "duplicate_id", r.text
    assert "record 3 repeats the id of record 1" in r.json()["error"]["message"]
    for body, code in (
        (b"MKV\n>x\nMKV\n", "invalid_fasta"),  # data before the first header
        (b"\xff\xfe>x\n", "invalid_fasta"),  # not UTF-8
        (gzip.compress(fasta(recs[:1]))[:-8], "invalid_fasta"),  # a cut gzip stream
        (b"", "empty_input"),
    ):
        r = app.post("/v1/jobs", content=body, headers={"content-type": "text/x-fasta"})
        assert r.status_code == 400 and r.json()["error"]["code"] == code, (body[:10], r.text)
    r = app.post("/v1/jobs", json={"input": ["MKV", "MZ1"], "ids": ["a", "b"]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "input[1]", r.text
    r = app.post("/v1/jobs", json={"input": ["MKV", "MKV"], "ids": ["a", "../b"]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "ids[1]", r.text
    r = app.post("/v1/jobs", json={"input": ["MKV"]}, params={"dimensions": 3})
    assert r.status_code == 400 and r.json()["error"]["code"] == "unexpected_query", r.text
    r = app.post("/v1/jobs", content=b"x", headers={"content-type": "image/png"})
    assert r.status_code == 415 and r.json()["error"]["code"] == "unsupported_media_type"
    r = app.post("/v1/jobs", content=fasta(recs[:1]), params={"dimensions": 65})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_dimensions"


def test_job_limits_answer_413(make_app):
    c, _ = make_app(job_max_records=3, job_max_residues=10_000, job_max_bytes=4096)
    with c:
        wait_ready(c)
        many = fasta([(f"s{i}", "MKV") for i in range(4)])
        r = c.post("/v1/jobs", content=many, headers={"content-type": "text/x-fasta"})
        assert r.status_code == 413 and r.json()["error"]["code"] == "too_many_records"
        long = fasta([("a", "M" * 900), ("b", "K" * 900)] * 1)
        c2, _ = make_app(job_max_residues=1000)
        r = c.post("/v1/jobs", content=b"x" * 5000, headers={"content-type": "text/x-fasta"})
        assert r.status_code == 413 and r.json()["error"]["code"] == "upload_too_large"
    with c2:
        wait_ready(c2)
        r = c2.post("/v1/jobs", content=long, headers={"content-type": "text/x-fasta"})
        assert r.status_code == 413 and r.json()["error"]["code"] == "too_many_residues"
        assert c2.get("/v1/jobs").json()["data"] == []


def test_a_job_belongs_to_the_key_that_made_it(make_app):
    c, _ = make_app(api_keys=SecretStr("key-a,key-b"))
    a, b = ({"authorization": f"Bearer key-{x}"} for x in "ab")
    with c:
        wait_ready(c)
        job = c.post("/v1/jobs", json={"input": SEQS[:2]}, headers=a).json()["id"]
        wait_job(c, job, a)
        for path in (f"/v1/jobs/{job}", f"/v1/jobs/{job}/result"):
            r = c.get(path, headers=b)
            assert r.status_code == 404 and r.json()["error"]["code"] == "job_not_found", path
            assert c.get(path, headers=a).status_code == 200, path
        assert c.delete(f"/v1/jobs/{job}", headers=b).status_code == 404
        assert c.get("/v1/jobs", headers=b).json()["data"] == []
        assert [x["id"] for x in c.get("/v1/jobs", headers=a).json()["data"]] == [job]
        assert c.get(f"/v1/jobs/{job}").status_code == 401


def test_cancel_stops_a_job_and_keeps_nothing_partial_then_delete_removes_it(make_app, tmp_path):
    """Many small chunks, one in flight at a time: DELETE stops it between chunks; its result
    never appears and its chunk files are gone. DELETE again deletes the ended job."""
    c, _ = make_app(job_chunk_residues=64, job_max_inflight=1)
    rng = np.random.default_rng(0)
    recs = [(f"s{i}", "".join(rng.choice(list("ACDEFGHIKLMNPQRSTVWY"), 60))) for i in range(400)]
    with c:
        wait_ready(c)
        job = c.post("/v1/jobs", content=fasta(recs), headers={"content-type": "text/x-fasta"})
        job_id = job.json()["id"]
        assert job.json()["chunks"]["total"] == 400
        deadline = time.monotonic() + 30
        while c.get(f"/v1/jobs/{job_id}").json()["chunks"]["done"] < 2:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        j = c.delete(f"/v1/jobs/{job_id}").json()
        assert j["status"] == "cancelled" and 2 <= j["chunks"]["done"] < 400, j
        r = c.get(f"/v1/jobs/{job_id}/result")
        assert r.status_code == 409 and r.json()["error"]["code"] == "job_not_finished"
        folder = tmp_path / "jobs" / "anonymous" / job_id
        assert sorted(p.name for p in folder.iterdir()) == ["cancel", "job.json", "state.json"]
        time.sleep(0.5)  # nothing is written after the cancellation
        assert c.get(f"/v1/jobs/{job_id}").json()["chunks"]["done"] == j["chunks"]["done"]
        assert c.delete(f"/v1/jobs/{job_id}").json()["status"] == "cancelled"
        assert c.get(f"/v1/jobs/{job_id}").status_code == 404 and not folder.exists()


def test_a_rerun_at_a_larger_k_runs_only_the_missing_levels(app):
    """The nested cache: the first job at k = 32 (level 1) caches levels 0…0; the same records at
    k = 64 find them (partial) and run only the levels above; a third run is all hits."""
    first = wait_job(app, app.post("/v1/jobs", json={"input": SEQS, "dimensions": 32}).json()["id"])
    assert first["cache"] == {"miss": 4}
    second = wait_job(
        app, app.post("/v1/jobs", json={"input": SEQS, "dimensions": 64}).json()["id"]
    )
    assert second["cache"] == {"partial": 4}
    third = wait_job(app, app.post("/v1/jobs", json={"input": SEQS, "dimensions": 48}).json()["id"])
    assert third["cache"] == {"full_hit": 4}
    npz = load(app.get(second["result"]["url"]).content)
    for i, w in enumerate(direct(app, SEQS, dimensions=64)):
        np.testing.assert_allclose(npz[str(i)], w, rtol=1e-5, atol=1e-6)


def test_results_in_an_fsspec_store_that_is_not_a_directory(make_app):
    """The store is any fsspec URL (an object store in production): here its in-memory
    filesystem, where files are objects, not renamed into place."""
    import fsspec

    c, _ = make_app(job_store="memory://rdserve-test-jobs")
    with c:
        wait_ready(c)
        j = wait_job(c, c.post("/v1/jobs", json={"input": SEQS, "ids": list("abcd")}).json()["id"])
        assert j["status"] == "succeeded"
        fs = fsspec.filesystem("memory")
        assert fs.exists(f"/rdserve-test-jobs/anonymous/{j['id']}/result.npz")
        npz = load(c.get(j["result"]["url"]).content)
        for name, w in zip("abcd", direct(c, SEQS), strict=True):
            np.testing.assert_allclose(npz[name], w, rtol=1e-5, atol=1e-6)
        fs.rm("/rdserve-test-jobs", recursive=True)
