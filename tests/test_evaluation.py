"""ProteinGym evaluation: the probe on synthetic data, folds, the embedding cache, the CLI."""

from __future__ import annotations

import csv
import random
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from models.artifact import load_artifact
from models.evaluation.assays import (
    PreparedAssays,
    assay_folds,
    find_assays,
    prepare_assays,
    read_assay,
    subsample,
)
from models.evaluation.folds import FoldScheme, random_folds
from models.evaluation.probe import fold_spearmans, probe_score
from models.evaluation.proteingym import (
    EvalSettings,
    PooledChain,
    configurations,
    rd_from_raw,
    run_proteingym,
    truncation_dims,
)
from models.evaluation.report import comparisons
from models.evaluation.stats import win_rate
from models.extract import Extractor, ForwardStats
from models.families import build_chain
from models.projection import Projector
from tests.helpers import random_protein

AA = "ACDEFGHIKLMNPQRSTVWY"


def write_assay(path: Path, length: int, n: int, seed: int, folds: bool) -> Path:
    """n single mutants of a random wild type; score = a per-residue lookup + noise."""
    rng = random.Random(seed)
    wt = random_protein(rng, length, length)
    value = {a: rng.gauss(0, 1) for a in AA}
    rows, seen = [], set()
    while len(rows) < n:
        pos, aa = rng.randrange(length), rng.choice(AA)
        if aa == wt[pos] or (pos, aa) in seen:
            continue
        seen.add((pos, aa))
        mut = wt[:pos] + aa + wt[pos + 1 :]
        row = {
            "mutant": f"{wt[pos]}{pos + 1}{aa}",
            "mutated_sequence": mut,
            "DMS_score": f"{value[aa] + rng.gauss(0, 0.3):.4f}",
        }
        if folds:
            row["fold_random_5"] = str(len(rows) % 5)
        rows.append(row)
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return path


RANDOM = FoldScheme.random


def quick(max_len: int, max_variants: int | None, seed: int, **kw: object) -> EvalSettings:
    """Settings of a fast run: the random scheme only unless told otherwise."""
    return EvalSettings(max_len, max_variants, seed, **{"schemes": (RANDOM,), **kw})


def prepare(paths: list[Path], settings: EvalSettings) -> PreparedAssays:
    return prepare_assays(
        paths, settings.schemes, settings.max_len, settings.max_variants, settings.seed
    )


def run(paths: list[Path], pooled: PooledChain, projector, settings: EvalSettings, **kw):
    """Check and subsample the assay files, then probe them (what the CLI does)."""
    return run_proteingym(prepare(paths, settings), pooled, projector, settings, **kw)


@pytest.fixture(scope="module")
def assay_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("assays")
    write_assay(d / "AAA_TEST_folds.csv", 30, 60, seed=1, folds=True)
    write_assay(d / "BBB_TEST_random.csv", 24, 50, seed=2, folds=False)
    write_assay(d / "CCC_TEST_long.csv", 80, 20, seed=3, folds=False)
    return d


# -- the probe ---------------------------------------------------------------------------------


def test_probe_finds_a_linear_signal_and_not_noise():
    rng = np.random.default_rng(0)
    n = 250
    x = rng.normal(size=(n, 10))
    y = x @ rng.normal(size=10) + 0.1 * rng.normal(size=n)
    folds = random_folds(n, seed=0)
    assert probe_score(x, y, folds) > 0.95
    noise = rng.normal(size=(n, 10))
    assert abs(probe_score(noise, y, folds)) < 0.25
    # Informative columns buried among many noise columns: the inner CV picks a useful alpha.
    mixed = np.hstack([x, rng.normal(size=(n, 150))])
    assert probe_score(mixed, y, folds) > 0.8


def test_one_spearman_per_fold_label():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(40, 3))
    y = x[:, 0]
    folds = np.repeat([3, 7, 9, 11], 10)  # labels need not be 0…4
    assert fold_spearmans(x, y, folds).shape == (4,)


def test_random_folds_are_seeded_balanced_and_reproducible():
    a, b = random_folds(103, seed=5), random_folds(103, seed=5)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, random_folds(103, seed=6))
    assert sorted(np.bincount(a)) == [20, 20, 21, 21, 21]


