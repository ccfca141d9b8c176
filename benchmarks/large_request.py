"""Large requests against an API + worker + Redis of real processes (tiny chain).

Issue 13, item 8: ten 16 MiB bodies POSTed at once to /health/live, which takes none: refused
before they are read; the API's peak RSS. Item 9: two 100k-residue sequences per residue (chunk
policy, k = 64). As JSON the request is refused before any work (413, the estimated response is
over max_output_bytes); as .npz it is served and streamed. Peak RSS of the API and the worker,
and Redis' peak memory.

    python -m benchmarks.large_request        # → benchmarks/results/large_request.json
"""

from __future__ import annotations

import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from benchmarks.common import PeakRss, process_rss_mb, save, tiny_esm2
from benchmarks.service import served_artifact
from tests.harness import Cluster, cluster_env
from tests.procs import RedisServer


def health_bodies(base: str, api_pid: int, n: int = 10, mib: int = 16) -> dict[str, Any]:
    """n bodies of `mib` MiB POSTed at once to /health/live: statuses and the API's peak RSS."""

    def post(_: int) -> str:
        try:
            r = httpx.post(f"{base}/health/live", content=b"x" * (mib * 2**20), timeout=60)
            return str(r.status_code)
        except httpx.HTTPError as e:  # refused mid-upload: the server closed the connection
            return type(e).__name__

    before = process_rss_mb(api_pid)
    peak = PeakRss({"api": api_pid})
    peak.start()
    with ThreadPoolExecutor(n) as pool:
        got = list(pool.map(post, range(n)))
    return {
        "bodies": f"{n} × {mib} MiB at once",
        "outcomes": {o: got.count(o) for o in sorted(set(got))},
        "api_rss_mb": {"before": before, "peak": peak.stop()["api"]},
    }


def run() -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp(prefix="rdserve-bench-large-"))
    _, _, art = served_artifact([str(tiny_esm2(h)) for h in (32, 48, 64)])
    redis = RedisServer(tmp).start()
    c = Cluster(cluster_env(redis.url, art, "rdserve-bench-large"), tmp)
    rng = np.random.default_rng(0)
    seqs = ["".join(rng.choice(list("ACDEFGHIKLMNPQRSTVWY"), 100_000)) for _ in range(2)]
    body = {
        "input": seqs,
        "pooling": "per_residue",
        "long_sequence_policy": "chunk",
        "dimensions": 64,
    }
    out: dict[str, Any] = {"request": "2 × 100,000 residues, per residue, chunk policy, k = 64"}
    try:
        c.worker("w1")
        c.wait_workers(1)
        pids = {"api": c.api.p.pid, "worker": c.workers["w1"].p.pid}
        out["rss_before_mb"] = {n: process_rss_mb(p) for n, p in pids.items()}
        out["health_bodies"] = health_bodies(c.base, pids["api"])
        r = httpx.post(f"{c.base}/v1/embeddings", json=body, timeout=600)
        out["json"] = {"status": r.status_code, "code": r.json()["error"]["code"]}
        peak = PeakRss(pids)
        peak.start()
        t0 = time.perf_counter()
        got = 0
        with httpx.stream(
            "POST",
            f"{c.base}/v1/embeddings",
            json=body,
            headers={"accept": "application/x-npz"},
            timeout=600,
        ) as resp:
            status = resp.status_code
            for piece in resp.iter_bytes(2**20):
                got += len(piece)
        seconds = time.perf_counter() - t0
        out["rss_peak_mb"] = peak.stop()
        out["npz"] = {"status": status, "bytes": got, "seconds": seconds}
        out["redis_used_memory_peak_mb"] = redis.client().info("memory")["used_memory_peak"] / 2**20
    finally:
        c.close()
        redis.stop()
    return out


def main() -> None:
    res = run()
    print(res)
    print(f"saved {save('large_request', res, 'python -m benchmarks.large_request')}")


if __name__ == "__main__":
    main()
