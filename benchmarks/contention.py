"""In-process extraction beside a small CPU load: why the service loses more than the load uses.

On a 2-core machine the worker's torch forward runs two OpenMP threads; every other process
(the API, Redis, the load client) takes turns on those cores. Each parallel region ends at a
barrier, so a preempted thread stalls its partner: losing a slice of one core costs the
forward about twice that. This script measures it directly. A "noise" process busy-loops for
``busy`` ms, then sleeps ``idle`` ms (about what an API process spends per request in
distributed mode, docs/performance.md); the tiny chain extracts the same 192 UniRef90
sequences with and without it, interleaved, with torch running 2 threads and 1 thread
(RDSERVE_THREADS / --threads): what the threads setting trades.

    python -m benchmarks.contention [--reps 3] [--quick]   # → benchmarks/results/contention.json
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import (
    RESULTS,
    fmt_range,
    interleaved,
    ratio_summary,
    save,
    summary,
    tiny_esm2,
    uniref,
)
from benchmarks.extraction import artifact_for
from models.embedder import Embedder
from models.extract import Pooling
from models.families import build_chain

NOISE_LOOP = """
import sys, time
busy, idle = float(sys.argv[1]) / 1000, float(sys.argv[2]) / 1000
while True:
    t = time.perf_counter()
    while time.perf_counter() - t < busy:
        pass
    time.sleep(idle)
"""

#: (busy ms, idle ms) of the noise process; its share of one core is busy / (busy + idle).
NOISE = {"none": None, "17% of a core": (1.0, 5.0), "33% of a core": (1.0, 2.0)}
#: torch intra-op threads of each arm (the machine's cores, and one).
THREADS = (2, 1)


def arm_name(threads: int, noise: str) -> str:
    return f"{threads} thread{'s' if threads > 1 else ''}, {noise}"


def run(reps: int = 3, n_seqs: int = 192) -> dict[str, Any]:
    refs = [str(tiny_esm2(h)) for h in (32, 48, 64)]
    family = build_chain("esm2", models=refs, device="cpu")
    art = artifact_for(family, refs, "svc-" + "-".join(lv.name for lv in family.levels))
    embedder = Embedder(family, art)
    seqs = uniref(max_len=1022, seed=11)[:n_seqs]
    residues = sum(map(len, seqs))
    stop = len(art.levels) - 1
    arms = {arm_name(t, n): (t, n) for t in THREADS for n in NOISE}
    cpu: dict[str, list[float]] = {name: [] for name in arms}

    def arm(name: str) -> float:
        threads, noise_name = arms[name]
        torch.set_num_threads(threads)
        spec = NOISE[noise_name]
        noise = (
            subprocess.Popen([sys.executable, "-c", NOISE_LOOP, *map(str, spec)]) if spec else None
        )
        try:
            time.sleep(0.2)
            t0, c0 = time.perf_counter(), time.process_time()
            embedder.compute(seqs, stop=stop, pooling=Pooling.mean)
            wall = time.perf_counter() - t0
            cpu[name].append(1000 * (time.process_time() - c0) / residues)
        finally:
            if noise is not None:
                noise.kill()
                noise.wait()
        return residues / wall

    rates = interleaved({name: (lambda n=name: arm(n)) for name in arms}, reps)
    return {
        "chain": [lv.name for lv in art.levels],
        "sequences": len(seqs),
        "residues": residues,
        "noise_busy_idle_ms": NOISE,
        "threads": list(THREADS),
        "residues_per_s": {n: summary(v) for n, v in rates.items()},
        "over_quiet": {
            n: ratio_summary(v, rates[arm_name(arms[n][0], "none")]) for n, v in rates.items()
        },
        "one_over_two_threads": {
            noise: ratio_summary(rates[arm_name(1, noise)], rates[arm_name(2, noise)])
            for noise in NOISE
        },
        # interleaved() runs each arm once first as warm-up: keep the measured repetitions only.
        "cpu_s_per_1k_residues": {n: summary(v[-reps:]) for n, v in cpu.items()},
    }


def markdown(res: dict[str, Any]) -> str:
    lines = [
        f"**Contention** (tiny chain, {res['sequences']} sequences, {res['residues']:,} residues)",
        "",
        "| threads, beside the forward | residues/s | / quiet (same threads) | forward CPU s per 1k residues |",
        "|---|---|---|---|",
    ]
    for n in res["residues_per_s"]:
        lines.append(
            f"| {n} | {fmt_range(res['residues_per_s'][n], ',.0f')} | "
            f"{fmt_range(res['over_quiet'][n])} | "
            f"{fmt_range(res['cpu_s_per_1k_residues'][n], '.3f')} |"
        )
    lines += ["", "| beside the forward | 1 thread / 2 threads (residues/s) |", "|---|---|"]
    for noise, r in res.get("one_over_two_threads", {}).items():
        lines.append(f"| {noise} | {fmt_range(r)} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="1 repetition, 16 sequences (smoke)")
    ap.add_argument("--results-dir", type=Path, default=RESULTS)
    args = ap.parse_args()
    res = run(1, 16) if args.quick else run(args.reps)
    name = "contention-quick" if args.quick else "contention"
    command = "python -m benchmarks.contention " + (
        "--quick" if args.quick else f"--reps {args.reps}"
    )
    path = save(name, res, command, args.results_dir)
    print(markdown(res) + f"\n\n_{path.name}_")


if __name__ == "__main__":
    main()
