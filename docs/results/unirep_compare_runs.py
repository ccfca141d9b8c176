"""One markdown table comparing `rdserve eval proteingym` runs of several artifacts.

    .venv/bin/python docs/results/unirep_compare_runs.py \
        --run "pcr, 1,000" benchmarks/.cache/eval/unirep-rd-1k.safetensors \
              docs/results/unirep-proteingym.csv  [--run LABEL ARTIFACT CSV …]
"""

from __future__ import annotations

import argparse
import csv
from collections import defaultdict
from pathlib import Path

import numpy as np

from models.artifact import load_artifact
from models.evaluation.report import wilcoxon_p, win_rate


def read_scores(path: Path) -> dict[str, dict[str, float]]:
    """config → assay → Spearman ρ, from a report CSV."""
    out: dict[str, dict[str, float]] = defaultdict(dict)
    with open(path, newline="") as fh:
        for row in csv.DictReader(fh):
            out[row["config"]][row["assay"]] = float(row["spearman"])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", nargs=3, action="append", metavar=("LABEL", "ARTIFACT", "CSV"))
    args = ap.parse_args()
    header = [
        "artifact",
        "R² per step",
        "PCs kept",
        "raw-256",
        "rd-256",
        "raw-1900",
        "rd-1900",
        "rd-256 > raw-256",
        "rd-1900 > raw-1900",
    ]
    print("| " + " | ".join(header) + " |")
    print("| --- | --- | --- |" + " ---: |" * (len(header) - 3))
    for label, artifact, table in args.run:
        art = load_artifact(artifact)
        scores = read_scores(Path(table))
        assays = sorted(scores["raw-1900"])

        def col(name: str, assays: list[str] = assays, scores: dict = scores) -> np.ndarray:
            return np.array([scores[name][a] for a in assays])

        wins = []
        for d in (256, 1900):
            rd, raw = col(f"rd-{d}"), col(f"raw-{d}")
            p = wilcoxon_p(rd, raw)
            wins.append(
                f"{win_rate(rd, raw):.1f}% (Δρ {(rd - raw).mean():+.4f}, p {p:.2g})"
                if p is not None
                else "–"
            )
        print(
            f"| {label} (`{art.sha256[:12]}`) | "
            + ", ".join(f"{s.r2:.3f}" for s in art.stats)
            + " | "
            + ", ".join(str(s.components_kept) for s in art.stats)
            + " | "
            + " | ".join(f"{col(c).mean():.4f}" for c in header[3:7])
            + " | "
            + " | ".join(wins)
            + " |"
        )


if __name__ == "__main__":
    main()