def test_file_folds_are_used_and_follow_the_subsample(assay_dir):
    full = read_assay(assay_dir / "AAA_TEST_folds.csv")
    folds, source = assay_folds(full, FoldScheme.random, seed=0)
    assert source == "file"
    assert np.array_equal(folds, np.arange(60) % 5)  # exactly the column
    sub = subsample(full, 25, seed=0)
    assert len(sub) == 25 and sub.n_total == 60
    sub_folds, _ = assay_folds(sub, FoldScheme.random, seed=0)
    for m, f in zip(sub.mutants, sub_folds, strict=True):
        assert f == full.folds[FoldScheme.random][full.mutants.index(m)]
    # Seeded and in file order.
    again = subsample(full, 25, seed=0)
    assert again.mutants == sub.mutants
    assert [full.mutants.index(m) for m in sub.mutants] == sorted(
        full.mutants.index(m) for m in sub.mutants
    )
    _, src = assay_folds(read_assay(assay_dir / "BBB_TEST_random.csv"), FoldScheme.random, 0)
    assert src == "built: random(seed=0)"


def test_bad_assay_files_say_what_is_wrong(tmp_path):
    p = tmp_path / "x.csv"
    p.write_text("mutant,DMS_score\nA1C,0.5\n")
    with pytest.raises(ValueError, match="missing column"):
        read_assay(p)
    with pytest.raises(FileNotFoundError):
        find_assays([tmp_path / "nope"])


def test_configurations_and_comparisons():
    assert truncation_dims([64, 256, 1900]) == [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 1900]
    names = [c.name for c in configurations([64, 256, 1900])]
    assert names[:6] == ["raw-64", "raw-256", "raw-1900", "rd-64", "rd-256", "rd-1900"]
    pairs = comparisons([64, 256, 1900])
    # The paper's four win rates are among them.
    for p in [
        ("rd-256", "raw-256"),
        ("rd-1900", "raw-1900"),
        ("rd-1900", "rd-256"),
        ("raw-1900", "raw-256"),
    ]:
        assert p in pairs
    assert win_rate(np.array([1.0, 0.0, 2.0]), np.array([0.0, 0.0, 1.0])) == pytest.approx(
        66.667, 1e-3
    )


# -- embeddings, cache, bookkeeping ------------------------------------------------------------


@pytest.fixture(scope="module")
def chain(tiny_artifact, tmp_path_factory):
    art = load_artifact(tiny_artifact)
    family = build_chain("esm2", levels=list(art.levels), device="cpu")
    cache = tmp_path_factory.mktemp("emb-cache")
    return PooledChain(Extractor(family, token_budget=1024), cache), Projector(art)


def test_second_run_does_no_forwards_and_gives_the_same_scores(chain, assay_dir):
    pooled, projector = chain
    paths = find_assays([assay_dir])
    settings = quick(60, 40, 0)
    forwards: list[ForwardStats] = []
    first = run(paths, pooled, projector, settings, observer=forwards.append)
    n_levels = len(projector.dims)
    assert forwards and {f.level for f in forwards} == set(range(n_levels))
    # One pass of the chain: each batch runs every level exactly once.
    assert len(forwards) % n_levels == 0
    assert [r.cached for r in first.results] == [False, False]
    assert first.skipped == [("CCC_TEST_long", "wild type 80 aa > max-len 60")]

    forwards.clear()
    second = run(paths, pooled, projector, settings, observer=forwards.append)
    assert forwards == []
    assert [r.cached for r in second.results] == [True, True]
    for a, b in zip(first.results, second.results, strict=True):
        assert a.scores == b.scores
        assert a.forward_seconds == b.forward_seconds > 0  # the cost is kept with the entry

    # Another subsample is another cache entry (forwards again).
    run(paths, pooled, projector, quick(60, 30, 0), observer=forwards.append)
    assert forwards


def test_another_artifact_of_the_same_chain_reuses_the_cache(
    chain, assay_dir, tiny_esm_dirs, fit_sequences
):
    from models.fit import fit_artifact
    from models.rd import Regressor

    pooled, projector = chain
    paths = [assay_dir / "AAA_TEST_folds.csv"]
    settings = quick(60, 40, 0)
    run(paths, pooled, projector, settings)  # make sure the entry exists
    family = build_chain("esm2", models=[str(p) for p in tiny_esm_dirs], device="cpu")
    ols = fit_artifact(family, fit_sequences[:20], Regressor.ols, token_budget=4096)
    forwards: list[ForwardStats] = []
    ev = run(paths, pooled, Projector(ols), settings, observer=forwards.append)
    assert forwards == [] and ev.results[0].cached


