"""Bulk jobs on a fleet (API + 2 workers + Redis, real processes, loopback):

1. throughput — a job of N sequences (a variant library: single and double mutants of one
   protein) through the fleet, against the same file embedded in-process (what `rdserve embed`
   runs: Embedder.iter_compute over slices of 2,048) at the same token budget;
2. interactive — cache-hit requests at a fixed rate (open loop, latency from the scheduled send
   time) with no job, then while a job runs: p50 / p99;
3. a re-run at a larger k — residues each level's model ran, from the workers' counters;
4. memory — the API's RSS while a ~100 MB FASTA is uploaded, and while a ~100 MB result is
   downloaded.

    python -m benchmarks.jobs [--sequences 20000] [--quick]   # → benchmarks/results/jobs.json
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import redis

from benchmarks import loadgen
from benchmarks.common import (
    PeakRss,
    process_rss_mb,
    random_esm2,
    save,
    tiny_esm2,
)
from benchmarks.service import served_artifact
from tests.harness import Cluster, cluster_env, scrape
from tests.procs import RedisServer

AA = "ACDEFGHIKLMNPQRSTVWY"
#: The protein whose mutants make the library: the B1 domain of protein G (56 aa).
GB1 = "MTYKLILNGKTLKGETTTEAVDAATAEKVFKQYANDNGVDGEWTYDDATKTFTVTE"


def variant_library(n: int, seed: int = 0) -> list[tuple[str, str]]:
    """n distinct single and double mutants of GB1, named like a DMS library (e.g. V21A:D40K)."""
    rng = random.Random(seed)
    seen, out = set(), []
    while len(out) < n:
        seq, names = list(GB1), []
        for _ in range(1 if rng.random() < 0.5 else 2):
            pos = rng.randrange(len(GB1))
            aa = rng.choice([a for a in AA if a != GB1[pos]])
            seq[pos] = aa
            names.append(f"{GB1[pos]}{pos + 1}{aa}")
        s = "".join(seq)
        if s not in seen:
            seen.add(s)
            out.append((":".join(names), s))
    return out


def write_fasta(path: Path, recs: list[tuple[str, str]]) -> Path:
    path.write_text("".join(f">{n}\n{s}\n" for n, s in recs))
    return path


class Fleet:
    """A private Redis, one API, two workers (one compute thread each), the jobs' store."""

    def __init__(self, artifact: Path, logs: Path, budget: int) -> None:
        self.redis = RedisServer(logs).start()
        env = cluster_env(
            self.redis.url,
            artifact,
            "rdserve-bench-jobs",
            RDSERVE_TOKEN_BUDGET=str(budget),
            RDSERVE_LOG_LEVEL="warning",
            RDSERVE_MAX_QUEUE="4096",
        )
        self.c = Cluster(env, logs)
        self.c.worker("w1", metrics=True)
        self.c.worker("w2", metrics=True)
        self.c.wait_workers(2, timeout=600)
        self.base = self.c.base

    def residues(self) -> dict[str, float]:
        """Residues each level's model ran, summed over the workers."""
        out: dict[str, float] = {}
        text = "".join(httpx.get(f"{u}/metrics").text for u in self.c.metrics.values())
        from prometheus_client.parser import text_string_to_metric_families

        for fam in text_string_to_metric_families(text):
            for s in fam.samples:
                if s.name == "rdserve_residues_total":
                    out[s.labels["level"]] = out.get(s.labels["level"], 0) + s.value
        return out

    def close(self) -> None:
        self.c.close()
        self.redis.stop()


def submit(base: str, fasta: Path, **params: Any) -> str:
    with open(fasta, "rb") as fh:
        r = httpx.post(
            f"{base}/v1/jobs",
            params=params,
            content=fh,
            headers={"content-type": "text/x-fasta"},
            timeout=600,
        )
    r.raise_for_status()
    return r.json()["id"]


def wait(base: str, job: str, every: float = 0.5) -> dict:
    while True:
        j = httpx.get(f"{base}/v1/jobs/{job}", timeout=30).json()
        if j["status"] in ("succeeded", "failed", "cancelled"):
            return j
        time.sleep(every)


