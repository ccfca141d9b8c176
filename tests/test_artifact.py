"""Projection artifacts: round trip, determinism, corruption and mismatch errors."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest

from models.artifact import ArtifactError, check_levels_match, load_artifact, save_artifact
from models.embedder import Embedder
from models.families import build_chain
from models.families.base import Level, LevelMismatchError
from models.fit import fit_artifact


def test_round_trip_and_metadata(tiny_artifact, fit_sequences):
    art = load_artifact(tiny_artifact)
    assert art.family == "esm2" and art.dims == [32, 48, 64]
    assert art.regressor == "pcr" and len(art.steps) == 2
    assert art.fitting["n_sequences"] == len(fit_sequences)
    assert art.fitting["n_residues"] == sum(len(s) for s in fit_sequences)
    assert len(art.sha256) == 64
    for s in art.stats:
        assert s.residues == art.fitting["n_residues"]
        assert 0 < s.r2 < 1 and 0 < s.appended_variance_explained <= 1
        assert s.components_kept >= 1
    assert art.level_for_dim(1) == 0 and art.level_for_dim(32) == 0
    assert art.level_for_dim(33) == 1 and art.level_for_dim(64) == 2
    with pytest.raises(ValueError, match=r"dimensions must be in \[1, 64\], got 65"):
        art.level_for_dim(65)


def test_same_data_and_settings_give_an_identical_file(
    tiny_esm_dirs, fit_sequences, tiny_artifact, tmp_path
):
    family = build_chain("esm2", models=[str(p) for p in tiny_esm_dirs], device="cpu")
    again = save_artifact(
        fit_artifact(family, fit_sequences, token_budget=4096), tmp_path / "b.safetensors"
    )
    assert (tmp_path / "b.safetensors").read_bytes() == tiny_artifact.read_bytes()
    assert again.sha256 == load_artifact(tiny_artifact).sha256


def resave(path, out, case):
    """Re-save an artifact's tensors and metadata with one deliberate defect."""
    from safetensors import safe_open
    from safetensors.numpy import save_file

    with safe_open(str(path), "numpy") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
        meta = dict(f.metadata())
    info = json.loads(meta["rdserve"])
    if case == "no-meta":
        del meta["rdserve"]
    elif case == "bad-format":
        meta["rdserve"] = json.dumps({**info, "format": "other/9"})
    elif case == "bad-json":
        meta["rdserve"] = "{not json"
    elif case == "bad-levels":
        meta["rdserve"] = json.dumps({**info, "steps": info["steps"][:1]})
    elif case == "missing-tensor":
        del tensors["step1.components"]
    elif case == "wrong-shape":
        tensors["step0.weight"] = tensors["step0.weight"][:, :16].copy()
    elif case == "nan":
        tensors["step0.input_mean"][3] = np.nan
    elif case == "extra":
        tensors["junk"] = np.zeros(1)
    elif case == "bit-flip":
        tensors["step1.weight"].flat[5] += 1e-3  # same shapes, still finite: only the checksum
    elif case == "meta-list":
        meta["rdserve"] = "[]"
    elif case == "dim-string":
        info["levels"][1]["dim"] = "48"
        meta["rdserve"] = json.dumps(info)
    save_file(tensors, str(out), metadata=meta)


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("missing", "cannot read projection artifact"),
        ("garbage", "not a valid safetensors file"),
        ("truncated", "not a valid safetensors file"),
        ("no-meta", "no 'rdserve' metadata"),
        ("bad-format", "unsupported format 'other/9'"),
        ("bad-json", "malformed metadata"),
        ("bad-levels", "lists 3 levels and 1 step records"),
        ("missing-tensor", "missing tensor 'step1.components'"),
        ("wrong-shape", "tensor 'step0.weight' has shape (48, 16), expected (48, 32)"),
        ("nan", "tensor 'step0.input_mean' contains NaN"),
        ("extra", "unexpected tensors ['junk']"),
        ("bit-flip", "does not match the checksum in its metadata"),
        ("meta-list", "malformed metadata (AttributeError"),
        ("dim-string", "dim must be a positive integer: '48'"),
    ],
)
def test_corrupt_artifacts_name_the_problem(tiny_artifact, tmp_path, case, message):
    out = tmp_path / f"{case}.safetensors"
    if case == "garbage":
        out.write_bytes(b"\x00" * 7)
    elif case == "truncated":
        out.write_bytes(tiny_artifact.read_bytes()[:-100])
    elif case != "missing":
        resave(tiny_artifact, out, case)
    with pytest.raises(ArtifactError) as ei:
        load_artifact(out)
    assert message in str(ei.value)
    assert str(out) in str(ei.value)


def test_runtime_models_must_match_the_artifact(tiny_artifact, tiny_esm_dirs):
    art = load_artifact(tiny_artifact)
    with pytest.raises(ArtifactError, match="fitted for family 'esm2', runtime is 'unirep'"):
        check_levels_match(art, "unirep", art.levels)
    with pytest.raises(ArtifactError, match="artifact has 3 levels, runtime chain has 2"):
        check_levels_match(art, "esm2", art.levels[:2])
    swapped = (art.levels[0], replace(art.levels[1], dim=40), art.levels[2])
    with pytest.raises(ArtifactError, match=r"level 1 \(tiny48\): artifact expects dim 48"):
        check_levels_match(art, "esm2", swapped)
    moved = tuple(replace(lv, model_id="/elsewhere") for lv in art.levels)
    assert len(check_levels_match(art, "esm2", moved)) == 3  # warnings, not errors
    # A model whose weights do not have the declared width is caught when it loads.
    lying = [Level("tiny48", 32, str(tiny_esm_dirs[1]))]
    fam = build_chain("esm2", levels=lying, device="cpu")
    with pytest.raises(
        LevelMismatchError, match="produces 48-dim representations, but 32 were expected"
    ):
        fam.load(0)


def test_embedder_refuses_a_mismatched_chain(tiny_artifact, tiny_esm_dirs):
    art = load_artifact(tiny_artifact)
    fam = build_chain("esm2", models=[str(tiny_esm_dirs[0]), str(tiny_esm_dirs[2])], device="cpu")
    with pytest.raises(ArtifactError):
        Embedder(fam, art)
    np.testing.assert_array_equal(art.steps[0].residual_mean, np.zeros(48))
