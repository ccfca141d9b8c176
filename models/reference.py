"""Import of the reference implementation's published per-step scalers (npz, no pickle).

The reference code ships one ``rd-scaler-{in}-{out}-{regressor}-{pca}-{nseqs}.npz`` per step.
Its step is

    pcr:          ŷ = ((x_in − input_mean) C[:, :n]) coefᵀ + intercept + output_mean
    linear/ridge: ŷ = x_in coefᵀ + intercept
    appended      = (x_out − ŷ − pca_mean) pca_componentsᵀ

which maps onto rdserve's ŷ = W (h − m_h) + m_x, a = (x − ŷ − μ) Vᵀ as
W = coef C[:, :n]ᵀ, m_h = input_mean, m_x = intercept + output_mean (pcr) or
W = coef, m_h = 0, m_x = intercept (linear/ridge); μ = pca_mean, V = pca_components.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from models.artifact import Artifact, ArtifactError
from models.rd import StepParams, StepStats
from models.specs import Level

_NAME = re.compile(
    r"^(?P<kind>[a-z]+)-scaler-(?P<inp>[^-]+)-(?P<out>[^-]+)-(?P<reg>[a-z]+)-(?P<pca>[^-]+)-(?P<nseqs>[^-]+)\.npz$"
)


def _key(npz: np.lib.npyio.NpzFile, key: str, path: Path) -> np.ndarray:
    if key not in npz.files:
        raise ArtifactError(f"{path.name}: missing key {key!r} (has {sorted(npz.files)})")
    try:
        return np.asarray(npz[key], dtype=np.float64)
    except (ValueError, TypeError) as e:  # object arrays need pickle: refused
        raise ArtifactError(f"{path.name}: cannot read {key!r} without pickle ({e})") from e


def read_reference_step(path: str | Path, d_in: int, d_out: int, regressor: str) -> StepParams:
    """Convert one reference npz into StepParams (shapes checked against d_in → d_out)."""
    path = Path(path)
    try:
        npz = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise ArtifactError(f"{path.name}: cannot read npz without pickle ({e})") from e
    with npz:
        coef = _key(npz, "regressor__coef_", path)
        coef = coef[None, :] if coef.ndim == 1 else coef
        intercept = _key(npz, "regressor__intercept_", path)
        if intercept.size not in (1, d_out):
            raise ArtifactError(
                f"{path.name}: intercept_ has shape {intercept.shape}, expected ({d_out},)"
            )
        intercept = np.broadcast_to(intercept.reshape(-1), (d_out,)).copy()
        if regressor == "pcr":
            n_pcs = int(_key(npz, "regressor__n_significant_pcs_", path).reshape(-1)[0])
            comps = _key(npz, "regressor__input_components_", path)
            if comps.shape[0] != d_in or comps.shape[1] < n_pcs:
                raise ArtifactError(
                    f"{path.name}: input_components_ has shape {comps.shape}, "
                    f"need ({d_in}, ≥{n_pcs})"
                )
            if coef.shape != (d_out, n_pcs):
                raise ArtifactError(
                    f"{path.name}: coef_ has shape {coef.shape}, expected {(d_out, n_pcs)}"
                )
            weight = coef @ comps[:, :n_pcs].T
            input_mean = _key(npz, "regressor__input_mean_", path)
            output_mean = intercept + _key(npz, "regressor__output_mean_", path)
        else:
            if coef.shape != (d_out, d_in):
                raise ArtifactError(
                    f"{path.name}: coef_ has shape {coef.shape}, expected {(d_out, d_in)}"
                )
            weight, input_mean, output_mean = coef, np.zeros(d_in), intercept
        pca_mean = _key(npz, "pca__mean_", path)
        pca_components = _key(npz, "pca__components_", path)
    if pca_components.shape != (d_out - d_in, d_out):
        raise ArtifactError(
            f"{path.name}: pca__components_ has shape {pca_components.shape}, "
            f"expected {(d_out - d_in, d_out)}"
        )
    for name, arr, n in (("input_mean_", input_mean, d_in), ("pca__mean_", pca_mean, d_out)):
        if arr.shape != (n,):
            raise ArtifactError(f"{path.name}: {name} has shape {arr.shape}, expected ({n},)")
    return StepParams(weight, input_mean, output_mean, pca_mean, pca_components)


def import_reference(
    directory: str | Path,
    family: str,
    levels: Sequence[Level],
    regressor: str | None = None,
    pca: str | None = None,
    nseqs: str | None = None,
) -> Artifact:
    """Build an artifact from a directory of reference scalers for the given chain.

    Files are matched to steps by level name ({in}/{out}, e.g. 8M → 35M); when a directory holds
    several variants of a step, ``regressor``/``pca``/``nseqs`` must pick one.
    """
    directory = Path(directory)
    found = []
    for p in sorted(directory.glob("*.npz")):
        m = _NAME.match(p.name)
        if m and m["kind"] == "rd":
            found.append((p, m))
    steps = []
    chosen = []
    for i in range(len(levels) - 1):
        a, b = levels[i], levels[i + 1]
        cands = [
            (p, m)
            for p, m in found
            if m["inp"] == a.name
            and m["out"] == b.name
            and (regressor is None or m["reg"] == regressor)
            and (pca is None or m["pca"] == pca)
            and (nseqs is None or m["nseqs"] == nseqs)
        ]
        if not cands:
            raise ArtifactError(
                f"{directory}: no rd-scaler-{a.name}-{b.name}-*.npz matching "
                f"regressor={regressor or '*'} pca={pca or '*'} nseqs={nseqs or '*'}"
            )
        if len(cands) > 1:
            raise ArtifactError(
                f"{directory}: several scalers for {a.name} → {b.name}: "
                f"{', '.join(p.name for p, _ in cands)}; choose with --regressor/--pca/--nseqs"
            )
        p, m = cands[0]
        steps.append(read_reference_step(p, a.dim, b.dim, m["reg"]))
        chosen.append(m)

    def common(field: str) -> str:
        """The steps' shared value of one file-name field, or 'mixed'."""
        values = {m[field] for m in chosen}
        return values.pop() if len(values) == 1 else "mixed"

    reg, pca_kind, n = common("reg"), common("pca"), common("nseqs")
    return Artifact(
        family=family,
        levels=tuple(levels),
        steps=tuple(steps),
        stats=tuple(StepStats(None, None, None, None) for _ in steps),
        regressor=f"reference-{reg}",
        fitting={
            "source": "reference-import",
            "pca": pca_kind,
            "n_sequences": n,
            "files": [f"{m.string}" for m in chosen],
        },
    )
