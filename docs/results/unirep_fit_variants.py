"""Fit UniRep RD artifacts for several regressors and fitting-set sizes from ONE forward pass.

What ``rdserve fit --regressor R --max-seqs N`` does, for every N in SIZES and R in REGRESSORS,
without re-running the models: the joint per-residue moments of z = [x_64, x_256, x_1900] are
accumulated (with the same ``accumulate_moments`` as the CLI) on the disjoint prefixes
[0, 250), [250, 1000), [1000, 3000) of the FASTA file and merged (Chan et al.), so the moments
of the first N sequences are exact; every (N, R) is then solved in closed form.  Results equal
the CLI's up to float64 summation order (checked against the CLI's pcr-1000 artifact if given).

    .venv/bin/python docs/results/unirep_fit_variants.py \
        --fasta ../shared/data/sequences/uniref90_sample_10k.fasta \
        --out-dir benchmarks/.cache/eval [--check benchmarks/.cache/eval/unirep-rd-1k.safetensors]
"""

from __future__ import annotations

import argparse
import itertools
import time
from pathlib import Path

import numpy as np

from models.artifact import load_artifact, save_artifact
from models.extract import Extractor
from models.families import build_chain
from models.fit import accumulate_moments, solve_artifact
from models.moments import Moments
from models.rd import Regressor
from models.sequences import LongSequencePolicy, clean_sequences, read_fasta

SIZES = (250, 1000, 3000)
REGRESSORS = (Regressor.pcr, Regressor.ols, Regressor.ridge)


def merge(a: Moments, b: Moments) -> Moments:
    """Moments of the union: M₂ = M₂ᵃ + M₂ᵇ + δδᵀ·nₐn_b/n, m = mₐ + δ·n_b/n, δ = m_b − mₐ."""
    out = Moments(a.dim)
    out.n = a.n + b.n
    delta = b.mean - a.mean
    out.mean = a.mean + delta * (b.n / out.n)
    out.scatter = a.scatter + b.scatter + np.outer(delta, delta) * (a.n * b.n / out.n)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--fasta", type=Path, required=True)
    ap.add_argument("--out-dir", type=Path, required=True)
    ap.add_argument("--token-budget", type=int, default=8192)
    ap.add_argument("--alpha", type=float, default=1.0, help="ridge penalty (CLI default)")
    ap.add_argument("--check", type=Path, help="CLI-fitted pcr artifact on the first 1,000")
    args = ap.parse_args()

    seqs = clean_sequences(s for _, s in read_fasta(args.fasta, max(SIZES)))
    family = build_chain("unirep", models=["64", "256", "1900"], device="cpu")
    extractor = Extractor(family, args.token_budget)
    policy = LongSequencePolicy.truncate  # the CLI default (a no-op for UniRep: no limit)
    bounds = [0, *SIZES]
    total: Moments | None = None
    for lo, hi in itertools.pairwise(bounds):
        t0 = time.perf_counter()
        part = accumulate_moments(extractor, seqs[lo:hi], policy)
        total = part if total is None else merge(total, part)
        print(f"sequences {lo}–{hi}: {part.n:,} residues in {time.perf_counter() - t0:.0f} s")
        n_seqs = hi
        for reg in REGRESSORS:
            art = solve_artifact(
                family,
                total,
                seqs[:n_seqs],
                reg,
                args.alpha,
                policy,
                extractor.token_budget,
                args.fasta.name,
            )
            path = args.out_dir / f"unirep-rd-{n_seqs}-{reg}.safetensors"
            art = save_artifact(art, path)
            r2 = ", ".join(f"{s.r2:.4f}" for s in art.stats)
            print(f"  {path} sha256 {art.sha256[:16]}… R² {r2}")
            if args.check and n_seqs == 1000 and reg == Regressor.pcr:
                ref = load_artifact(args.check)
                # W and the means are unique; trailing components of near-equal eigenvalues
                # may rotate within their eigenspace, so they are not compared entry-wise.
                diff = max(
                    float(np.abs(getattr(a, f) - getattr(b, f)).max())
                    for a, b in zip(ref.steps, art.steps, strict=True)
                    for f in ("weight", "input_mean", "output_mean")
                )
                r2 = ", ".join(f"{s.r2:.6f}" for s in ref.stats)
                print(f"  vs {args.check}: max |Δ| of W, means {diff:.2e}; its R² {r2}")


if __name__ == "__main__":
    main()
