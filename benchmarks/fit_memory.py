"""Fit time and peak memory vs number of fitting sequences (each N in a fresh process)."""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time
from typing import Any

from benchmarks.common import REPO, random_esm2


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def _peak_mb() -> float:
    """This process's peak RSS (VmHWM).

    Not getrusage's ru_maxrss: Linux carries that across fork and exec, so a child started by a
    large parent reports the parent's size as its own peak.
    """
    with open("/proc/self/status") as f:
        kb = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
    return kb / 1024


def child(n: int, refs: list[str]) -> dict[str, Any]:
    """Runs inside the fresh process: load models and data, then fit, recording memory."""
    from benchmarks.common import uniref
    from models.families import build_chain
    from models.fit import fit_artifact

    family = build_chain("esm2", models=refs, device="cpu")
    for i in range(len(family.levels)):
        family.load(i)
    seqs = uniref(n, max_len=1022, seed=3)
    before = _rss_mb()
    t0 = time.perf_counter()
    art = fit_artifact(family, seqs)
    took = time.perf_counter() - t0
    peak = _peak_mb()
    return {
        "sequences": n,
        "residues": art.fitting["n_residues"],
        "seconds": took,
        "rss_before_fit_mb": before,
        "peak_rss_mb": peak,
        "fit_growth_mb": peak - before,
    }


def run(ns: tuple[int, ...] = (500, 1000, 2000, 4000), quick: bool = False) -> dict[str, Any]:
    layers = 1
    refs = [str(random_esm2("8M", layers=layers)), str(random_esm2("35M", layers=layers))]
    rows = []
    for n in ns:
        out = subprocess.run(
            [sys.executable, "-m", "benchmarks.fit_memory", str(n), *refs],
            capture_output=True,
            text=True,
            cwd=REPO,
            check=True,
        )
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    small, big = rows[0], rows[-1]
    return {
        "model": f"esm2 8M → 35M widths (320, 480), {layers} layer each, random weights",
        "runs": rows,
        "peak_ratio_largest_over_smallest": big["peak_rss_mb"] / small["peak_rss_mb"],
        "growth_mb_largest_minus_smallest": big["fit_growth_mb"] - small["fit_growth_mb"],
    }


def markdown(res: dict[str, Any]) -> str:
    lines = [
        f"**Fit memory** — {res['model']} (fresh process per N)",
        "",
        "| sequences | residues | fit time (s) | peak RSS (MB) | growth during fit (MB) |",
        "|---|---|---|---|---|",
    ]
    for r in res["runs"]:
        lines.append(
            f"| {r['sequences']:,} | {r['residues']:,} | {r['seconds']:.1f} | "
            f"{r['peak_rss_mb']:.0f} | {r['fit_growth_mb']:.0f} |"
        )
    lines.append(
        f"\nPeak RSS, largest / smallest N (target ≤ 1.10): "
        f"**{res['peak_ratio_largest_over_smallest']:.3f}**"
    )
    return "\n".join(lines)


QUICK = {"ns": (20, 40)}

if __name__ == "__main__":
    print(json.dumps(child(int(sys.argv[1]), sys.argv[2:])))
