"""Cold start: wall time from `rdserve serve` process start to 200 on /health/ready."""

from __future__ import annotations

import time
import uuid
from typing import Any

from benchmarks.common import CACHE, fmt_range, interleaved, procs, summary
from benchmarks.extraction import artifact_for
from benchmarks.service import REDIS_URL, chains
from models.families import build_chain


def start_to_ready(artifact: str, distributed: bool) -> float:
    port = procs.free_port()
    env = {"RDSERVE_ARTIFACT": artifact, "RDSERVE_DEVICE": "cpu", "RDSERVE_LOG_LEVEL": "warning"}
    logs = CACHE / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    running: list[procs.Proc] = []
    prefix = f"rdserve-bench-{uuid.uuid4().hex[:8]}"
    t0 = time.perf_counter()
    if distributed:
        env |= {"RDSERVE_REDIS_URL": REDIS_URL, "RDSERVE_REDIS_PREFIX": prefix}
        running.append(
            procs.rdserve("worker", "--metrics-port", "0", env=env, log=logs / f"{prefix}-w.log")
        )
    running.append(
        procs.rdserve("serve", "--port", str(port), env=env, log=logs / f"{prefix}-api.log")
    )
    try:
        procs.wait_http(f"http://127.0.0.1:{port}/health/ready", running[-1], timeout=300)
        return time.perf_counter() - t0
    finally:
        for p in running:
            p.stop()
        if distributed:
            procs.clear_prefix(REDIS_URL, prefix)


def run(reps: int = 3, quick: bool = False) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, (refs, _) in chains(quick).items():
        family = build_chain("esm2", models=refs, device="cpu")
        tag = "svc-" + "-".join(lv.name for lv in family.levels)
        artifact_for(family, refs, tag)
        path = str(CACHE / f"{tag}.safetensors")
        times = interleaved(
            {
                "embedded": lambda p=path: start_to_ready(p, False),
                "distributed": lambda p=path: start_to_ready(p, True),
            },
            reps,
            warmup=False,
        )
        out[name] = {mode: summary(ts) for mode, ts in times.items()}
    return {"chains": out}


QUICK = {"reps": 1}


def markdown(res: dict[str, Any]) -> str:
    lines = [
        "**Cold start** (process start → /health/ready 200, warm-up included)",
        "",
        "| chain | embedded (s) | distributed: API + 1 worker (s) |",
        "|---|---|---|",
    ]
    for chain, r in res["chains"].items():
        lines.append(f"| {chain} | {fmt_range(r['embedded'])} | {fmt_range(r['distributed'])} |")
    return "\n".join(lines)
