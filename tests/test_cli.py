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
    assert p.returncode == 2 and "record 2 (allow_pickle): length 1100" in p.stderr
    dup = tmp_path / "dup.fasta"
    dup.write_text(">a\nMKV\n>b\nGGS\n>a\nMKW\n")
    p = run(
        "embed", "--artifact", str(cli_artifact), "--fasta", str(dup), "--device", "cpu",
        "--dimensions", "16", "--pooling", "per-residue", "--out", str(tmp_path / "d.npz"),
        ok=False,
    )  # fmt: skip
    assert p.returncode == 2
    assert "FASTA ids must be unique for .npz output: 'a' appears twice (sequences 1 and 3" in (
        p.stderr
    )


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
    assert "record 2 (broken): invalid residue 'J' at position 3" in r.output
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


# ---- bulk files ---------------------------------------------------------------------------------


def embed_args(artifact, fasta, out, *extra):
    return ["embed", "--artifact", str(artifact), "--fasta", str(fasta), "--device", "cpu",
            "--out", str(out), *extra]  # fmt: skip


def test_progress_moves_per_batch_in_plain_logs(cli_artifact, fasta, tmp_path, monkeypatch):
    import app.cli.ui as ui

    monkeypatch.setattr(ui, "LOG_EVERY_S", 0.0)  # a line per batch (default: every 5 s)
    out = tmp_path / "e.npy"
    args = embed_args(cli_artifact, fasta, out, "--dimensions", "8", "--token-budget", "512")
    r = CliRunner().invoke(cli, args)  # not a terminal: lines, not a bar
    assert r.exit_code == 0, r.output
    lines = [ln for ln in r.output.splitlines() if ln.startswith("embed: ")]
    done = [int(ln.split()[1].split("/")[0]) for ln in lines]
    assert len(lines) >= 5 and done == sorted(done) and done[0] < 40 and done[-1] == 40, lines
    assert all("residues/s" in ln and "ETA" in ln for ln in lines)


def test_gzip_and_stdin_fasta_and_npy_ids(cli_artifact, fasta, tmp_path):
    import gzip

    gz = tmp_path / "seqs.fa.gz"
    gz.write_bytes(gzip.compress(fasta.read_bytes()))
    a, b = tmp_path / "a.npy", tmp_path / "b.npy"
    assert (
        CliRunner().invoke(cli, embed_args(cli_artifact, gz, a, "--dimensions", "8")).exit_code == 0
    )
    r = CliRunner().invoke(
        cli, embed_args(cli_artifact, "-", b, "--dimensions", "8"), input=fasta.read_text()
    )
    assert r.exit_code == 0, r.output
    np.testing.assert_array_equal(np.load(a), np.load(b))
    ids = (tmp_path / "a.ids.txt").read_text().splitlines()
    assert ids == [f"seq{i}" for i in range(40)] and len(np.load(a)) == 40
    assert (tmp_path / "b.ids.txt").read_text().splitlines() == ids
    # Pooled output may be an .npz keyed by id instead.
    c = tmp_path / "c.npz"
    assert (
        CliRunner().invoke(cli, embed_args(cli_artifact, gz, c, "--dimensions", "8")).exit_code == 0
    )
    np.testing.assert_array_equal(np.load(c)["seq7"], np.load(a)[7])


def test_invalid_records_stop_codons_and_record_numbers(cli_artifact, tmp_path):
    fa = tmp_path / "biopython.fasta"
    fa.write_text(">a\nMKVLA*\n>b\nMKJV\n>c\nGGSA*\n")
    out = tmp_path / "o.npy"
    r = CliRunner().invoke(cli, embed_args(cli_artifact, fa, out, "--dimensions", "8"))
    assert r.exit_code == 2 and "record 1 (a): invalid residue '*' at position 6" in r.output
    assert "--strip-stop" in r.output and "Traceback" not in r.output
    r = CliRunner().invoke(
        cli, embed_args(cli_artifact, fa, out, "--dimensions", "8", "--strip-stop")
    )
    assert r.exit_code == 2 and "record 2 (b): invalid residue 'J' at position 3" in r.output
    assert "--on-invalid skip" in r.output
    r = CliRunner().invoke(
        cli,
        embed_args(
            cli_artifact, fa, out, "--dimensions", "8", "--strip-stop", "--on-invalid", "skip"
        ),
    )
    assert r.exit_code == 0, r.output
    assert np.load(out).shape == (2, 8)
    assert (tmp_path / "o.ids.txt").read_text().splitlines() == ["a", "c"]
    assert "skipped 1 invalid record(s): record 2 (b)" in r.output
    report = (tmp_path / "o.skipped.tsv").read_text().splitlines()
    assert report[0] == "record\tid\treason" and report[1].startswith("2\tb\tinvalid residue 'J'")


