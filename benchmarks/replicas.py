"""API replicas killed under load: a stable API, one worker and a replica that is started, sent
requests and SIGKILLed with requests in flight, 20 times over one Redis. Counts the Redis keys
(cache entries aside) after each restart and once the reply TTL has passed, and what happened to
the requests in flight (a connection error, then a retry on the stable replica).

    python -m benchmarks.replicas [--restarts 20] [--reply-ttl 10]   # → results/replicas.json
"""

from __future__ import annotations

import argparse
import signal
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from benchmarks.common import save, tiny_esm2
from benchmarks.service import served_artifact
from tests.harness import Cluster, cluster_env
from tests.procs import RedisServer, free_port, rdserve, wait_http

PREFIX = "rdserve-bench-replicas"
AA = list("ACDEFGHIKLMNPQRSTVWY")


def body(seed: int) -> dict:
    rng = np.random.default_rng(seed)
    return {"input": ["".join(rng.choice(AA, 250)) for _ in range(16)], "dimensions": 64}


def keys(r: Any) -> int:
    return sum(1 for k in r.scan_iter(match=f"{PREFIX}:*") if b":emb:" not in k)


def run(restarts: int, reply_ttl: float) -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp(prefix="rdserve-bench-replicas-"))
    refs = [str(tiny_esm2(h)) for h in (32, 48, 64)]
    _, _, art = served_artifact(refs)
    redis = RedisServer(tmp).start()
    env = cluster_env(redis.url, art, PREFIX, RDSERVE_REDIS_REPLY_TTL_S=str(reply_ttl))
    c = Cluster(env, tmp)
    r = redis.client()
    out: dict[str, Any] = {"restarts": restarts, "reply_ttl_s": reply_ttl, "keys_after": []}
    failed = retried_ok = answered = 0
    try:
        c.worker("w1")
        c.wait_workers(1)
        httpx.post(f"{c.base}/v1/embeddings", json=body(0), timeout=60).raise_for_status()
        out["keys_before"] = keys(r)
        for i in range(restarts):
            port = free_port()
            p = rdserve("serve", "--port", str(port), env=c.env, log=tmp / f"replica{i}.log")
            base = f"http://127.0.0.1:{port}"
            wait_http(f"{base}/health/ready", p, timeout=120)
            results: list[Any] = [None] * 4

            def send(j: int, base: str = base, results: list = results, i: int = i) -> None:
                try:
                    results[j] = httpx.post(
                        f"{base}/v1/embeddings", json=body(1000 * i + j), timeout=60
                    )
                except httpx.TransportError as e:
                    results[j] = e

            threads = [threading.Thread(target=send, args=(j,)) for j in range(4)]
            for t in threads:
                t.start()
            time.sleep(0.3)
            p.signal(signal.SIGKILL)
            p.wait(10)
            for j, t in enumerate(threads):
                t.join(70)
                if isinstance(results[j], httpx.Response) and results[j].status_code == 200:
                    answered += 1
                    continue
                failed += 1
                again = httpx.post(f"{c.base}/v1/embeddings", json=body(1000 * i + j), timeout=60)
                retried_ok += again.status_code == 200
            out["keys_after"].append(keys(r))
        time.sleep(reply_ttl + 2)
        out["keys_after_ttl"] = keys(r)
        out["requests"] = {
            "answered_before_the_kill": answered,
            "failed_in_flight": failed,
            "retried_ok_on_the_other_replica": retried_ok,
        }
    finally:
        c.close()
        redis.stop()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--restarts", type=int, default=20)
    ap.add_argument("--reply-ttl", type=float, default=10.0)
    args = ap.parse_args()
    res = run(args.restarts, args.reply_ttl)
    cmd = f"python -m benchmarks.replicas --restarts {args.restarts} --reply-ttl {args.reply_ttl}"
    print(res)
    print(f"saved {save('replicas', res, cmd)}")


if __name__ == "__main__":
    main()