def test_end_to_end_on_assays_whose_answer_is_known(chain, tmp_path):
    """Scores that are an exact linear function of the first level's pooled embedding: the
    configurations that contain that level rank the variants almost perfectly through the whole
    harness (subsample, folds, cache, RD projection, probe); the same scores shuffled give none."""
    pooled, projector = chain
    src = write_assay(tmp_path / "src.csv", 40, 100, seed=7, folds=False)
    with open(src, newline="") as fh:
        rows = list(csv.DictReader(fh))
    first_level = pooled.compute([r["mutated_sequence"] for r in rows])[0]
    y = first_level @ np.random.default_rng(0).normal(size=first_level.shape[1])
    known = tmp_path / "known"
    known.mkdir()
    for name, scores in (
        ("KNOWN_TEST", y),
        ("SHUFFLED_TEST", np.random.default_rng(1).permutation(y)),
    ):
        with open(known / f"{name}.csv", "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=["mutant", "mutated_sequence", "DMS_score"])
            w.writeheader()
            w.writerows({**r, "DMS_score": f"{v:.9g}"} for r, v in zip(rows, scores, strict=True))
    ev = run(find_assays([known]), pooled, projector, quick(60, 100, 0))
    scores = {r.name: r.scores[RANDOM] for r in ev.results}
    d1, dn = projector.dims[0], projector.dims[-1]
    assert scores["KNOWN_TEST"][f"raw-{d1}"] > 0.95
    assert scores["KNOWN_TEST"][f"rd-{dn}"] > 0.8  # its first d1 dims are exactly raw-d1
    # The truncation curve climbs to the full signal at k = d1.
    assert scores["KNOWN_TEST"]["trunc-1"] < 0.7 < scores["KNOWN_TEST"][f"trunc-{d1}"]
    assert abs(scores["SHUFFLED_TEST"][f"raw-{d1}"]) < 0.35


def test_rd_at_the_first_level_is_the_raw_first_level(chain, assay_dir):
    pooled, projector = chain
    assay = subsample(read_assay(assay_dir / "AAA_TEST_folds.csv"), 40, 0)
    raw = pooled.compute(assay.sequences)
    rd = rd_from_raw(projector, raw)
    d1 = projector.dims[0]
    assert rd.shape == (40, projector.dims[-1])
    assert np.array_equal(rd[:, :d1], raw[0])
    ev = run([assay_dir / "AAA_TEST_folds.csv"], pooled, projector, quick(60, 40, 0))
    s = ev.results[0].scores[RANDOM]
    assert s[f"rd-{d1}"] == s[f"raw-{d1}"] == s[f"trunc-{d1}"]
    assert s[f"rd-{projector.dims[-1]}"] == s[f"trunc-{projector.dims[-1]}"]


def test_pooled_rd_equals_mean_of_per_residue_rd(chain, assay_dir, tiny_artifact):
    """The affine shortcut: RD of pooled raw outputs = pooled per-residue RD embeddings."""
    from models.embedder import Embedder
    from models.extract import Pooling

    pooled, projector = chain
    seqs = read_assay(assay_dir / "BBB_TEST_random.csv").sequences[:6]
    rd = rd_from_raw(projector, pooled.compute(seqs))
    emb = Embedder(pooled.family, load_artifact(tiny_artifact), token_budget=1024)
    per_res, _ = emb.embed(seqs, projector.dims[-1], Pooling.per_residue)
    want = np.stack([r.mean(axis=0) for r in per_res])
    np.testing.assert_allclose(rd, want, rtol=1e-4, atol=1e-4)


# -- the CLI -----------------------------------------------------------------------------------


def test_cli_writes_reports_for_three_schemes_with_baselines_and_a_manifest_beside(
    tiny_artifact, assay_dir, fit_sequences, tmp_path
):
    """Items 1–4 through the CLI: a manifest.csv beside the assays is noted and left out (the
    run does not fail after its work), every scheme is reported with paired statistics, and the
    PCA baselines are fitted on the artifact's own fitting sequences."""
    import shutil

    from app.cli import cli

    assays = tmp_path / "assays"
    assays.mkdir()
    for f in ("AAA_TEST_folds.csv", "BBB_TEST_random.csv", "CCC_TEST_long.csv"):
        shutil.copy(assay_dir / f, assays / f)
    (assays / "manifest.csv").write_text("DMS_id,file,n_variants\nAAA_TEST_folds,x.csv,60\n")
    fasta = tmp_path / "fit.fasta"
    fasta.write_text("".join(f">s{i}\n{q}\n" for i, q in enumerate(fit_sequences)))
    out = tmp_path / "out"
    args = [
        "eval",
        "proteingym",
        "--artifact",
        str(tiny_artifact),
        "--assays",
        str(assays),
        "--fit-fasta",
        str(fasta),
        "--probe",
        "spearman-cv",
        "--max-len",
        "60",
        "--max-variants",
        "40",
        "--seed",
        "3",
        "--out-dir",
        str(out),
        "--name",
        "tiny",
        "--device",
        "cpu",
        "--token-budget",
        "1024",
        "--embeddings-cache",
        str(tmp_path / "cache"),
    ]
    r = CliRunner().invoke(cli, args)
    assert r.exit_code == 0, r.output
    assert "manifest.csv: not an assay" in r.output
    md, table, png, paired_png = (out / f"tiny{e}" for e in (".md", ".csv", ".png", "-paired.png"))
    for p in (png, paired_png):
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = list(csv.DictReader(table.open()))
    dims = load_artifact(tiny_artifact).dims
    assert list(rows[0]) == [
        "assay", "scheme", "fold_source", "config", "kind", "dim", "spearman", "n_variants"
    ]  # fmt: skip
    assert len(rows) == 2 * 3 * len(configurations(dims, baselines=True))
    assert {r["assay"] for r in rows} == {"AAA_TEST_folds", "BBB_TEST_random"}
    assert {r["n_variants"] for r in rows} == {"40"}
    assert {r["scheme"] for r in rows} == {s.value for s in FoldScheme}
    sources = {(r["assay"], r["scheme"]): r["fold_source"] for r in rows}
    assert sources[("AAA_TEST_folds", "fold_random_5")] == "file"
    assert sources[("AAA_TEST_folds", "fold_modulo_5")] == "built: position mod 5"
    assert sources[("BBB_TEST_random", "fold_random_5")] == "built: random(seed=3)"
    by = {(r["assay"], r["scheme"], r["config"]): r["spearman"] for r in rows}
    for key in {(r["assay"], r["scheme"]) for r in rows}:
        assert by[(*key, f"rd-{dims[0]}")] == by[(*key, f"raw-{dims[0]}")]
    text = md.read_text()
    assert load_artifact(tiny_artifact).sha256 in text
    for scheme in FoldScheme:
        assert f"## `{scheme.value}`" in text
    assert f"`rd-{dims[-1]}` > `raw-{dims[-1]}`" in text
    assert f"`rd-{dims[-1]}` > `pca-concat-{dims[-1]}`" in text
    assert "fitted on the same 120 sequences as the artifact" in text
    assert "manifest.csv: not an assay" in text
    assert "assays needed" in text and "95% CI" in text
    assert "CCC_TEST_long" in text and "--max-variants 40 --seed 3" in text
    assert "rdserve eval proteingym" in text and "--fit-fasta" in text
    assert "`--probe spearman-cv`" in text and "α chosen by inner leave-one-out CV" in text


def test_cli_rejects_a_missing_assay_path(tiny_artifact, tmp_path):
    from app.cli import cli

    r = CliRunner().invoke(
        cli,
        ["eval", "proteingym", "--artifact", str(tiny_artifact), "--assays", str(tmp_path / "x")],
    )
    assert r.exit_code == 2
    assert "no such assay" in r.output


def test_cache_key_follows_local_weights_rewritten_in_place(chain, assay_dir):
    import os

    pooled, _ = chain
    seqs = read_assay(assay_dir / "AAA_TEST_folds.csv").sequences[:5]
    before = pooled.cache_key(seqs)
    weights = next(Path(pooled.family.levels[0].model_id).glob("*.safetensors"))
    st = weights.stat()
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    try:
        assert pooled.cache_key(seqs) != before
    finally:
        os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert pooled.cache_key(seqs) == before
