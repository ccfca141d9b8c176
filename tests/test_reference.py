"""Import of the reference implementation's rd-scaler-*.npz files."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from models.artifact import ArtifactError, load_artifact, save_artifact
from models.families.base import Level
from models.projection import Projector
from models.reference import import_reference
from tests.helpers import write_scaler

LEVELS = [Level("8M", 6, "a"), Level("35M", 10, "b"), Level("150M", 16, "c")]


def reference_step(x_in, x_out, s, regressor):
    """The reference step, written straight from its published equations."""
    if regressor == "pcr":
        n = int(s["regressor__n_significant_pcs_"])
        scores = (x_in - s["regressor__input_mean_"]) @ s["regressor__input_components_"][:, :n]
        y = (
            scores @ s["regressor__coef_"].T
            + s["regressor__intercept_"]
            + s["regressor__output_mean_"]
        )
    else:
        y = x_in @ s["regressor__coef_"].T + s["regressor__intercept_"]
    return np.concatenate([x_in, (x_out - y - s["pca__mean_"]) @ s["pca__components_"].T], axis=1)


@pytest.mark.parametrize("regressor", ["pcr", "linear", "ridge"])
def test_imported_chain_equals_the_reference_step(tmp_path, regressor):
    rng = np.random.default_rng(0)
    s1 = write_scaler(tmp_path, 6, 10, "8M", "35M", regressor, rng)
    s2 = write_scaler(tmp_path, 10, 16, "35M", "150M", regressor, rng)
    art = save_artifact(import_reference(tmp_path, "esm2", LEVELS), tmp_path / "ref.safetensors")
    art = load_artifact(tmp_path / "ref.safetensors")
    assert art.regressor == f"reference-{regressor}" and art.dims == [6, 10, 16]
    xs = [rng.normal(size=(50, d)) for d in (6, 10, 16)]
    want = reference_step(reference_step(xs[0], xs[1], s1, regressor), xs[2], s2, regressor)
    proj = Projector(art)
    got = proj.extend(
        None, {i: torch.tensor(x, dtype=torch.float32) for i, x in enumerate(xs)}, 0, 2
    )
    np.testing.assert_allclose(torch.cat(got, 1).numpy(), want, rtol=1e-4, atol=1e-4)


def test_provenance_fields_are_mixed_only_where_the_steps_differ(tmp_path):
    rng = np.random.default_rng(2)
    write_scaler(tmp_path, 6, 10, "8M", "35M", "pcr", rng, n="1k")
    write_scaler(tmp_path, 10, 16, "35M", "150M", "linear", rng, n="1k")
    art = import_reference(tmp_path, "esm2", LEVELS)
    assert art.regressor == "reference-mixed"
    assert art.fitting["pca"] == "fbpca" and art.fitting["n_sequences"] == "1k"


def test_ambiguous_missing_and_malformed_scalers(tmp_path):
    rng = np.random.default_rng(1)
    write_scaler(tmp_path, 6, 10, "8M", "35M", "pcr", rng, n="1k")
    write_scaler(tmp_path, 6, 10, "8M", "35M", "pcr", rng, n="5k")
    with pytest.raises(ArtifactError, match="several scalers for 8M → 35M"):
        import_reference(tmp_path, "esm2", LEVELS[:2])
    assert import_reference(tmp_path, "esm2", LEVELS[:2], nseqs="5k").fitting["n_sequences"] == "5k"
    with pytest.raises(ArtifactError, match="no rd-scaler-35M-150M"):
        import_reference(tmp_path, "esm2", LEVELS, nseqs="5k")
    # Object arrays would need pickle: refused.
    bad = tmp_path / "bad"
    bad.mkdir()
    np.savez(
        bad / "rd-scaler-8M-35M-linear-fbpca-1k.npz", regressor__coef_=np.array([{}], dtype=object)
    )
    with pytest.raises(ArtifactError, match="without pickle"):
        import_reference(bad, "esm2", LEVELS[:2])
    wrong = tmp_path / "wrong"
    wrong.mkdir()
    write_scaler(wrong, 6, 12, "8M", "35M", "linear", rng)
    with pytest.raises(ArtifactError, match=r"intercept_ has shape \(12,\), expected \(10,\)"):
        import_reference(wrong, "esm2", LEVELS[:2])
