"""The rdserve CLI as operators run it: real processes for the main flow."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from app.cli import cli
from models.artifact import load_artifact

RDSERVE = [sys.executable, "-m", "app"]


def run(*args: str, ok: bool = True) -> subprocess.CompletedProcess:
    p = subprocess.run(
        [*RDSERVE, *args],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    if ok:
        assert p.returncode == 0, p.stderr
    return p


@pytest.fixture(scope="module")
def fasta(tmp_path_factory, fit_sequences) -> Path:
    p = tmp_path_factory.mktemp("fa") / "seqs.fasta"
    p.write_text(
        "".join(f">seq{i} some description\n{s}\n" for i, s in enumerate(fit_sequences[:40]))
    )
    return p


@pytest.fixture(scope="module")
def cli_artifact(tmp_path_factory, tiny_esm_dirs, fasta) -> Path:
    out = tmp_path_factory.mktemp("cli") / "chain.safetensors"
    models = ",".join(str(p) for p in tiny_esm_dirs)
    p = run(
        "fit",
        "--family",
        "esm2",
        "--models",
        models,
        "--fasta",
        str(fasta),
        "--max-seqs",
        "30",
        "--regressor",
        "ols",
        "--out",
        str(out),
        "--device",
        "cpu",
    )
    assert "tiny32 → tiny48" in p.stdout and "R²" in p.stdout
    return out


def test_fit_writes_an_artifact_with_stats(cli_artifact):
    art = load_artifact(cli_artifact)
    assert art.regressor == "ols" and art.fitting["n_sequences"] == 30
    assert art.fitting["source"] == "seqs.fasta" and art.fitting["token_budget"] > 0
    p = run("info", str(cli_artifact), "--json")
    meta = json.loads(p.stdout)
    assert meta["sha256"] == art.sha256
    assert [s["components_kept"] for s in meta["steps"]] == [32, 48]


def test_embed_is_nested_through_the_cli(cli_artifact, fasta, tmp_path):
    out64, out32, out_res = tmp_path / "e64.npy", tmp_path / "e32.npy", tmp_path / "r.npz"
    common = ["--artifact", str(cli_artifact), "--fasta", str(fasta), "--device", "cpu"]
    p = run("embed", *common, "--dimensions", "64", "--out", str(out64))
    assert "levels run: tiny32, tiny48, tiny64" in p.stderr
    p = run("embed", *common, "--dimensions", "32", "--out", str(out32))
    assert "levels run: tiny32" in p.stderr and "tiny48" not in p.stderr
    e64, e32 = np.load(out64), np.load(out32)
    assert e64.shape == (40, 64) and e32.shape == (40, 32) and e64.dtype == np.float32
    np.testing.assert_allclose(e64[:, :32], e32, atol=1e-6)
    run("embed", *common, "--dimensions", "48", "--pooling", "per-residue", "--out", str(out_res))
    res = np.load(out_res)
    assert sorted(res.files, key=lambda s: int(s[3:])) == [f"seq{i}" for i in range(40)]
    # Per-residue RD means equal the pooled RD (every step is affine).
    np.testing.assert_allclose(res["seq3"].mean(0), e64[3, :48], atol=1e-5)


def test_embed_npz_keys_are_any_fasta_id_and_long_sequences_are_reported(cli_artifact, tmp_path):
    fa = tmp_path / "odd.fasta"
    fa.write_text(">file\nMKVLAAGG\n>allow_pickle\n" + "MKVLA" * 220 + "\n>x\nGGS\n")
    common = ["--artifact", str(cli_artifact), "--fasta", str(fa), "--device", "cpu"]
    out = tmp_path / "odd.npz"
    p = run("embed", *common, "--dimensions", "16", "--pooling", "per-residue", "--out", str(out))
    npz = np.load(out)
    assert sorted(npz.files) == ["allow_pickle", "file", "x"]
    assert npz["file"].shape == (8, 16) and npz["allow_pickle"].shape == (1022, 16)
    assert "1 sequence(s) longer than 1022 residues were truncated" in p.stderr
    assert "allow_pickle" in p.stderr
    # With --long-sequence-policy error the message names the record before any work is done.
    p = run(
        "embed", *common, "--dimensions", "16", "--long-sequence-policy", "error",
        "--out", str(tmp_path / "e.npy"), ok=False,
    )  # fmt: skip
    assert p.returncode == 2 and "sequence 1: (allow_pickle) length 1100" in p.stderr
    dup = tmp_path / "dup.fasta"
    dup.write_text(">a\nMKV\n>b\nGGS\n>a\nMKW\n")
    p = run(
        "embed", "--artifact", str(cli_artifact), "--fasta", str(dup), "--device", "cpu",
        "--dimensions", "16", "--pooling", "per-residue", "--out", str(tmp_path / "d.npz"),
        ok=False,
    )  # fmt: skip
    assert p.returncode == 2
    assert "FASTA ids must be unique for .npz output: record 2 repeats record 0 ('a')" in p.stderr


def test_cli_errors_are_one_clear_line(cli_artifact, tmp_path):
    runner = CliRunner()
    bad = tmp_path / "bad.fasta"
    bad.write_text(">ok\nMKV\n>broken\nMKJV\n")
    r = runner.invoke(
        cli,
        [
            "embed",
            "--artifact",
            str(cli_artifact),
            "--fasta",
            str(bad),
            "--dimensions",
            "8",
            "--out",
            str(tmp_path / "x.npy"),
            "--device",
            "cpu",
        ],
    )
    assert r.exit_code == 2
    assert "sequence 1: (broken) invalid residue 'J' at position 3" in r.output
    ok = tmp_path / "ok.fasta"
    ok.write_text(">a\nMKV\n")
    r = runner.invoke(
        cli,
        [
            "embed",
            "--artifact",
            str(cli_artifact),
            "--fasta",
            str(ok),
            "--dimensions",
            "65",
            "--out",
            str(tmp_path / "x.npy"),
            "--device",
            "cpu",
        ],
    )
    assert r.exit_code == 2 and "dimensions must be in [1, 64], got 65" in r.output
    r = runner.invoke(cli, ["info", str(tmp_path / "missing.safetensors")])
    assert r.exit_code == 2 and "cannot read projection artifact" in r.output
    r = runner.invoke(cli, ["fit", "--fasta", str(ok), "--out", str(tmp_path / "a.st")])
    assert r.exit_code == 2 and "give --models" in r.output


def test_import_reference_cli(tmp_path):
    from tests.helpers import write_scaler

    rng = np.random.default_rng(0)
    write_scaler(tmp_path, 320, 480, "8M", "35M", "pcr", rng)
    out = tmp_path / "ref.safetensors"
    r = CliRunner().invoke(
        cli, ["import-reference", str(tmp_path), "--models", "8M,35M", "--out", str(out)]
    )
    assert r.exit_code == 0, r.output
    art = load_artifact(out)
    assert art.dims == [320, 480] and art.levels[1].model_id == "facebook/esm2_t12_35M_UR50D"
