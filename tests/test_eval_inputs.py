"""Evaluation inputs (issue 18 items 1–2): every assay file checked before any model runs,
non-assay CSVs left out with a note, and ProteinGym's three fold schemes."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from models.evaluation.assays import (
    assay_folds,
    find_assays,
    prepare_assays,
    read_assay,
    subsample,
    with_position_folds,
)
from models.evaluation.folds import (
    ALL_SCHEMES,
    FoldScheme,
    contiguous_folds,
    modulo_folds,
    parse_mutant,
    parse_schemes,
)
from tests.helpers import SHARED

V1 = SHARED / "proteingym" / "v1_cv_folds_singles"
WT = "MKTAYIAKQRQISFVKSHFSRQLEERLGLIEVQAPILSRVGDGTQDNLSGAEKAVQVKVKALPDAQFEVVHSLAKWKRQTLGQHDF"


def write_rows(path: Path, rows: list[dict[str, str]]) -> Path:
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return path


def singles(n: int, wt: str = WT, step: int = 1) -> list[dict[str, str]]:
    """n single substitutions of wt at positions 1, 1 + step, …, scored by position."""
    rows = []
    for i in range(n):
        pos = (i * step) % len(wt) + 1
        mut = "A" if wt[pos - 1] != "A" else "G"
        rows.append(
            {
                "mutant": f"{wt[pos - 1]}{pos}{mut}",
                "mutated_sequence": wt[: pos - 1] + mut + wt[pos:],
                "DMS_score": str(0.01 * pos + 0.1 * (i % 3)),
            }
        )
    return rows


def test_a_manifest_beside_the_assays_is_noted_and_left_out(tmp_path):
    write_rows(tmp_path / "GOOD_A.csv", singles(30))
    write_rows(tmp_path / "GOOD_B.csv", singles(30, step=2))
    (tmp_path / "manifest.csv").write_text("DMS_id,file,n_variants\nGOOD_A,GOOD_A.csv,30\n")
    (tmp_path / "empty.csv").write_text("")
    prepared = prepare_assays(find_assays([tmp_path]), ALL_SCHEMES, 600, None, 0)
    assert [a.name for a in prepared.assays] == ["GOOD_A", "GOOD_B"]
    assert len(prepared.notes) == 2
    assert prepared.notes[1].startswith("manifest.csv: not an assay")
    assert "DMS_id, file, n_variants" in prepared.notes[1]


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda rows: rows[7].pop("DMS_score"), "missing column"),
        (lambda rows: rows[7].update(mutant="K2Q"), r"row 8 \(K2Q\): mutated_sequence has"),
        (lambda rows: rows[7].update(mutant="M99999A"), "past the sequence"),
        (lambda rows: rows[7].update(mutant="2A"), "not of the form H24C"),
        (
            lambda rows: rows[7].update(mutated_sequence=rows[7]["mutated_sequence"][:-1]),
            r"row 8 .*residues, row 1 has",
        ),
        (  # a second difference from the wild type that the mutant does not name
            lambda rows: rows[7].update(mutated_sequence="W" + rows[7]["mutated_sequence"][1:]),
            r"row 8 .*wild type differs from row 1's at position 1",
        ),
        (lambda rows: rows[7].update(mutated_sequence="MKTJ" + WT[4:]), "invalid residue"),
    ],
)
def test_every_bad_file_fails_at_once_naming_file_and_row(tmp_path, edit, message):
    rows = singles(30, step=3)
    edit(rows)
    for r in rows:  # a dropped column must be dropped from every row
        if "DMS_score" not in rows[7]:
            r.pop("DMS_score", None)
    write_rows(tmp_path / "GOOD.csv", singles(30))
    bad = write_rows(tmp_path / "BAD.csv", rows)
    with pytest.raises(ValueError, match=message) as e:
        prepare_assays(find_assays([tmp_path]), ALL_SCHEMES, 600, None, 0)
    assert str(bad) in str(e.value) and "nothing was run" in str(e.value)


def test_cli_reports_bad_assays_before_loading_any_model(tmp_path):
    """The artifact does not even exist: the assay error comes first, naming the file."""
    from app.cli import cli

    write_rows(tmp_path / "GOOD.csv", singles(30))
    write_rows(tmp_path / "ZZZ_LAST.csv", [{**r, "mutant": "Q1A"} for r in singles(30)])
    r = CliRunner().invoke(
        cli,
        [
            "eval",
            "proteingym",
            "--artifact",
            str(tmp_path / "missing.safetensors"),
            "--assays",
            str(tmp_path),
        ],
    )
    assert r.exit_code == 2
    assert "ZZZ_LAST.csv: row 2 (Q1A)" in r.output and "nothing was run" in r.output


def test_cli_rejects_an_unknown_fold_scheme(tmp_path):
    from app.cli import cli

    write_rows(tmp_path / "GOOD.csv", singles(30))
    r = CliRunner().invoke(
        cli,
        ["eval", "proteingym", "--artifact", "x", "--assays", str(tmp_path), "--folds", "blocks"],
    )
    assert r.exit_code == 2 and "unknown fold scheme 'blocks'" in r.output


# -- fold schemes ------------------------------------------------------------------------------


def test_scheme_names():
    assert parse_schemes("all") == list(ALL_SCHEMES)
    assert parse_schemes("contiguous,random") == [FoldScheme.random, FoldScheme.contiguous]
    assert parse_schemes(["fold_modulo_5"]) == [FoldScheme.modulo]
    assert parse_mutant("H24C:A25D") == [("H", 24, "C"), ("A", 25, "D")]


def test_position_folds_follow_proteingym_definitions():
    positions = np.array([3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 14, 3])
    assert modulo_folds(positions).tolist() == [p % 5 for p in positions]
    # 12 distinct positions 3 … 14 → contiguous segments of 3, 3, 2, 2, 2
    want = {3: 0, 4: 0, 5: 0, 6: 1, 7: 1, 8: 1, 9: 2, 10: 2, 11: 3, 12: 3, 13: 4, 14: 4}
    assert contiguous_folds(positions).tolist() == [want[p] for p in positions]
    with pytest.raises(ValueError, match="need ≥ 5"):
        contiguous_folds(np.array([1, 2, 3, 4, 4]))


@pytest.mark.skipif(not V1.is_dir(), reason="shared ProteinGym v1 assays not present")
def test_built_folds_equal_proteingyms_columns_on_real_assays():
    """Modulo equals the file column on every v1 assay; contiguous on the non-Tsuboyama ones
    (the Tsuboyama files' contiguous column is not contiguous in position)."""
    checked = 0
    for path in sorted(V1.glob("*.csv")):
        a = read_assay(path)
        assert a.positions is not None
        assert np.array_equal(modulo_folds(a.positions), a.folds[FoldScheme.modulo])
        if "Tsuboyama" not in path.name:
            assert np.array_equal(contiguous_folds(a.positions), a.folds[FoldScheme.contiguous])
            checked += 1
    assert checked >= 4


def test_built_folds_are_position_disjoint_and_follow_the_subsample(tmp_path):
    rows = singles(60, step=7)
    rows += [
        {**r, "mutant": r["mutant"][:-1] + "C", "DMS_score": "0.5"} for r in singles(60, step=7)
    ]
    for r in rows[60:]:
        pos = int(r["mutant"][1:-1])
        r["mutated_sequence"] = WT[: pos - 1] + "C" + WT[pos:]
    path = write_rows(tmp_path / "TWICE.csv", rows)
    full = with_position_folds(read_assay(path), ALL_SCHEMES)
    assert full.fold_sources == {
        FoldScheme.modulo: "built: position mod 5",
        FoldScheme.contiguous: "built: 5 contiguous position segments",
    }
    for scheme in (FoldScheme.modulo, FoldScheme.contiguous):
        folds = full.folds[scheme]
        for f in range(5):  # no position in two folds
            assert not set(full.positions[folds == f]) & set(full.positions[folds != f])
    sub = subsample(full, 40, seed=0)
    labels, source = assay_folds(sub, FoldScheme.contiguous, 0)
    assert source == "built: 5 contiguous position segments"
    for m, f in zip(sub.mutants, labels, strict=True):  # built on the full assay, then cut
        assert f == full.folds[FoldScheme.contiguous][full.mutants.index(m)]


def test_position_folds_of_multiple_mutants_need_the_file_columns(tmp_path):
    rows = singles(30)
    rows[0]["mutant"] = f"{rows[0]['mutant']}:K2Q"
    rows[0]["mutated_sequence"] = rows[0]["mutated_sequence"][0] + "Q" + WT[2:]
    rows[0]["mutated_sequence"] = WT[0] + "Q" + WT[2:]
    rows[0]["mutant"] = "K2Q"
    rows[1]["mutant"] = "M1A:K2Q"
    rows[1]["mutated_sequence"] = "AQ" + WT[2:]
    path = write_rows(tmp_path / "MULTI.csv", rows)
    assert read_assay(path).positions is None
    prepare_assays([path], [FoldScheme.random], 600, None, 0)  # random needs no positions
    with pytest.raises(ValueError, match="need single substitutions"):
        prepare_assays([path], ALL_SCHEMES, 600, None, 0)


def test_real_directory_with_its_reference_files(tmp_path):
    """The shared layout: assays plus manifest.csv and DMS_substitutions.csv one level up."""
    if not V1.is_dir():
        pytest.skip("shared ProteinGym v1 assays not present")
    d = tmp_path / "pg"
    d.mkdir()
    shutil.copy(next(V1.glob("GFP_*.csv")), d)
    for ref in ("manifest.csv", "DMS_substitutions.csv"):
        if (V1.parent / ref).is_file():
            shutil.copy(V1.parent / ref, d)
    prepared = prepare_assays(find_assays([d]), ALL_SCHEMES, 600, 50, 0)
    assert [a.name for a in prepared.assays] == ["GFP_AEQVI_Sarkisyan_2016"]
    assert all("not an assay" in n for n in prepared.notes)
    assert prepared.assays[0].fold_sources == dict.fromkeys(ALL_SCHEMES, "file")
