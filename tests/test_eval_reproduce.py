"""The one-command paper reproduction (issue 18 item 8), end to end on tiny random ESM-2 models.

Real ESM-2 weights need the hub, which CI cannot reach: this checks the code path (fit from one
pass of moments, baselines, three fold schemes, the paper's table), not the paper's numbers.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from benchmarks.reproduce_paper import PAPER, main, paper_rows
from tests.test_evaluation import write_assay


def test_reproduce_paper_end_to_end_on_tiny_models(tiny_esm_dirs, fit_sequences, tmp_path):
    assays = tmp_path / "assays"
    assays.mkdir()
    write_assay(assays / "AAA_TEST.csv", 30, 40, seed=11, folds=True)
    write_assay(assays / "BBB_TEST.csv", 26, 40, seed=12, folds=False)
    (assays / "manifest.csv").write_text("DMS_id,file\nAAA_TEST,AAA_TEST.csv\n")
    fasta = tmp_path / "uniref.fasta"
    fasta.write_text("".join(f">u{i}\n{s}\n" for i, s in enumerate(fit_sequences[:30])))
    out = tmp_path / "out"
    argv = [
        "--assays", str(assays), "--models", ",".join(str(p) for p in tiny_esm_dirs),
        "--fasta", str(fasta), "--max-seqs", "30", "--max-variants", "30",
        "--device", "cpu", "--token-budget", "4096", "--out-dir", str(out),
    ]  # fmt: skip
    table = main(argv)
    lines = table.splitlines()
    assert len(lines) == 2 + 3
    for row, paper in zip(lines[2:], PAPER.values(), strict=True):
        assert f"| {paper:.1f}% |" in row
        assert row.count("/2)") == 3  # one win count over the 2 assays per scheme
    assert "rd.tiny64 > tiny64 (as rd.3B > 3B)" in table
    text = (out / "paper-table.md").read_text()
    assert table in text and "30 fitting sequences" in text
    report = (out / "proteingym.md").read_text()
    for scheme in ("fold_random_5", "fold_modulo_5", "fold_contiguous_5"):
        assert f"## `{scheme}`" in report
    assert "pca-concat" in report and "manifest.csv: not an assay" in report
    assert (out / "proteingym-paired.png").is_file()
    assert len(list(out.glob("esm2-tiny32-tiny48-tiny64.safetensors"))) == 1
    assert list((out / "cache").glob("moments.*.npz"))  # one pass: fit and baselines share it


def test_one_fit_holds_every_shorter_chain(tiny_esm_dirs, fit_sequences):
    """Why one fit answers all three rows: RD of 8M → … → 650M is the first 1,280 dims of RD of
    the chain to 3B (here: the first 48 of 32 → 48 → 64), fitted on the same data."""
    from models.extract import Extractor
    from models.families import build_chain
    from models.fit import accumulate_moments, solve_artifact
    from models.moments import Moments
    from models.projection import Projector
    from models.rd import Regressor
    from models.sequences import LongSequencePolicy

    seqs = fit_sequences[:12]
    family = build_chain("esm2", models=[str(p) for p in tiny_esm_dirs], device="cpu")
    moments = accumulate_moments(Extractor(family, 4096), seqs)
    full = solve_artifact(
        family, moments, seqs, Regressor.pcr, 1.0, LongSequencePolicy.truncate, 4096, None
    )
    short_family = build_chain("esm2", models=[str(p) for p in tiny_esm_dirs[:2]], device="cpu")
    d = sum(lv.dim for lv in short_family.levels)
    sub = Moments(d)
    sub.mean, sub.scatter, sub.n = moments.mean[:d], moments.scatter[:d, :d], moments.n
    short = solve_artifact(
        short_family, sub, seqs, Regressor.pcr, 1.0, LongSequencePolicy.truncate, 4096, None
    )
    rng = np.random.default_rng(0)
    import torch

    raw = {
        i: torch.from_numpy(rng.normal(size=(5, lv.dim)).astype(np.float32))
        for i, lv in enumerate(family.levels)
    }
    a = torch.cat(Projector(full).extend(None, raw, 0, 2), dim=1).numpy()
    b = torch.cat(Projector(short).extend(None, {0: raw[0], 1: raw[1]}, 0, 1), dim=1).numpy()
    np.testing.assert_array_equal(a[:, :48], b)
    assert paper_rows(["8M", "35M", "150M", "650M", "3B"], [320, 480, 640, 1280, 2560]) == [
        ("rd-1280", "raw-1280", "rd.650M > 650M", "rd.650M > 650M"),
        ("rd-2560", "raw-2560", "rd.3B > 3B", "rd.3B > 3B"),
        ("rd-2560", "rd-1280", "rd.3B > rd.650M", "rd.3B > rd.650M"),
    ]


def test_paper_chain_is_the_default():
    from benchmarks.reproduce_paper import parse_args

    args = parse_args(["--assays", str(Path("x"))])
    assert args.models == "8M,35M,150M,650M,3B" and args.max_seqs == 1000
