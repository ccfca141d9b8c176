"""The Python client (client/, package rdserve_client) against real servers: an embedded app
over real HTTP, and a distributed API that has no worker yet (503 + Retry-After, retried until
one starts). Values are checked against direct requests; errors name the caller's own item;
`rdserve embed --server` gives what `rdserve embed --artifact` gives."""

from __future__ import annotations

import asyncio
import gzip
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import uvicorn
from rdserve_client import AsyncClient, BadRequestError, Client, plan_parts

from tests.harness import Cluster, cluster_env, scrape
from tests.helpers import random_protein
from tests.procs import REPO, RedisServer, free_port, rdserve

RNG = __import__("random").Random(7)
SEQS = [random_protein(RNG, 20, 90) for _ in range(40)]
IDS = [f"q{i}" for i in range(len(SEQS))]


@pytest.fixture
def server(make_app):
    """An embedded app with small request limits, served over real HTTP."""
    c, _ = make_app(max_sequences=8, max_residues=600)
    port = free_port()
    srv = uvicorn.Server(uvicorn.Config(c.app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{port}"
    with Client(base) as rd:
        deadline = time.monotonic() + 60
        while True:
            try:
                if rd._run(rd._aio._http.get("/health/ready")).status_code == 200:
                    break
            except Exception:  # noqa: BLE001 — not listening yet
                pass
            assert time.monotonic() < deadline
            time.sleep(0.1)
    yield base
    srv.should_exit = True
    thread.join(30)


def test_the_client_imports_without_torch():
    code = "import rdserve_client, sys; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO / "client")


def test_parts_respect_every_limit():
    limits = {"max_sequences": 3, "max_residues": 100, "max_output_bytes": 10**9}
    limits["max_body_bytes"] = 10**9
    parts = plan_parts([40, 40, 40, 10, 10, 10, 10, 500], limits, 64, 4, False, 256, 10**6)
    assert parts == [(0, 2), (2, 5), (5, 7), (7, 8)]  # 500 residues go alone
    out = {**limits, "max_sequences": 1000, "max_residues": 10**6, "max_output_bytes": 64 * 4 * 50}
    assert plan_parts([10] * 120, out, 64, 4, True, 256, 10**6) == [(0, 5), (5, 10)] + [
        (i, i + 5) for i in range(10, 120, 5)
    ]


def test_embed_splits_by_the_servers_limits_and_keeps_order(server):
    with Client(server, max_concurrency=3) as rd:
        got = rd.embed(SEQS, dimensions=40, ids=IDS)
        assert got.shape == (40, 40) and got.dtype == np.float32
        info = rd.info()
        assert info["limits"]["max_sequences"] == 8
        # Each part is a valid request on its own: compare with one small request per sequence.
        for i in (0, 17, 39):
            np.testing.assert_allclose(got[i], rd.embed([SEQS[i]], 40)[0], rtol=1e-5, atol=1e-6)
        per_res = rd.embed(SEQS[:10], dimensions=24, pooling="per_residue")
        assert [a.shape for a in per_res] == [(len(s), 24) for s in SEQS[:10]]
        np.testing.assert_allclose(per_res[3].mean(0), rd.embed([SEQS[3]], 24)[0], atol=1e-5)


def test_errors_name_the_callers_item(server):
    bad = list(SEQS)
    bad[13] = "MKVJ"
    with Client(server) as rd, pytest.raises(BadRequestError) as e:
        rd.embed(bad, dimensions=8)
    assert e.value.status == 400 and e.value.code == "invalid_sequence"
    assert e.value.param == "input[13]" and e.value.index == 13
    assert e.value.message.startswith("input[13]:")


def test_async_client_and_jobs_from_a_file_and_a_list(server, tmp_path):
    path = tmp_path / "q.fasta.gz"
    path.write_bytes(
        gzip.compress("".join(f">{i}\n{s}\n" for i, s in zip(IDS, SEQS, strict=True)).encode())
    )

    async def main() -> tuple:
        async with AsyncClient(server) as rd:
            direct = await rd.embed(SEQS, dimensions=32)
            job = await rd.submit_job(path, dimensions=32)
            info = await job.wait(progress=True, poll_s=0.1)
            assert info["status"] == "succeeded", info
            await job.download(tmp_path / "out.npz")
            await job.download(tmp_path / "out.npy", "npy")
            listed = await rd.jobs()
            job2 = await rd.submit_job(SEQS[:5], dimensions=16, ids=IDS[:5])
            await job2.wait(poll_s=0.1)
            return direct, listed, await job2.result(), job.id

    direct, listed, small, job_id = asyncio.run(main())
    with np.load(tmp_path / "out.npz") as z:
        assert z.files == IDS
        np.testing.assert_allclose(np.stack([z[i] for i in IDS]), direct, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.load(tmp_path / "out.npy"), direct, rtol=1e-5, atol=1e-6)
    assert listed[0]["id"] == job_id and sorted(small) == sorted(IDS[:5])
    assert not list(tmp_path.glob(".*.part"))


def test_rdserve_embed_server_gives_what_it_gives_locally(server, tiny_artifact, tmp_path):
    fa = tmp_path / "q.fasta"
    fa.write_text("".join(f">{i} some description\n{s}\n" for i, s in zip(IDS, SEQS, strict=True)))
    common = ["--fasta", str(fa), "--dimensions", "48"]
    env = {"OMP_NUM_THREADS": "1"}
    for out, where in (
        (tmp_path / "remote.npy", ["--server", server]),
        (tmp_path / "local.npy", ["--artifact", str(tiny_artifact), "--device", "cpu"]),
    ):
        p = rdserve(
            "embed", *common, *where, "--out", str(out), env=env, log=tmp_path / f"{out.stem}.log"
        )
        assert p.wait(120) == 0, p.output()
    np.testing.assert_allclose(
        np.load(tmp_path / "remote.npy"), np.load(tmp_path / "local.npy"), rtol=1e-4, atol=1e-5
    )
    assert (tmp_path / "remote.ids.txt").read_text() == (tmp_path / "local.ids.txt").read_text()


def test_503_is_retried_after_retry_after_until_a_worker_serves(tiny_artifact, tmp_path):
    """A distributed API with no worker answers 503 no_worker with Retry-After: the client waits
    that long and tries again, and succeeds once a worker has started."""
    redis = RedisServer(tmp_path).start()
    c = Cluster(cluster_env(redis.url, tiny_artifact, "rdserve-client"), tmp_path)
    try:
        from tests.procs import wait_http

        wait_http(f"{c.base}/health/live", c.api)
        result: dict = {}

        def call() -> None:
            with Client(c.base, max_retries=10) as rd:
                result["x"] = rd.embed(SEQS[:3], dimensions=16)

        t = threading.Thread(target=call)
        t.start()
        deadline = time.monotonic() + 30
        while scrape(c.base, "rdserve_requests_total", route="/v1/embeddings", status="503") < 1:
            assert time.monotonic() < deadline, c.output()
            time.sleep(0.1)
        c.worker("w1")
        t.join(120)
        assert result["x"].shape == (3, 16), c.output()
        assert scrape(c.base, "rdserve_requests_total", route="/v1/embeddings", status="200") == 1
    finally:
        c.close()
        redis.stop()