def in_process(artifact: Path, seqs: list[str], k: int, budget: int) -> float:
    """Residues/s of `rdserve embed`'s loop in this process (models loaded before timing)."""
    from models.embedder import Embedder
    from models.families.base import set_threads

    set_threads(None)
    emb = Embedder.from_artifact(artifact, device="cpu", token_budget=budget)
    stop = emb.artifact.level_for_dim(k)
    emb.compute(seqs[:8], stop=stop)  # warm
    t0 = time.perf_counter()
    for lo in range(0, len(seqs), 2048):
        for _ in emb.iter_compute(seqs[lo : lo + 2048], stop, 0):
            pass
    return sum(map(len, seqs)) / (time.perf_counter() - t0)


def job_rate(j: dict) -> float:
    return j["residues"]["done"] / (j["ended_at"] - j["started_at"])


def latencies(base: str, bodies: list[dict], rate: float) -> dict[str, float]:
    url = f"{base}/v1/embeddings"
    reqs = [loadgen.encode_post(url, b) for b in bodies]
    with loadgen.frozen_heap():
        _, lat = asyncio.run(loadgen.open_loop(url, reqs, rate))
    lat = sorted(lat)
    return {
        "requests": len(lat),
        "p50_ms": 1000 * statistics.median(lat),
        "p99_ms": 1000 * lat[int(0.99 * (len(lat) - 1))],
        "max_ms": 1000 * lat[-1],
    }


