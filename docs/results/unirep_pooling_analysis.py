"""Why RD does (not) help a pooled DMS probe: measured on the cached pooled UniRep embeddings.

For each assay of an evaluation (same subsample, read from the embeddings cache, no forwards):

1. Between-variant variance that RD drops.  Step ℓ → ℓ+1 keeps the top d_{ℓ+1} − d_ℓ principal
   directions V of the *per-residue* residual r = x − W(h − m_h) − m_x; the rest, r − (rV ᵀ)V,
   is dropped.  Per residue that is (1 − appended var. explained)·(1 − R²) of Var(x).  For the
   pooled variants of one assay we measure ‖P⊥ r_c‖² / ‖x_c‖² (c: centred across variants).
2. Probe variants on the same folds: raw-d_n and rd-d_n without feature standardisation, and
   the concatenation [x_1, …, x_n] (everything RD-d_n is a linear map of).

    .venv/bin/python docs/results/unirep_pooling_analysis.py \
        --artifact benchmarks/.cache/eval/unirep-rd-1k.safetensors \
        --assays ../shared/data/proteingym/v1_cv_folds_singles \
        --assays ../shared/data/proteingym/v0.1_singles_converted \
        --max-variants 300 --embeddings-cache benchmarks/.cache/eval/embeddings
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from sklearn.linear_model import RidgeCV
from threadpoolctl import threadpool_limits

from models.artifact import load_artifact
from models.evaluation.assays import assay_folds, find_assays, read_assay, subsample
from models.evaluation.folds import FoldScheme
from models.evaluation.probe import ALPHAS, probe_score, spearman
from models.evaluation.proteingym import PooledChain, rd_from_raw
from models.extract import Extractor
from models.families import build_chain
from models.projection import Projector
from models.rd import StepParams


def dropped_share(h: np.ndarray, x: np.ndarray, step: StepParams) -> float:
    """‖P⊥ r_c‖² / ‖x_c‖²: between-variant variance of x outside [h, kept residual PCs]."""
    r = x - (h - step.input_mean) @ step.weight.T - step.output_mean - step.residual_mean
    v = step.components
    dropped = r - (r @ v.T) @ v
    dropped -= dropped.mean(axis=0)
    xc = x - x.mean(axis=0)
    return float((dropped**2).sum() / (xc**2).sum())


def unscaled_score(x: np.ndarray, y: np.ndarray, folds: np.ndarray) -> float:
    """The probe without standardisation: RidgeCV centres, the penalty sees raw scales.

    The α grid is ALPHAS × the mean feature variance of the training fold, the same grid as
    the standardised probe's in units of the data's scale.
    """
    out = []
    with threadpool_limits(limits=1, user_api="blas"):  # as in the probe: small matrices
        for f in np.unique(folds):
            test = folds == f
            scale = float(x[~test].var(axis=0).mean())
            model = RidgeCV(alphas=ALPHAS * scale).fit(x[~test], y[~test])
            out.append(spearman(model.predict(x[test]), y[test]))
    return float(np.mean(out))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--artifact", type=Path, required=True)
    ap.add_argument("--assays", type=Path, action="append", required=True)
    ap.add_argument("--max-len", type=int, default=600)
    ap.add_argument("--max-variants", type=int)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--embeddings-cache", type=Path, required=True)
    args = ap.parse_args()

    art = load_artifact(args.artifact)
    family = build_chain(art.family, levels=list(art.levels), device="cpu")  # loads nothing
    chain = PooledChain(Extractor(family), args.embeddings_cache)
    projector = Projector(art)
    dims = art.dims
    rows = []
    for path in find_assays(args.assays):
        full = read_assay(path)
        if full.length > args.max_len:
            continue
        assay = subsample(full, args.max_variants, args.seed)
        entry = chain.load_cached(assay.name, assay.sequences)
        if entry is None:
            raise SystemExit(f"{assay.name}: not in the embeddings cache; run the evaluation")
        raw = entry[0]
        rd = rd_from_raw(projector, raw)
        raw64 = [x.astype(np.float64) for x in raw]
        folds, _ = assay_folds(assay, FoldScheme.random, args.seed)
        shares = [
            dropped_share(rd[:, : dims[i]].astype(np.float64), raw64[i + 1], art.steps[i])
            for i in range(len(dims) - 1)
        ]
        y = assay.scores
        rows.append(
            [
                *shares,
                unscaled_score(raw64[-1], y, folds),
                unscaled_score(rd.astype(np.float64), y, folds),
                probe_score(np.hstack(raw64), y, folds),
            ]
        )
        print(assay.name, " ".join(f"{v:.4f}" for v in rows[-1]), flush=True)
    m = np.array(rows)
    per_res = [(1 - s.appended_variance_explained) * (1 - s.r2) for s in art.stats]
    print()
    print(f"| quantity ({len(rows)} assays) | mean | median | max |")
    print("| --- | ---: | ---: | ---: |")
    for i in range(len(dims) - 1):
        name = f"x_{dims[i + 1]} variance dropped by RD, pooled variants"
        col = m[:, i]
        print(f"| {name} | {col.mean():.4f} | {np.median(col):.4f} | {col.max():.4f} |")
        print(f"| same, per residue (fit data) | {per_res[i]:.4f} | | |")
    k = len(dims) - 1
    for j, name in enumerate(
        [f"raw-{dims[-1]} unstandardised", f"rd-{dims[-1]} unstandardised", "concat all levels"]
    ):
        col = m[:, k + j]
        print(f"| ρ {name} | {col.mean():.4f} | {np.median(col):.4f} | {col.max():.4f} |")


if __name__ == "__main__":
    main()