def test_bos_pooling_without_a_start_token_fails_before_any_work(tmp_path):
    from models.specs import family_spec

    shipped = family_spec("unirep").shipped_artifact_path
    fa = tmp_path / "q.fasta"
    fa.write_text(">q\nMKV\n")
    args = ["embed", "--artifact", str(shipped), "--fasta", str(fa), "--dimensions", "8",
            "--pooling", "bos", "--out", str(tmp_path / "x.npy"), "--device", "cpu"]  # fmt: skip
    # An empty weights cache: had any work started, it would try to fetch the weights.
    env = {**os.environ, "RDSERVE_CACHE_DIR": str(tmp_path / "empty"), "HF_HUB_OFFLINE": "1"}
    p = subprocess.run([*RDSERVE, *args], capture_output=True, text=True, timeout=120, env=env)
    assert p.returncode == 2, p.stderr
    assert "family 'unirep' has no start token; use pooling 'mean' or 'per_residue'" in p.stderr
    assert "Traceback" not in p.stderr and len(p.stderr.splitlines()) <= 2
    assert not (tmp_path / "empty").exists()


def test_import_reference_with_local_model_dirs(tmp_path, caplog):
    """The README recipe with local directories: sizes come from each model's config."""
    import shutil

    from models.artifact import check_levels_match
    from models.families import family_class
    from tests.helpers import SHARED, write_scaler

    dirs = []
    for name in ("esm2_t6_8M_UR50D", "esm2_t12_35M_UR50D"):
        d = tmp_path / "models" / name
        d.mkdir(parents=True)
        shutil.copy(SHARED / "esm2" / name / "config.json", d / "config.json")
        dirs.append(str(d))
    write_scaler(tmp_path, 320, 480, "8M", "35M", "pcr", np.random.default_rng(0))
    out = tmp_path / "ref.safetensors"
    r = CliRunner().invoke(
        cli, ["import-reference", str(tmp_path), "--models", ",".join(dirs), "--out", str(out)]
    )
    assert r.exit_code == 0, r.output
    art = load_artifact(out)
    assert [lv.name for lv in art.levels] == ["8M", "35M"] and art.dims == [320, 480]
    # A hub-fitted artifact served from local copies of the same models: no warning.
    hub = family_class("esm2").resolve_levels(["8M", "35M"])
    local = family_class("esm2").resolve_levels(dirs)
    assert [lv.name for lv in local] == ["8M", "35M"]
    hub_art = load_artifact(out).__class__(**{**vars_of(art), "levels": tuple(hub)})
    assert check_levels_match(hub_art, "esm2", tuple(local)) == []


def vars_of(art):
    from dataclasses import fields

    return {f.name: getattr(art, f.name) for f in fields(art)}


def test_help_is_readable_at_80_columns_and_every_option_is_documented():
    import typer.main

    root = typer.main.get_command(cli)
    commands = []

    def walk(cmd, path):
        if hasattr(cmd, "list_commands"):  # a group (typer may bring its own click)
            ctx = type(cmd).context_class(cmd)
            for name in cmd.list_commands(ctx):
                walk(cmd.get_command(ctx, name), [*path, name])
        else:
            commands.append((path, cmd))

    walk(root, [])
    assert len(commands) >= 8
    for path, cmd in commands:
        for param in cmd.params:
            if param.param_type_name == "option" and param.name != "help":
                assert (param.help or "").strip(), (path, param.name)
            elif param.param_type_name == "argument":
                assert getattr(param, "help", None), (path, param.name)
        r = CliRunner().invoke(cli, [*path, "--help"], env={"COLUMNS": "80"}, terminal_width=80)
        assert r.exit_code == 0, r.output
        too_wide = [ln for ln in r.output.splitlines() if len(ln) > 80]
        assert not too_wide, (path, too_wide)


def test_per_residue_has_one_spelling_and_accepts_the_other(cli_artifact, fasta, tmp_path):
    a, b = tmp_path / "a.npz", tmp_path / "b.npz"
    for out, spelling in ((a, "per_residue"), (b, "per-residue")):
        r = CliRunner().invoke(
            cli, embed_args(cli_artifact, fasta, out, "--dimensions", "8", "--pooling", spelling)
        )
        assert r.exit_code == 0, r.output
    assert np.load(a).files == np.load(b).files
    r = CliRunner().invoke(
        cli, embed_args(cli_artifact, fasta, a, "--dimensions", "8", "--pooling", "max")
    )
    assert r.exit_code == 2 and "choose mean, per_residue or bos" in r.output