def memory(fleet: Fleet, tmp: Path, k: int, upload_mb: int, result_mb: int) -> dict[str, Any]:
    """API RSS: baseline, peak while a large FASTA uploads, peak while a large result downloads."""
    pid = fleet.c.api.p.pid
    rng = np.random.default_rng(1)
    big = tmp / "big.fasta"
    with open(big, "w") as fh:
        i = 0
        while fh.tell() < upload_mb * 2**20:
            fh.write(f">u{i}\n{''.join(rng.choice(list(AA), 300))}\n")
            i += 1
    base_rss = process_rss_mb(pid)
    s = PeakRss({"api": pid})
    s.start()
    job = submit(fleet.base, big, dimensions=k)
    upload_peak = s.stop()["api"]
    httpx.delete(f"{fleet.base}/v1/jobs/{job}", timeout=60)
    # A per-residue result of ~result_mb: residues × width × 4 bytes.
    width = max(lv["dim"] for lv in httpx.get(f"{fleet.base}/info").json()["levels"])
    n_res = result_mb * 2**20 // (4 * width)
    recs = variant_library(n_res // len(GB1) + 1, seed=2)
    job = submit(fleet.base, write_fasta(tmp / "res.fasta", recs), pooling="per_residue")
    j = wait(fleet.base, job)
    assert j["status"] == "succeeded", j
    before_dl = process_rss_mb(pid)
    s = PeakRss({"api": pid})
    s.start()
    got = 0
    with httpx.stream("GET", f"{fleet.base}/v1/jobs/{job}/result", timeout=600) as r:
        for piece in r.iter_bytes(2**20):
            got += len(piece)
    download_peak = s.stop()["api"]
    return {
        "upload_bytes": big.stat().st_size,
        "upload_records": i,
        "result_bytes": got,
        "api_rss_mb": {
            "before_upload": base_rss,
            "peak_during_upload": upload_peak,
            "before_download": before_dl,
            "peak_during_download": download_peak,
        },
        "upload_growth": upload_peak / base_rss - 1,
        "download_growth": download_peak / before_dl - 1,
    }


def run(quick: bool = False, sequences: int = 20_000) -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp(prefix="rdserve-bench-jobs-"))
    if quick:
        refs, budget, k_small, k, sequences = (
            [str(tiny_esm2(h)) for h in (32, 48, 64)],
            2048,
            32,
            64,
            min(sequences, 2000),
        )
    else:
        refs, budget, k_small, k = [str(random_esm2("8M")), str(random_esm2("35M"))], 1536, 320, 480
    _, art, path = served_artifact(refs)
    recs = variant_library(sequences)
    fasta = write_fasta(tmp / "library.fasta", recs)
    seqs = [s for _, s in recs]
    res: dict[str, Any] = {
        "chain": [lv.name for lv in art.levels],
        "token_budget": budget,
        "sequences": len(seqs),
        "residues": sum(map(len, seqs)),
        "library": "single and double mutants of GB1 (56 aa)",
    }
    baseline = in_process(path, seqs, k, budget)
    fleet = Fleet(path, tmp, budget)
    try:
        # 2. interactive latency with no job (the cache holds the requests' sequences)
        hits = [{"input": [s], "dimensions": k_small} for _, s in recs[:50]]
        httpx.post(f"{fleet.base}/v1/embeddings", json={"input": [b["input"][0] for b in hits]})
        rate, n_req = (100.0, 1500) if not quick else (50.0, 300)
        bodies = [hits[i % len(hits)] for i in range(n_req)]
        res["interactive_no_job"] = latencies(fleet.base, bodies, rate)
        # 1. throughput
        job = submit(fleet.base, fasta, dimensions=k)
        j = wait(fleet.base, job)
        assert j["status"] == "succeeded", j
        res["throughput"] = {
            "job_residues_per_s": job_rate(j),
            "in_process_residues_per_s": baseline,
            "ratio": job_rate(j) / baseline,
            "job_seconds": j["ended_at"] - j["started_at"],
            "chunks": j["chunks"]["total"],
        }
        # 2. interactive latency while another job (not cached) runs
        other = write_fasta(tmp / "other.fasta", variant_library(len(recs) // 4 + 100, seed=9))
        job2 = submit(fleet.base, other, dimensions=k)
        time.sleep(2.0)
        res["interactive_during_job"] = latencies(fleet.base, bodies, rate)
        res["interactive_during_job"]["job_still_running"] = (
            httpx.get(f"{fleet.base}/v1/jobs/{job2}").json()["status"] == "running"
        )
        wait(fleet.base, job2)
        # 3. re-run at a larger k: only the levels above the cached ones run
        small = write_fasta(tmp / "small.fasta", variant_library(len(recs) // 10, seed=11))
        r0 = fleet.residues()
        first = wait(fleet.base, submit(fleet.base, small, dimensions=k_small))
        r1 = fleet.residues()
        second = wait(fleet.base, submit(fleet.base, small, dimensions=k))
        r2 = fleet.residues()
        res["rerun_larger_k"] = {
            "k_first": k_small,
            "k_second": k,
            "first_cache": first["cache"],
            "second_cache": second["cache"],
            "residues_per_level_first": {lv: r1[lv] - r0.get(lv, 0) for lv in r1},
            "residues_per_level_second": {lv: r2[lv] - r1[lv] for lv in r2},
        }
        # 4. memory
        res["memory"] = memory(
            fleet, tmp, k, upload_mb=100 if not quick else 10, result_mb=100 if not quick else 10
        )
        res["redis_cpu_s"] = {
            k2: float(v)
            for k2, v in redis.Redis.from_url(fleet.redis.url).info("cpu").items()
            if k2 in ("used_cpu_user", "used_cpu_sys")
        }
        res["worker_bulk_yields"] = sum(
            scrape(u, "rdserve_bulk_yields_total") for u in fleet.c.metrics.values()
        )
    finally:
        fleet.close()
    return res


def markdown(res: dict[str, Any]) -> str:
    t, a, b = res["throughput"], res["interactive_no_job"], res["interactive_during_job"]
    m, rr = res["memory"], res["rerun_larger_k"]
    return "\n".join(
        [
            f"### Bulk jobs ({res['sequences']:,} sequences, {res['residues']:,} residues; "
            f"{' → '.join(res['chain'])}; budget {res['token_budget']})",
            "",
            "| measure | value |",
            "|---|---|",
            f"| job residues/s (API + 2 workers) | {t['job_residues_per_s']:,.0f} |",
            f"| in-process residues/s (rdserve embed's loop) | {t['in_process_residues_per_s']:,.0f} |",
            f"| ratio | {t['ratio']:.2f} |",
            f"| interactive full-hit p50 / p99, no job | {a['p50_ms']:.1f} / {a['p99_ms']:.1f} ms |",
            f"| same, while a job runs | {b['p50_ms']:.1f} / {b['p99_ms']:.1f} ms |",
            f"| re-run at k={rr['k_second']}: residues per level | {rr['residues_per_level_second']} |",
            f"| API RSS growth: upload {m['upload_bytes'] / 2**20:.0f} MB / download {m['result_bytes'] / 2**20:.0f} MB | {100 * m['upload_growth']:+.1f} % / {100 * m['download_growth']:+.1f} % |",
        ]
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--sequences", type=int, default=20_000)
    ap.add_argument("--quick", action="store_true", help="tiny models, 2,000 sequences")
    args = ap.parse_args()
    res = run(args.quick, args.sequences)
    cmd = "python -m benchmarks.jobs" + (" --quick" if args.quick else "")
    if args.sequences != 20_000:
        cmd += f" --sequences {args.sequences}"
    out = save("jobs" if not args.quick else "jobs-quick", res, cmd)
    print(markdown(res))
    print(f"\nsaved {out}")


if __name__ == "__main__":
    main()
